"""python -m benchmarks --overhead: host time per module call on tiny inputs.

On tiny tensors (and on a GPU, where the host only launches kernels) a module
call costs what its Python code, op dispatch and autograd bookkeeping cost.
This mode times each fused_bn module against the PyTorch modules it replaces,
on one CPU thread, in training and eval mode, with and without grad (with
grad: forward + backward through the input and the parameters, as in a
training step; without: a forward under torch.no_grad()), and reports eager µs
over fused µs: below 1 (flagged SLOWER) the fused module costs more per call.
"""

import dataclasses
import json
import sys
import time

import torch
from torch import nn

import fused_bn

from . import report, timing

SHAPES = ((8, 16), (32, 64, 8, 8), (4, 16, 8, 8))
DROPOUT_P = 0.1
TIMING = {"min_run_time": 0.2, "rounds": 20}  # per implementation and row


def _batch_norm(dim, channels):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim](
        channels)


def _fused_batch_norm(dim, channels, relu):
    names = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}
    return getattr(fused_bn, f"BatchNorm{'ReLU' if relu else ''}{names[dim]}")(channels)


# module name -> (eager module, fused module) for an input of `shape`
PAIRS = {
    "BatchNorm": lambda shape: (_batch_norm(len(shape), shape[1]),
                                _fused_batch_norm(len(shape), shape[1], relu=False)),
    "BatchNorm+ReLU": lambda shape: (nn.Sequential(_batch_norm(len(shape), shape[1]), nn.ReLU()),
                                     _fused_batch_norm(len(shape), shape[1], relu=True)),
    "Dropout": lambda shape: (nn.Dropout(DROPOUT_P), fused_bn.Dropout(DROPOUT_P)),
}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    training: bool
    grad: bool


MODES = (Mode("train, fwd+bwd", True, True), Mode("train, fwd no_grad", True, False),
         Mode("eval, fwd+bwd", False, True), Mode("eval, fwd no_grad", False, False))


def call_fn(module, x, grad, mode):
    """One call of `module` in `mode`: forward (+ backward with grad)."""
    module.train(mode.training)
    if mode.grad:
        x = x.detach().requires_grad_()
        inputs = (x, *module.parameters())
        return lambda: torch.autograd.grad(module(x), inputs, grad)

    def forward():
        with torch.no_grad():
            module(x)

    return forward


def run_row(name, shape, mode, args):
    torch.manual_seed(0)
    x = torch.randn(shape)
    grad = torch.randn(shape)
    eager, fused = PAIRS[name](shape)
    load = timing.Load.start(torch.get_num_threads())
    times = timing.interleaved_times(
        {"fused": call_fn(fused, x, grad, mode), "eager": call_fn(eager, x, grad, mode)}, "cpu",
        args.min_run_time, args.rounds)
    spread = timing.ratio_spread(times, "eager", "fused")
    row = {"module": name, "shape": list(shape), "mode": mode.name,
           "eager_us": timing.median(times["eager"]) * 1e6,
           "fused_us": timing.median(times["fused"]) * 1e6,
           "speedup_vs_eager": timing.ratio(times, "eager", "fused"),
           "spread_vs_eager": spread, "noisy": spread > args.noise_threshold}
    timing.mark_busy(row, load.stop())
    return row


COLUMNS = [
    report.Column("module", "module", text=True),
    report.Column("shape", "shape", report.shape_text),
    report.Column("mode", "mode", text=True),
    report.Column("eager_us", "eager us", "{:.1f}"),
    report.Column("fused_us", "fused us", "{:.1f}"),
    report.Column("speedup_vs_eager", "eager/fused", "{:.2f}x"),
    report.Column("spread_vs_eager", "spread", "{:.0%}"),
    report.Column("flags", "flags", text=True),
]
SUMMARY_COLUMNS = [
    report.Column("module", "module", text=True),
    report.Column("mode", "mode", text=True),
    report.Column("speedup_vs_eager", "eager/fused: geomean (min-max)", report.stats_text),
    report.Column("slower", "slower rows"),
]


def summarize(rows):
    """Per module and mode, over the shapes."""
    groups = {}
    for row in rows:
        groups.setdefault((row["module"], row["mode"]), []).append(row)
    return [{"module": module, "mode": mode,
             "speedup_vs_eager": report.stats([r["speedup_vs_eager"] for r in group]),
             "slower": sum(r["speedup_vs_eager"] < 1 for r in group)}
            for (module, mode), group in groups.items()]


def render(rows, load, args, markdown):
    verdict = timing.noise_verdict(load, rows, args.noise_threshold)
    lines = [report.row_table(rows, COLUMNS, markdown), "",
             "eager/fused: PyTorch's µs per call over fused_bn's (above 1: fused_bn costs less). "
             "flags: SLOWER = fused_bn costs more; noisy = per-round ratios spread more than "
             f"{args.noise_threshold:.0%}; busy = other processes used the CPUs it needed.", "",
             report.table(summarize(rows), SUMMARY_COLUMNS, markdown), "",
             f"{load.describe()}."]
    lines += [f"RATIOS NOT TRUSTWORTHY: {line}" for line in verdict]
    return "\n".join(lines)


def main(args, argv):
    if args.threads is None:
        torch.set_num_threads(1)
    load = timing.Load.start(torch.get_num_threads())
    rows = []
    start = time.perf_counter()
    for name in PAIRS:
        for shape in SHAPES:
            for mode in MODES:
                row = run_row(name, shape, mode, args)
                rows.append(row)
                print(f"[{len(rows)} {time.perf_counter() - start:.0f}s] {name} "
                      f"{list(shape)} {mode.name}: eager {row['eager_us']:.1f} us, fused "
                      f"{row['fused_us']:.1f} us ({row['speedup_vs_eager']:.2f}x)",
                      file=sys.stderr, flush=True)
    load.stop()
    print(render(rows, load, args, markdown=False))
    command = "python -m benchmarks" + "".join(f" {a}" for a in argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "load": dataclasses.asdict(load),
                       "rows": rows, "summary": summarize(rows)}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# fused_bn host overhead per call\n\nCommand: `{command}`\n\n"
                    + render(rows, load, args, markdown=True) + "\n")
