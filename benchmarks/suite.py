"""Benchmark cases, the rows they run in, and the per-row measurements.

Each row times one op on one input with fused_bn, PyTorch eager and (for the
ops in --compile-ops) torch.compile of the eager modules, compiled afresh for
the row and checked to stay compiled (compiled.py). The implementations take
turns in interleaved rounds (timing.py); a row reports the median times, the
speedups, how much the per-round speedups spread (its noise), the minor page
faults of one step and, for backward ops, the bytes autograd keeps for it.

With --verbose a row also times a copy of the same tensor and a copy far
larger than the caches in the same rounds, and reports the bandwidth of the
fused op by the minimum-bytes count (the bytes the op must move at least:
every input read once, every output written once) against both.
"""

import dataclasses
import functools
import glob
import itertools
import sys
import time

import torch
from torch import nn

import fused_bn

from . import compiled, timing
from .shapes import SHAPE_SETS, layer_counts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("contiguous", "channels_last")
DROPOUT_P = 0.1


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    description: str
    activation: str  # of the BatchNorm ops; "" for dropout
    training: bool
    backward: bool
    # passes over the tensor the op needs at least: forward reads x and
    # writes y; backward reads what it needs and writes grad_input
    min_passes: int
    residual: bool = False  # act(bn(x) + r), r a parameter of the same shape as x

    @property
    def is_dropout(self):
        return self.name.startswith("dropout")


OPS = {
    op.name: op
    for op in [
        Op("bn_relu_fwd_train", "BatchNorm+ReLU forward, training", "relu", True, False, 2),
        Op("bn_relu_fwd_eval", "BatchNorm+ReLU forward, eval", "relu", False, False, 2),
        Op("bn_relu_fwd_bwd", "BatchNorm+ReLU forward+backward, training", "relu", True, True, 5),
        Op("bn_fwd_bwd", "BatchNorm forward+backward, training", "identity", True, True, 5),
        *[Op(f"bn_{act}_fwd_bwd", f"BatchNorm+{act} forward+backward, training", act, True,
             True, 5) for act in ("relu6", "leaky_relu", "silu", "hardswish", "elu")],
        # forward reads x, r and writes y; backward reads x, r, dy, writes dx, dr
        Op("bn_add_relu_fwd_bwd", "relu(BatchNorm + residual) forward+backward, training", "relu",
           True, True, 8, residual=True),
        Op("dropout_fwd", f"Dropout(p={DROPOUT_P}) forward, training", "", True, False, 2),
        Op("dropout_fwd_bwd", f"Dropout(p={DROPOUT_P}) forward+backward", "", True, True, 4),
    ]
}
# The ops that stand for the layers of a named shape set (shapes.py).
LAYER_OPS = ("bn_relu_fwd_bwd", "bn_fwd_bwd")
# The other fused activations and the residual tail (issue: every fusable pair).
ACTIVATION_OPS = tuple(name for name, op in OPS.items()
                       if op.activation not in ("", "identity") and name != "bn_relu_fwd_bwd"
                       and name.endswith("_fwd_bwd"))


