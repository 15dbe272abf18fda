"""python -m benchmarks.models: the training step of whole models, eager vs fused_bn.

For each model, each variant (a registry: VARIANTS) gets its own copy of the
same initial model, and the variants' training steps (forward, cross-entropy
loss, backward, SGD step with momentum) take turns in interleaved rounds. The
table gives per model and variant the median step time, its speedup on eager,
the bytes autograd keeps for backward in one training forward (distinct
storages, parameters excluded) and the peak memory of a step (the most bytes
allocated at once during the step beyond those live when it began, from the
CPU allocator's events in torch.profiler; CUDA: torch.cuda.max_memory_allocated).

Models: the seed examples' MLP and CNN (examples/mlp_batchnorm.py,
examples/cnn_batchnorm.py, written with PyTorch's modules) and, where
torchvision is installed, its resnet18, resnet50, mobilenet_v2,
efficientnet_b0, densenet121, vgg11_bn and regnet_x_400mf, and timm's cspdarknet53
(timm_cspdarknet53) where timm is.

    python -m benchmarks.models                       # the default models
    python -m benchmarks.models --models resnet50 --batch 32 --size 224
    python -m benchmarks.models --models all --variants eager fused --json out.json
"""

import argparse
import copy
import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fused_bn

from . import allocator, compiled, report, timing
from .zoo import import_timm, import_torchvision


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a variant makes its model from a fresh copy of the eager one.

    `prepare(model)` returns (model, note): the note (e.g. what was converted)
    goes into the table. A compiled variant is checked to stay compiled.
    """

    name: str
    description: str
    prepare: Callable
    compiled: bool = False


def _fused(model):
    model, conversion = fused_bn.convert_model(model, inplace=True, return_report=True)
    return model, (f"{len(conversion.batch_norms)} BN, {conversion.activations_fused} with "
                   f"activation, {conversion.residuals_fused} with add")


def _fused_recompute(model):
    model, note = _fused(model)
    return fused_bn.recompute_activations(model), note + ", outputs recomputed"


VARIANTS = {v.name: v for v in [
    Variant("eager", "the model as built, PyTorch's modules", lambda model: (model, "")),
    Variant("fused", "fused_bn.convert_model(model)", _fused),
    Variant("recompute", "fused_bn.recompute_activations(fused_bn.convert_model(model))",
            _fused_recompute),
    Variant("compile", "torch.compile(model), eager modules", lambda model: (
        torch.compile(model), ""), compiled=True),
]}


def seed_mlp():
    """The BatchNorm MLP of examples/mlp_batchnorm.py (64-48-24-10, 8x8 digits)."""
    def hidden(width_in, width_out):
        return [nn.Linear(width_in, width_out, bias=False), nn.BatchNorm1d(width_out), nn.ReLU()]

    return nn.Sequential(*hidden(64, 48), *hidden(48, 24), nn.Linear(24, 10))


def seed_cnn():
    """The BatchNorm CNN of examples/cnn_batchnorm.py (1x8x8 digits), PyTorch's modules."""
    def block(channels_in, channels_out):
        return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels_out), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@dataclasses.dataclass(frozen=True)
class Model:
    build: Callable
    input_shape: Callable  # (batch, size) -> input shape
    classes: int
    batch: int  # default batch


def _torchvision(name):
    def build():
        return getattr(import_torchvision().models, name)()

    return Model(build, lambda batch, size: (batch, 3, size, size), 1000, 16)


def _timm(name):
    def build():
        return import_timm().create_model(name)

    return Model(build, lambda batch, size: (batch, 3, size, size), 1000, 16)


MODELS = {
    "mlp": Model(seed_mlp, lambda batch, size: (batch, 64), 10, 32),
    "cnn": Model(seed_cnn, lambda batch, size: (batch, 1, 8, 8), 10, 32),
    **{name: _torchvision(name) for name in
       ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "vgg11_bn",
        "regnet_x_400mf")},
    "timm_cspdarknet53": _timm("cspdarknet53"),
}
VISION = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "vgg11_bn",
          "regnet_x_400mf", "timm_cspdarknet53")
