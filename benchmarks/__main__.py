"""python -m benchmarks: fused_bn against PyTorch eager and torch.compile, op by op.

The default run (2-3 minutes on 2 cores) times every op on a few shapes,
once with glibc's default malloc settings (what users get: the headline) and
once with malloc tuned to keep freed blocks (--malloc steady), each in a fresh
process, and prints one compact table, a per-op summary and whether its own
noise allows trusting the ratios. See docs/benchmarks.md for the method.

Examples:
    python -m benchmarks                       # the default table, both malloc modes
    python -m benchmarks --quick               # CI smoke run (< 1 minute)
    python -m benchmarks --full                # the full grid: 6 shapes, float32 and bfloat16
    python -m benchmarks --shapes resnet50     # every BatchNorm shape of a resnet50 step
    python -m benchmarks --ops bn_relu_fwd_bwd --shapes 32,64,56,56 --dtypes float32
    python -m benchmarks --verbose             # + bandwidth, page-fault and copy columns
    python -m benchmarks --malloc steady       # one malloc mode, in this process
    python -m benchmarks --overhead            # host time per module call on tiny shapes
    python -m benchmarks --json out.json --markdown out.md --plot out.png
    python -m benchmarks.models                # training steps of whole models
"""

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time

import torch

import fused_bn

from . import allocator, modes, overhead, report, suite, timing
from .shapes import SHAPE_SETS

SUITE_TIMING = {"min_run_time": 0.35, "rounds": 5}
QUICK_TIMING = {"min_run_time": 0.03, "rounds": 3}


def shape_arg(text):
    if text in SHAPE_SETS:
        return text
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither N,C,... nor a shape set ({', '.join(SHAPE_SETS)})") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    rows = parser.add_argument_group("rows (any of these replaces the default rows by a grid)")
    rows.add_argument("--ops", nargs="+", choices=list(suite.OPS), help="default: all available")
    rows.add_argument("--shapes", nargs="+", type=shape_arg, metavar="N,C,...|SET",
                      help="input shapes, e.g. 32,64,56,56 256,1024, or named sets of real "
                           f"layers: {', '.join(SHAPE_SETS)} (their forward+backward rows)")
    rows.add_argument("--dtypes", nargs="+", choices=list(suite.DTYPES))
    rows.add_argument("--layouts", nargs="+", choices=suite.LAYOUTS,
                      help="channels_last applies to 4D/5D shapes only")
    rows.add_argument("--quick", action="store_true",
                      help="tiny shapes, float32, short timing (CI smoke run)")
    rows.add_argument("--full", action="store_true",
                      help="the full grid: 6 shapes, float32 and bfloat16, both layouts, all ops")
    parser.add_argument("--device", nargs="+", dest="devices", choices=["cpu", "cuda"],
                        help="default: cpu, and cuda when available")
    parser.add_argument("--compile-ops", nargs="+", default=["bn_relu_fwd_bwd"], metavar="OP",
                        help="ops that get the torch.compile baseline, 'all' or 'none' "
                             "(default: bn_relu_fwd_bwd; compiling takes seconds per row)")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds of timed calls per implementation and row (default 0.35; "
                             "--overhead: 0.2)")
    parser.add_argument("--rounds", type=int,
                        help="turns the implementations of a row take, interleaved, within "
                             "--min-run-time (default 5; --overhead: 20)")
    parser.add_argument("--noise-threshold", type=float, default=timing.NOISE_THRESHOLD,
                        help="flag a row as noisy when its per-round speedups spread more than "
                             "this (range of their middle half over their median; default "
                             f"{timing.NOISE_THRESHOLD})")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for every implementation (torch.set_num_threads); "
                             "default: torch's own count")
    parser.add_argument("--malloc", choices=allocator.MODES,
                        help="run in this process with one malloc mode: default (glibc's own "
                             "settings) or steady (freed blocks kept for reuse, see "
                             "benchmarks/allocator.py); without it both run, each in a "
                             "fresh process")
    parser.add_argument("--verbose", action="store_true",
                        help="also the bandwidth, page-fault, copy and saved-memory columns")
    parser.add_argument("--overhead", action="store_true",
                        help="host time per module call on tiny shapes, one thread unless "
                             "--threads, instead of the op table (overhead.py)")
    parser.add_argument("--json", metavar="PATH", help="write every column and the machine")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--plot", metavar="PATH",
                        help="bar chart of the speedups (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    timing_defaults = QUICK_TIMING if args.quick else overhead.TIMING if args.overhead \
        else SUITE_TIMING
    for name, value in timing_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    missing = [op for op in args.ops or [] if op not in suite.available_ops()]
    if missing:
        parser.error(f"not available in this build of fused_bn: {missing}")
    args.grids = grids(args)
    if args.compile_ops == ["all"]:
        args.compile_ops = list(suite.OPS)
    elif args.compile_ops == ["none"]:
        args.compile_ops = []
    if args.devices is None:
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return args