def available_ops():
    has_dropout = hasattr(fused_bn, "Dropout")
    return [name for name, op in OPS.items() if has_dropout or not op.is_dropout]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Rows: every op x shape x dtype x layout (channels_last only for 4D/5D shapes).

    A shape is a tuple of sizes, the name of a shape set or a SetShape; a set's
    shapes get only the LAYER_OPS rows that stand for some of its layers.
    """

    ops: tuple
    shapes: tuple
    dtypes: tuple = ("float32",)
    layouts: tuple = LAYOUTS


ALL_OPS = tuple(OPS)
FULL_SHAPES = ((32, 64, 56, 56), (32, 256, 14, 14), (32, 512, 7, 7), (256, 1024), (4096, 512),
               (32, 128, 1000))
# --full: the grid of the earlier default table
FULL = (Grid(ALL_OPS, FULL_SHAPES, ("float32", "bfloat16")),)
# --quick: the CI smoke run
QUICK = (Grid(ALL_OPS, ((4, 16, 8, 8), (64, 32), (4, 8, 50))),)


@dataclasses.dataclass(frozen=True)
class SetShape:
    """One shape of a named set, as a Grid shape: its rows are those of the set."""

    shape_set: str
    shape: tuple


def _layer(shape_set, *chw):
    """A shape of a named set, by (C, H, W)."""
    return SetShape(shape_set, next(
        s.shape for s in SHAPE_SETS[shape_set].layers if s.shape[1:] == chw))


# The default run (2-3 minutes with both malloc modes on 2 cores): every op on one
# large and one (N, C) shape, the bfloat16 BatchNorm+ReLU steps, and the
# forward+backward of real layers at batch 16 and 112 px: resnet50's from a large
# plane to small planes with many channels (its most frequent shape, [16,256,7,7],
# among them) and two of mobilenet_v2's.
DEFAULT = (
    Grid(tuple(op for op in ALL_OPS if op not in ACTIVATION_OPS), ((32, 64, 56, 56), (256, 1024))),
    Grid(ACTIVATION_OPS, ((32, 64, 56, 56),), layouts=("contiguous",)),
    Grid(("bn_relu_fwd_train", "bn_relu_fwd_bwd"), ((32, 64, 56, 56),), ("bfloat16",)),
    Grid(LAYER_OPS, tuple(_layer("resnet50", *chw) for chw in (
        (64, 28, 28), (256, 28, 28), (128, 14, 14), (256, 7, 7), (1024, 7, 7), (2048, 4, 4)))),
    Grid(LAYER_OPS, tuple(_layer("mobilenet_v2", *chw) for chw in ((144, 28, 28),
                                                                   (384, 7, 7)))),
)


@dataclasses.dataclass(frozen=True)
class Case:
    op: Op
    shape: tuple
    dtype: str
    layout: str
    device: str
    shape_set: str = ""  # the named set the shape comes from
    layers: int = 0  # layers of the set this row stands for

    def label(self):
        return f"{self.op.name} {list(self.shape)} {self.dtype} {self.layout} {self.device}"


def _set_counts(name):
    return {op: layer_counts(SHAPE_SETS[name], op) for op in LAYER_OPS}


def _shape_entries(shapes):
    """(shape, set name, {op: {shape: layers}}) for plain shapes, named sets and SetShapes."""
    for shape in shapes:
        if isinstance(shape, str):
            counts = _set_counts(shape)
            for layer in SHAPE_SETS[shape].layers:
                yield layer.shape, shape, counts
        elif isinstance(shape, SetShape):
            yield shape.shape, shape.shape_set, _set_counts(shape.shape_set)
        else:
            yield tuple(shape), "", None


def _layers(counts, op, shape):
    """The layers of a set that `op` on `shape` stands for (0 outside sets); None if none."""
    if counts is None or op not in counts:
        return 0
    return counts[op].get(shape) or None


def cases(grids, devices):
    """The Cases of `grids`, without duplicates, on each device."""
    seen = set()
    for device, grid in itertools.product(devices, grids):
        for (shape, set_name, counts), layout, dtype, op in itertools.product(
                _shape_entries(grid.shapes), grid.layouts, grid.dtypes, grid.ops):
            layers = _layers(counts, op, shape)
            key = (op, shape, dtype, layout, device)
            if layers is None or key in seen or (
                    layout == "channels_last" and len(shape) not in (4, 5)):
                continue
            seen.add(key)
            yield Case(OPS[op], shape, dtype, layout, device, set_name, layers)


def make_input(case):
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.shape, device=case.device, dtype=dtype)
    if case.layout == "channels_last":
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


class ResidualTail(nn.Module):
    """act(bn(x) + residual), the residual a parameter (so backward gives it a gradient):
    eager as PyTorch computes it, fused as one fused_bn call."""

    def __init__(self, batch_norm, activation, residual, fused):
        super().__init__()
        self.batch_norm, self.activation, self.fused = batch_norm, activation, fused
        self.residual = nn.Parameter(residual)

    def forward(self, x):
        if self.fused:
            return self.batch_norm(x, self.residual)
        return self.activation(self.batch_norm(x) + self.residual)


def batch_norm_modules(case):
    """(fused_bn module, eager equivalent) with the same parameters."""
    channels, dim = case.shape[1], len(case.shape)
    fused_cls = {2: fused_bn.BatchNormAct1d, 3: fused_bn.BatchNormAct1d,
                 4: fused_bn.BatchNormAct2d, 5: fused_bn.BatchNormAct3d}[dim]
    eager_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]
    activation = fused_bn.Activation.of(case.op.activation)
    fused, eager = fused_cls(channels, activation=activation), eager_cls(channels)
    act = activation.module()
    dtype = DTYPES[case.dtype]
    if case.op.residual:
        residual = make_input(case)
        fused = ResidualTail(fused, None, residual.clone(), fused=True)
        eager = ResidualTail(eager, act, residual, fused=False)
    elif case.op.activation != "identity":
        eager = nn.Sequential(eager, act)
    return fused.to(case.device, dtype), eager.to(case.device, dtype)


def modules(case):
    if case.op.is_dropout:
        return fused_bn.Dropout(DROPOUT_P), nn.Dropout(DROPOUT_P)
    return batch_norm_modules(case)


def step_fn(module, x, grad, op):
    """A callable running one step of `op` on `module`."""
    module.train(op.training)
    if op.backward:
        x = x.detach().requires_grad_()
        # autograd.grad, not backward(): accumulating into x.grad would add three
        # passes over the tensor to every implementation's step.
        inputs = (x, *[p for p in module.parameters() if p.requires_grad])

        def step():
            torch.autograd.grad(module(x), inputs, grad)

        return step

    def forward():
        with torch.no_grad():
            module(x)

    return forward


def saved_tensor_bytes(module, x, op):
    """Bytes of the distinct tensors autograd keeps for backward in one forward."""
    x = x.detach().requires_grad_()
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    module.train(op.training)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


# The memory-bandwidth copy moves at least this much, and at least
# MEMORY_COPY_CACHE_FACTOR times the last-level cache, so that it runs from memory
# (the factor also covers threads spread over a few separate L3 caches).
MEMORY_COPY_MIN_BYTES = 256 << 20
MEMORY_COPY_CACHE_FACTOR = 8
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def last_level_cache_bytes(device):
    """Size of the largest cache one CPU core (or the GPU) sees; 0 where unknown."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):  # Linux
        with open(path) as f:
            text = f.read().strip()  # e.g. "32768K"
        unit = _SIZE_UNITS.get(text[-1:], 1)
        sizes.append(int(text[:-1] if unit > 1 else text) * unit)
    return max(sizes)