DEFAULT_MODELS = ("mlp", "cnn", "resnet18", "resnet50", "mobilenet_v2")


def training_step(model, x, target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def saved_for_backward_bytes(model, x, target):
    """Bytes of the distinct storages autograd keeps for backward in one training forward
    (and loss), parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), target)
    return sum(storages.values())


def peak_step_bytes(step, device):
    """The most bytes allocated at once during one call of `step` beyond those live when
    it began: the running sum of the allocator's events (torch.profiler on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        step()
    # The events of every allocation and free (negative) with their times; torch's own
    # FunctionEvent list folds those made inside an op into the op.
    events = sorted((e.start_ns(), e.nbytes()) for e in profile.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in events), initial=0))


def _optional(measure, *args):
    """measure(*args), or None where it fails (e.g. a variant that cannot be hooked)."""
    try:
        return measure(*args)
    except Exception as error:  # the table shows a gap; the reason goes to the log
        print(f"  {measure.__name__}: {type(error).__name__}: {error}", file=sys.stderr)
        return None


def prepare_variants(spec, variants, device, batch, size):
    """{variant: (step, model, note)} from copies of one initial model, after one step each
    (which compiles); compiled variants that did not compile are left out with a note."""
    torch.manual_seed(0)
    base = spec.build().to(device)
    x = torch.randn(spec.input_shape(batch, size), device=device)
    target = torch.randint(spec.classes, (x.shape[0],), device=device)
    prepared, failed = {}, {}
    for name in variants:
        variant = VARIANTS[name]
        model, note = variant.prepare(copy.deepcopy(base).train())
        step = training_step(model, x, target)
        check = compiled.CompileCheck()
        start = time.perf_counter()
        try:
            step()
            if variant.compiled:
                breaks = check.compiled(allow_graph_breaks=True)
                note = f"compiled in {time.perf_counter() - start:.0f} s" + (
                    f", {breaks} graph breaks" if breaks else "")
        except Exception as error:  # a variant that fails is reported, not fatal
            failed[name] = f"failed: {type(error).__name__}: {error}".splitlines()[0][:160]
            continue
        prepared[name] = (step, model, note)
    return prepared, failed, x, target


def run_model(name, args):
    """The rows (one per variant) of model `name`."""
    spec = MODELS[name]
    batch = args.batch or spec.batch
    compiled.reset()  # a fresh dynamo cache for each model
    prepared, failed, x, target = prepare_variants(spec, args.variants, args.device, batch,
                                                   args.size)
    traced = compiled.snapshot()
    steps = {variant: step for variant, (step, _, _) in prepared.items()}
    # prepare_variants made each variant's first step; sizing the blocks makes a second
    load = timing.Load.start(torch.get_num_threads())
    times = timing.interleaved_times(steps, args.device, args.min_run_time, args.rounds,
                                     warm_up=False)
    load.stop()
    try:
        compiled.check_unchanged(traced)
    except compiled.CompileFellBack as error:
        for variant in [v for v in times if VARIANTS[v].compiled]:
            failed[variant] = str(error)
            del times[variant]
    rows = []
    for variant in args.variants:
        row = {"model": name, "input": list(x.shape), "variant": variant}
        if variant in times:
            step, model, note = prepared[variant]
            row.update(step_ms=timing.median(times[variant]) * 1e3, note=note)
            if variant != "eager" and "eager" in times:
                row["speedup_vs_eager"] = timing.ratio(times, "eager", variant)
                row["spread_vs_eager"] = timing.ratio_spread(times, "eager", variant)
                row["noisy"] = row["spread_vs_eager"] > args.noise_threshold
                timing.mark_busy(row, load)
            saved = _optional(saved_for_backward_bytes, model, x, target)
            peak = _optional(peak_step_bytes, step, args.device)
            row.update({k: v / 1e6 for k, v in (("saved_MB", saved), ("peak_MB", peak))
                        if v is not None})
        else:
            row["note"] = failed.get(variant, "")
        rows.append(row)
    return rows


