"""Benchmark cases, timing and the per-row measurements.

Each row times one op on one input with fused_bn, PyTorch eager and
torch.compile of the eager modules (torch.utils.benchmark, median over
interleaved rounds), and reports
the achieved bandwidth by the minimum-bytes count (the bytes the op must move at
least: every input read once, every output written once) against the
bandwidth of a copy of the same tensor (copy_ into a preallocated tensor of the
same layout) and of a copy far larger than the caches (memory bandwidth), both
timed in the same rounds, and the minor page faults of a step.
"""

import dataclasses
import functools
import glob
import math
import sys
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.utils.benchmark as tbench
from torch import nn

import fused_bn

DEFAULT_SHAPES = [
    (32, 64, 56, 56),
    (32, 256, 14, 14),
    (32, 512, 7, 7),
    (256, 1024),
    (4096, 512),
    (32, 128, 1000),
]
QUICK_SHAPES = [(4, 16, 8, 8), (64, 32), (4, 8, 50)]
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
        Op("dropout_fwd", f"Dropout(p={DROPOUT_P}) forward, training", "", True, False, 2),
        Op("dropout_fwd_bwd", f"Dropout(p={DROPOUT_P}) forward+backward", "", True, True, 4),
    ]
}


def available_ops():
    has_dropout = hasattr(fused_bn, "Dropout")
    return [name for name, op in OPS.items() if has_dropout or not op.is_dropout]


@dataclasses.dataclass
class Case:
    op: Op
    shape: tuple
    dtype: str
    layout: str
    device: str

    def label(self):
        return f"{self.op.name} {list(self.shape)} {self.dtype} {self.layout} {self.device}"


def cases(ops, shapes, dtypes, layouts, devices):
    for device in devices:
        for shape in shapes:
            for layout in layouts:
                if layout == "channels_last" and len(shape) not in (4, 5):
                    continue
                for dtype in dtypes:
                    for op in ops:
                        yield Case(OPS[op], tuple(shape), dtype, layout, device)


def make_input(case):
    dtype = DTYPES[case.dtype]
    x = torch.randn(case.shape, device=case.device, dtype=dtype)
    if case.layout == "channels_last":
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


def batch_norm_modules(case):
    """(fused_bn module, eager equivalent) with the same parameters."""
    channels, dim = case.shape[1], len(case.shape)
    relu = case.op.activation == "relu"
    fused_cls = {
        (False, 2): fused_bn.BatchNorm1d, (False, 3): fused_bn.BatchNorm1d,
        (False, 4): fused_bn.BatchNorm2d, (False, 5): fused_bn.BatchNorm3d,
        (True, 2): fused_bn.BatchNormReLU1d, (True, 3): fused_bn.BatchNormReLU1d,
        (True, 4): fused_bn.BatchNormReLU2d, (True, 5): fused_bn.BatchNormReLU3d,
    }[(relu, dim)]
    eager_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dim]
    fused, eager = fused_cls(channels), eager_cls(channels)
    eager = nn.Sequential(eager, nn.ReLU()) if relu else eager
    dtype = DTYPES[case.dtype]
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


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """This process's minor page faults so far (0 where getrusage is unavailable)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def interleaved_medians(fns, device, min_run_time, rounds):
    """{name: median seconds per call} of the callables in `fns`.

    Each is timed in `rounds` turns of min_run_time / rounds, taking turns with
    the others (ABCABC...), and its turns are pooled into one median: the load
    of a shared machine changes over seconds, and timing one implementation
    after the other would put that change into the ratios between them.
    """
    measurements = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up (allocations, first-call dispatch)
    sync(device)
    for _ in range(rounds):
        for name, fn in fns.items():
            # torch.utils.benchmark times on one thread unless told otherwise.
            timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, label=name,
                                 num_threads=torch.get_num_threads())
            measurements[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds))
    return {name: tbench.Measurement.merge(m)[0].median for name, m in measurements.items()}


def faults_per_call(fn, device, calls=5):
    """Minor page faults per call of fn, in steady state (after timing)."""
    start = minor_faults()
    for _ in range(calls):
        fn()
    sync(device)
    return (minor_faults() - start) / calls


def run_case(case, args):
    torch.manual_seed(0)
    x = make_input(case)
    grad = torch.randn_like(x)
    copy_dst = torch.empty_like(x)
    fused, eager = modules(case)
    row = {
        "op": case.op.name,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "layout": case.layout,
        "device": case.device,
    }
    memory_src, memory_dst = memory_copy_buffers(case.device)
    steps = {
        "copy": lambda: copy_dst.copy_(x),
        "memory_copy": lambda: memory_dst.copy_(memory_src),
        "fused": step_fn(fused, x, grad, case.op),
        "eager": step_fn(eager, x, grad, case.op),
    }
    if case.op.name in args.compile_ops:
        steps["compile"] = step_fn(torch.compile(eager), x, grad, case.op)
        start = time.perf_counter()
        steps["compile"]()  # compiles
        row["compile_s"] = round(time.perf_counter() - start, 1)
    medians = interleaved_medians(steps, case.device, args.min_run_time, args.rounds)
    for name, seconds in medians.items():
        row[f"{name}_ms"] = seconds * 1e3
    row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
    if "compile_ms" in row:
        row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"]
    min_bytes = case.op.min_passes * x.numel() * x.element_size()
    row["fused_GBps"] = min_bytes / (row["fused_ms"] * 1e-3) / 1e9
    row["pct_of_copy_bw"] = 100 * row["fused_GBps"] / copy_GBps(x, row["copy_ms"])
    row["memory_GBps"] = copy_GBps(memory_src, row.pop("memory_copy_ms"))
    row["pct_of_memory_bw"] = 100 * row["fused_GBps"] / row["memory_GBps"]
    # Eager's time over the memory floor (the minimum bytes at the memory copy's bandwidth):
    # the speedup an implementation streaming from memory cannot exceed in this row.
    floor_ms = min_bytes / (row["memory_GBps"] * 1e9) * 1e3
    row["floor_speedup_vs_eager"] = row["eager_ms"] / floor_ms
    row["faults_fused"] = faults_per_call(steps["fused"], case.device)
    row["faults_eager"] = faults_per_call(steps["eager"], case.device)
    if case.op.backward:
        row["saved_fused_MB"] = saved_tensor_bytes(fused, x, case.op) / 1e6
        row["saved_eager_MB"] = saved_tensor_bytes(eager, x, case.op) / 1e6
    return row


def run(args, progress=sys.stderr):
    """All rows of the selected cases."""
    all_cases = list(cases(args.ops, args.shapes, args.dtypes, args.layouts, args.devices))
    rows = []
    start = time.perf_counter()
    for i, case in enumerate(all_cases, 1):
        row = run_case(case, args)
        rows.append(row)
        elapsed = time.perf_counter() - start
        print(
            f"[{i}/{len(all_cases)} {elapsed:.0f}s] {case.label()}: "
            f"fused {row['fused_ms']:.3f} ms, "
            f"{row['speedup_vs_eager']:.2f}x eager"
            + (
                f", {row['speedup_vs_compile']:.2f}x compile"
                if "speedup_vs_compile" in row
                else ""
            ),
            file=progress,
            flush=True,
        )
    return rows


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
