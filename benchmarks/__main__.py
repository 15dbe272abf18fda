"""python -m benchmarks: fused_bn against PyTorch eager and torch.compile.

Examples:
    python -m benchmarks                                  # the default table (a few minutes)
    python -m benchmarks --quick                          # CI smoke run (< 1 minute)
    python -m benchmarks --ops bn_relu_fwd_bwd --shapes 32,64,56,56 --dtypes float32
    python -m benchmarks --json out.json --markdown out.md --plot out.png
    python -m benchmarks --compile-ops all                # torch.compile baseline on every op
    python -m benchmarks --threads 1                      # on one CPU thread
"""

import argparse
import datetime
import json
import platform
import sys

import torch

import fused_bn

from . import allocator, suite

COLUMNS = [  # (row key, header, format)
    ("op", "op", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("layout", "layout", "{}"),
    ("device", "device", "{}"),
    ("copy_ms", "copy ms", "{:.3f}"),
    ("fused_ms", "fused ms", "{:.3f}"),
    ("eager_ms", "eager ms", "{:.3f}"),
    ("compile_ms", "compile ms", "{:.3f}"),
    ("speedup_vs_eager", "vs eager", "{:.2f}x"),
    ("speedup_vs_compile", "vs compile", "{:.2f}x"),
    ("fused_GBps", "GB/s", "{:.1f}"),
    ("pct_of_copy_bw", "% copy BW", "{:.0f}%"),
    ("memory_GBps", "mem GB/s", "{:.1f}"),
    ("pct_of_memory_bw", "% mem BW", "{:.0f}%"),
    ("floor_speedup_vs_eager", "floor vs eager", "{:.2f}x"),
    ("saved_fused_MB", "saved MB fused", "{:.1f}"),
    ("saved_eager_MB", "saved MB eager", "{:.1f}"),
    ("faults_fused", "faults fused", "{:.0f}"),
    ("faults_eager", "faults eager", "{:.0f}"),
]


def shape_arg(text):
    return tuple(int(s) for s in text.split(","))


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=list(suite.OPS), help="default: all available")
    parser.add_argument("--shapes", nargs="+", type=shape_arg, metavar="N,C,...",
                        help="input shapes, e.g. 32,64,56,56 256,1024")
    parser.add_argument("--dtypes", nargs="+", choices=list(suite.DTYPES),
                        default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", choices=suite.LAYOUTS, default=list(suite.LAYOUTS),
                        help="channels_last applies to 4D/5D shapes only")
    parser.add_argument("--device", nargs="+", dest="devices", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when available")
    parser.add_argument("--compile-ops", nargs="+", default=["bn_relu_fwd_bwd"], metavar="OP",
                        help="ops that get the torch.compile baseline, 'all' or 'none' "
                             "(default: bn_relu_fwd_bwd; compiling takes seconds per row)")
    parser.add_argument("--min-run-time", type=float, default=0.5,
                        help="seconds of timed runs per implementation and row (default 0.5)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="turns the implementations of a row take, interleaved, within "
                             "--min-run-time (default 5)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for every implementation (torch.set_num_threads); "
                             "default: torch's own count")
    parser.add_argument("--malloc", choices=allocator.MODES, default="steady",
                        help="steady (default): freed blocks are reused instead of being "
                             "page-faulted back in on every call; default: glibc's own settings "
                             "(see benchmarks/allocator.py)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, float32, short timing")
    parser.add_argument("--json", metavar="PATH", help="write the rows and the machine as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    parser.add_argument("--plot", metavar="PATH",
                        help="bar chart of the speedups (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or suite.QUICK_SHAPES
        args.dtypes = ["float32"]
        args.min_run_time = 0.02
        args.rounds = 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    args.shapes = args.shapes or suite.DEFAULT_SHAPES
    args.ops = args.ops or suite.available_ops()
    if args.compile_ops == ["all"]:
        args.compile_ops = args.ops
    elif args.compile_ops == ["none"]:
        args.compile_ops = []
    missing = [op for op in args.ops if op not in suite.available_ops()]
    if missing:
        parser.error(f"not available in this build of fused_bn: {missing}")
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return args


def machine():
    info = {
        "cpu": cpu_model(),
        "cores": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_bn": fused_bn.build_info(),
        "date": datetime.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows, markdown):
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows)]
    cells = [[fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
             for row in rows]
    headers = [header for _, header, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers)] + [fmt.format(*r) for r in cells])


def summary(rows):
    lines = []
    for key, name in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "torch.compile")):
        values = [row[key] for row in rows if key in row]
        if values:
            lines.append(
                f"fused_bn vs {name}: geometric mean {suite.geomean(values):.2f}x, "
                f"min {min(values):.2f}x, max {max(values):.2f}x over {len(values)} rows"
            )
    return "\n".join(lines)


def write_markdown(path, rows, info, command):
    text = "\n".join([
        "# fused_bn microbenchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} threads"
        + (f", {info['gpu']}" if "gpu" in info else "")
        + f"; torch {info['torch']}; fused_bn {info['fused_bn']['version']} "
        f"(CPU kernels: {info['fused_bn']['cpu_capability']}); {info['date']}.",
        "",
        f"Memory allocator: {info['malloc']}. Times are medians (torch.utils.benchmark) "
        "over interleaved rounds: the implementations of a row take turns. "
        "GB/s counts the minimum bytes the op must move (forward: read x, write y; "
        "backward: read x and grad, write grad_input); % copy BW compares it with a "
        "copy of the same tensor (`copy ms`, read + write) timed in the same rounds, "
        "% mem BW with the bandwidth of a copy far larger than the caches (`mem GB/s`, "
        "read + write, timed in the same rounds): 100% is the memory floor of the op, "
        "and rows above it are served partly from cache. `floor vs eager` is eager's "
        "time over that floor: the most a step streaming from memory can gain on eager. "
        "`faults` are minor page faults per step (a step that page-faults its outputs "
        "in pays ~1 us per 4 KiB page on a VM).",
        "",
        table(rows, markdown=True),
        "",
        summary(rows),
        "",
    ])
    with open(path, "w") as f:
        f.write(text)


def plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{r['shape']} {r['dtype']}\n{r['layout']} {r['device']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(rows)), 5))
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [r["speedup_vs_eager"] for r in rows], 0.4,
           label="vs eager")
    if any("speedup_vs_compile" in r for r in rows):
        ax.bar([p + 0.2 for p in positions], [r.get("speedup_vs_compile", 0) for r in rows], 0.4,
               label="vs torch.compile")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("fused_bn speedup")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine()
    info["malloc"] = allocator.configure(args.malloc)
    print(f"{info['cpu']}, {info['cores']} threads, torch {info['torch']}, "
          f"fused_bn CPU kernels: {info['fused_bn']['cpu_capability']}; {info['malloc']}",
          file=sys.stderr)
    rows = suite.run(args)
    print(table(rows, markdown=False))
    print(summary(rows))
    command = "python -m benchmarks" + "".join(f" {a}" for a in argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": info, "rows": rows}, f,
                      indent=1)
    if args.markdown:
        write_markdown(args.markdown, rows, info, command)
    if args.plot:
        plot(args.plot, rows)


if __name__ == "__main__":
    main()