def grids(args):
    """The rows to run: the preset of --quick/--full/default, or the grid the options make."""
    available = tuple(suite.available_ops())
    options = {k: tuple(v) for k in ("ops", "shapes", "dtypes", "layouts")
               if (v := getattr(args, k))}
    if not options:
        preset = suite.QUICK if args.quick else suite.FULL if args.full else suite.DEFAULT
        return tuple(suite.Grid(tuple(op for op in g.ops if op in available), g.shapes, g.dtypes,
                                g.layouts) for g in preset)
    base = suite.QUICK[0] if args.quick else suite.FULL[0]
    only_sets = "shapes" in options and all(isinstance(s, str) for s in options["shapes"])
    ops = suite.LAYER_OPS if only_sets else tuple(op for op in base.ops if op in available)
    return (suite.Grid(**{"ops": ops, "shapes": base.shapes, "dtypes": base.dtypes,
                          "layouts": base.layouts, **options}),)


def machine():
    info = {
        "cpu": cpu_model(),
        "cores": torch.get_num_threads(),
        "cpus": timing.cpu_count(),
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


def machine_line(info):
    return (f"{info['cpu']}, {info['cores']} threads on {info['cpus']} CPUs"
            + (f", {info['gpu']}" if "gpu" in info else "")
            + f"; torch {info['torch']}; fused_bn {info['fused_bn']['version']} "
            f"(CPU kernels: {info['fused_bn']['cpu_capability']})")


def run_here(args):
    """One malloc mode in this process: {"malloc", "load", "wall_s", "rows", "noise"}."""
    malloc = allocator.configure(args.malloc or "default")
    print(f"{machine_line(machine())}; {malloc}", file=sys.stderr, flush=True)
    load = timing.Load.start(torch.get_num_threads())
    start = time.perf_counter()
    rows = suite.run(args)
    load.stop()
    return {"malloc": malloc, "load": dataclasses.asdict(load),
            "wall_s": round(time.perf_counter() - start, 1), "rows": rows,
            "noise": timing.noise_verdict(load, rows, args.noise_threshold)}


def both_modes(argv):
    """Each malloc mode in a fresh process; the runs, and the merged headline rows."""
    runs = {mode: modes.run_child(argv, mode) for mode in modes.MODES}
    return runs, modes.merge(runs["default"]["rows"], runs["steady"]["rows"])


def uses_both_modes(args):
    return args.malloc is None and "cpu" in args.devices and allocator.available()


def noise_lines(runs):
    lines = []
    for mode, run in runs.items():
        load = timing.Load(**run["load"])
        lines.append(f"malloc '{mode}': {load.describe()}; {run['wall_s']:.0f} s")
        lines += [f"RATIOS NOT TRUSTWORTHY ('{mode}'): {line}" for line in run["noise"]]
    if not any(run["noise"] for run in runs.values()):
        lines.append("Noise: every row's per-round speedups agree within the threshold and the "
                     "machine was not busy.")
    return lines


def legend(runs, threshold):
    text = ("flags: SLOWER = fused_bn slower than eager; noisy = per-round speedups spread more "
            f"than {threshold:.0%}; busy = other processes used CPUs the row's threads needed; "
            "compile fell back = no torch.compile time (see the JSON).")
    if "steady" in runs and "default" in runs:
        text = ("Headline: glibc's default malloc settings (what users get); tuned malloc: "
                "freed blocks kept for reuse (--malloc steady); '(tuned)' marks a flag of the "
                "tuned run. " + text)
    return text


def render(runs, rows, args, markdown):
    columns = report.VERBOSE_COLUMNS if args.verbose else report.MAIN_COLUMNS
    parts = [report.row_table(rows, columns, markdown), "", legend(runs, args.noise_threshold), "",
             "Per op: fused_bn's speedup, geometric mean (min-max) over the rows; minor page "
             "faults per call", "", report.summary_table(rows, markdown), ""]
    totals = report.shape_set_totals(rows)
    if totals:
        parts += [f"- {line}" if markdown else line for line in totals] + [""]
    parts += [f"- {line}" if markdown else line for line in noise_lines(runs)]
    return "\n".join(parts)


def write_markdown(path, text, info, runs, command):
    mallocs = "; ".join(f"'{mode}': {run['malloc']}" for mode, run in runs.items())
    header = [
        "# fused_bn microbenchmark", "",
        f"Command: `{command}`", "",
        f"Machine: {machine_line(info)}; {info['date']}.", "",
        f"Malloc: {mallocs}. Times are medians over interleaved rounds (the implementations "
        "of a row take turns); the method is described in docs/benchmarks.md.", "", "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(header) + text + "\n")


def plot(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{report.shape_text(r['shape'])} {r['dtype']}\n{r['layout']}"
              for r in rows]
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
    if args.overhead:
        return overhead.main(args, argv)
    info = machine()
    if uses_both_modes(args):
        runs, rows = both_modes(argv)
    else:
        run = run_here(args)
        runs, rows = {args.malloc or "default": run}, run["rows"]
    command = "python -m benchmarks" + "".join(f" {a}" for a in argv)
    print(render(runs, rows, args, markdown=False))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": info, "runs": runs, "rows": rows,
                       "summary": report.summarize(rows)}, f, indent=1)
    if args.markdown:
        write_markdown(args.markdown, render(runs, rows, args, markdown=True), info, runs,
                       command)
    if args.plot:
        plot(args.plot, rows)


if __name__ == "__main__":
    main()