@functools.cache
def memory_copy_buffers(device):
    """(source, destination) of the memory-bandwidth copy, allocated once per device."""
    nbytes = max(MEMORY_COPY_MIN_BYTES, MEMORY_COPY_CACHE_FACTOR * last_level_cache_bytes(device))
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return source, torch.empty_like(source)


def copy_GBps(source, ms):
    """Bandwidth of a copy of `source` that took `ms`, counting read + write."""
    return 2 * source.numel() * source.element_size() / (ms * 1e-3) / 1e9


def _median_ms(times, name):
    return timing.median(times[name]) * 1e3


def _bandwidth_columns(row, case, x, times, memory_src):
    """--verbose: the fused op's bandwidth against the copies timed in the same rounds."""
    row["copy_ms"] = _median_ms(times, "copy")
    min_bytes = case.op.min_passes * x.numel() * x.element_size()
    row["fused_GBps"] = min_bytes / (row["fused_ms"] * 1e-3) / 1e9
    row["pct_of_copy_bw"] = 100 * row["fused_GBps"] / copy_GBps(x, row["copy_ms"])
    row["memory_GBps"] = copy_GBps(memory_src, _median_ms(times, "memory_copy"))
    row["pct_of_memory_bw"] = 100 * row["fused_GBps"] / row["memory_GBps"]
    # Eager's time over the memory floor (the minimum bytes at the memory copy's bandwidth):
    # the speedup an implementation streaming from memory cannot exceed in this row.
    floor_ms = min_bytes / (row["memory_GBps"] * 1e9) * 1e3
    row["floor_speedup_vs_eager"] = row["eager_ms"] / floor_ms