def _megabytes(value):
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


COLUMNS = [
    report.Column("model", "model", text=True),
    report.Column("input", "input", report.shape_text),
    report.Column("variant", "variant", text=True),
    report.Column("step_ms", "step ms", "{:.2f}"),
    report.Column("speedup_vs_eager", "vs eager", "{:.2f}x"),
    report.Column("saved_MB", "saved for backward MB", _megabytes),
    report.Column("peak_MB", "peak MB", _megabytes),
    report.Column("spread_vs_eager", "spread", "{:.0%}"),
    report.Column("flags", "flags", text=True),
    report.Column("note", "note", text=True),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--models", nargs="+", choices=[*MODELS, "all"],
                        help=f"default: {' '.join(DEFAULT_MODELS)} (those torchvision has "
                             "only where it is installed)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", type=int,
                        help="batch size (default: 32 for mlp and cnn, 16 for torchvision's)")
    parser.add_argument("--size", type=int, default=112,
                        help="image height and width for torchvision's models (default 112)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (torch.set_num_threads); default: torch's own count")
    parser.add_argument("--malloc", choices=allocator.MODES, default="default",
                        help="default (glibc's own settings, what users get) or steady "
                             "(freed blocks kept for reuse, see benchmarks/allocator.py)")
    parser.add_argument("--min-run-time", type=float, default=1.0,
                        help="seconds of timed steps per variant and model (default 1; at "
                             "least one step per round)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="turns the variants take, interleaved (default 5)")
    parser.add_argument("--noise-threshold", type=float, default=timing.NOISE_THRESHOLD)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--markdown", metavar="PATH")
    args = parser.parse_args(argv)
    if "eager" not in args.variants:
        parser.error("--variants must include eager (the baseline)")
    if args.models is None or args.models == ["all"]:
        args.models = list(MODELS if args.models else DEFAULT_MODELS)
        if import_torchvision() is None:
            args.models = [m for m in args.models if m not in VISION]
        elif import_timm() is None:
            args.models = [m for m in args.models if not m.startswith("timm_")]
    elif import_torchvision() is None and set(args.models) & set(VISION):
        parser.error("torchvision is not installed")
    elif import_timm() is None and any(m.startswith("timm_") for m in args.models):
        parser.error("timm is not installed")
    return args


def render(rows, load, args, markdown, malloc=""):
    lines = [report.row_table(rows, COLUMNS, markdown), "",
             "vs eager: eager's step time over the variant's (above 1: faster than eager). "
             "saved for backward: distinct storages autograd keeps in one training forward, "
             "parameters excluded. peak: the most bytes allocated at once during a step beyond "
             "those live when it began. flags: SLOWER = slower than eager; busy = other "
             "processes used CPUs its threads needed; noisy = per-round "
             f"ratios spread more than {args.noise_threshold:.0%}.", "",
             "Variants: " + "; ".join(f"{v}: {VARIANTS[v].description}" for v in args.variants)
             + ".", "",
             f"{load.describe()}" + (f"; malloc: {malloc}." if malloc else ".")]
    lines += [f"RATIOS NOT TRUSTWORTHY: {line}"
              for line in timing.noise_verdict(load, rows, args.noise_threshold)]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    malloc = allocator.configure(args.malloc)
    load = timing.Load.start(torch.get_num_threads())
    rows, start = [], time.perf_counter()
    for name in args.models:
        print(f"[{time.perf_counter() - start:.0f}s] {name}", file=sys.stderr, flush=True)
        rows += run_model(name, args)
    load.stop()
    print(render(rows, load, args, markdown=False, malloc=malloc))
    command = "python -m benchmarks.models" + "".join(f" {a}" for a in argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "malloc": malloc,
                       "load": dataclasses.asdict(load), "wall_s": time.perf_counter() - start,
                       "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# fused_bn: training steps of whole models\n\nCommand: `{command}`\n\n"
                    + render(rows, load, args, markdown=True, malloc=malloc) + "\n")


if __name__ == "__main__":
    main()