def _add_compiled(steps, row, case, eager, x, grad):
    """Compiles the eager module afresh into steps["compile"]: True, or False with the
    reason in the row when it did not compile."""
    compiled.reset()
    step = step_fn(torch.compile(eager, fullgraph=True), x, grad, case.op)
    check = compiled.CompileCheck()
    start = time.perf_counter()
    try:
        step()  # compiles
        check.compiled()
    except Exception as error:  # any failure to compile is reported in the row, not fatal
        row["compile_error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        return False
    row["compile_s"] = round(time.perf_counter() - start, 1)
    steps["compile"] = step
    return True


def _speedups(row, times, threshold):
    for baseline in ("eager", "compile"):
        if baseline in times:
            row[f"speedup_vs_{baseline}"] = timing.ratio(times, baseline, "fused")
            row[f"spread_vs_{baseline}"] = timing.ratio_spread(times, baseline, "fused")
    row["noisy"] = max(row.get("spread_vs_eager", 0), row.get("spread_vs_compile", 0)) > threshold


def run_case(case, args):
    torch.manual_seed(0)
    x = make_input(case)
    grad = torch.randn_like(x)
    fused, eager = modules(case)
    row = {"op": case.op.name, "shape": list(case.shape), "dtype": case.dtype,
           "layout": case.layout, "device": case.device}
    if case.shape_set:
        row.update(shape_set=case.shape_set, layers=case.layers)
    steps = {"fused": step_fn(fused, x, grad, case.op), "eager": step_fn(eager, x, grad, case.op)}
    if args.verbose:
        copy_dst = torch.empty_like(x)
        memory_src, memory_dst = memory_copy_buffers(case.device)
        steps["copy"] = lambda: copy_dst.copy_(x)
        steps["memory_copy"] = lambda: memory_dst.copy_(memory_src)
    traced = None  # dynamo's counters after compiling: timing must not change them
    if case.op.name in args.compile_ops and _add_compiled(steps, row, case, eager, x, grad):
        traced = compiled.snapshot()
    load = timing.Load.start(torch.get_num_threads())
    times = timing.interleaved_times(steps, case.device, args.min_run_time, args.rounds)
    timing.mark_busy(row, load.stop())
    if traced is not None:
        try:
            compiled.check_unchanged(traced)
        except compiled.CompileFellBack as error:
            row["compile_error"] = str(error)
            del times["compile"]
    for name in ("fused", "eager", "compile"):
        if name in times:
            row[f"{name}_ms"] = _median_ms(times, name)
    _speedups(row, times, args.noise_threshold)
    if args.verbose:
        _bandwidth_columns(row, case, x, times, memory_src)
    row["faults_fused"] = timing.faults_per_call(steps["fused"], case.device)
    row["faults_eager"] = timing.faults_per_call(steps["eager"], case.device)
    if case.op.backward:
        row["saved_fused_MB"] = saved_tensor_bytes(fused, x, case.op) / 1e6
        row["saved_eager_MB"] = saved_tensor_bytes(eager, x, case.op) / 1e6
    return row


def _progress_line(i, total, elapsed, case, row):
    text = (f"[{i}/{total} {elapsed:.0f}s] {case.label()}: fused {row['fused_ms']:.3f} ms, "
            f"{row['speedup_vs_eager']:.2f}x eager")
    if "speedup_vs_compile" in row:
        text += f", {row['speedup_vs_compile']:.2f}x compile"
    if "compile_error" in row:
        text += f", compile fell back: {row['compile_error']}"
    return text


def run(args, progress=sys.stderr):
    """All rows of args.grids on args.devices."""
    all_cases = list(cases(args.grids, args.devices))
    rows = []
    start = time.perf_counter()
    for i, case in enumerate(all_cases, 1):
        row = run_case(case, args)
        rows.append(row)
        print(_progress_line(i, len(all_cases), time.perf_counter() - start, case, row),
              file=progress, flush=True)
    return rows
