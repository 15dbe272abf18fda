"""Cases aimed at the vectorized CPU kernels (csrc/cpu/batch_norm_kernel.cpp).

Vector tails and odd sizes, many channels with tiny planes, few channels with
large planes (the split path, data beyond the caches), thread-count
invariance, float32 precision with a large offset, the ReLU mask recomputed in
backward, and every compiled instruction-set variant. Each case is compared
with nn.BatchNormXd (+ nn.ReLU) in the same dtype and with a float64 reference,
forward and backward, in training and eval.
"""

import io
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import TORCH_BN, bn_kind, fused_class
from torch import nn

import fused_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (output, grads) tolerance against float64 and against torch in the same dtype.
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}



def in_layout(x, layout):
    """x (contiguous) as a tensor of the same values in `layout`."""
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return x.contiguous(memory_format=fmt)
    # non-contiguous: every other element of a twice-as-long last dim
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def layouts_for(shape):
    return ["contiguous", "non_contiguous"] + (["channels_last"] if len(shape) in (4, 5) else [])


def make_modules(channels, dim, activation, dtype, training, seed):
    """The fused module and torch's nn.BatchNormXd (+ nn.ReLU), same parameters."""
    gen = torch.Generator().manual_seed(seed)
    kind = bn_kind((1,) * dim)
    fused = fused_class(kind, activation)(channels)
    reference = TORCH_BN[kind](channels)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for module in (fused, reference):
        module.to(param_dtype)
    with torch.no_grad():
        weight = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
        bias = torch.randn(channels, generator=gen, dtype=torch.float64)
        running_mean = torch.randn(channels, generator=gen, dtype=torch.float64)
        running_var = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
        for module in (fused, reference):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
            module.running_mean.copy_(running_mean)
            module.running_var.copy_(running_var)
    reference = nn.Sequential(reference, nn.ReLU()) if activation == "relu" else reference
    fused.train(training)
    reference.train(training)
    return fused, reference


def forward_backward(module, x, grad):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad)
    bn = module[0] if isinstance(module, nn.Sequential) else module
    return {
        "output": y.detach(),
        "grad_input": x.grad,
        "grad_weight": bn.weight.grad,
        "grad_bias": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def assert_close(actual, expected, tolerance, what):
    for key in expected:
        torch.testing.assert_close(
            actual[key].double(), expected[key].double(), **tolerance,
            msg=lambda m, key=key: f"{what}: {key}: {m}",
        )


def check_against_references(
    shape, dtype, layout, activation, training, seed=0, offset=0.0, tolerance=None,
    torch_tolerance=None, compare_torch=True,
):
    """fused_bn against torch in `dtype` and against float64 torch, forward and backward."""
    gen = torch.Generator().manual_seed(seed)
    x64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype).double()
    grad64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    x, grad = in_layout(x64.to(dtype), layout), in_layout(grad64.to(dtype), layout)

    fused, reference = make_modules(shape[1], len(shape), activation, dtype, training, seed)
    _, reference64 = make_modules(shape[1], len(shape), activation, torch.float64, training, seed)
    result = forward_backward(fused, x, grad)
    case = f"{tuple(shape)} {dtype} {layout} {activation} training={training}"
    assert result["output"].dtype == dtype
    expected64 = forward_backward(reference64, x64, grad64)
    assert_close(result, expected64, tolerance or TOLERANCE[dtype], case + " vs float64")
    if compare_torch:
        expected = forward_backward(reference, x, grad)
        assert_close(result, expected, torch_tolerance or TOLERANCE[dtype], case + " vs torch")
    return result


# Sizes around the vector widths (8/16 floats, 4/8 doubles, 16/32 bf16): the
# NCHW planes and the channels-last rows end in partial vectors.
TAIL_SHAPES = [
    (2, 3, 5, 7),  # planes of 35
    (3, 5, 1, 1),  # (N, C) in effect, C below one vector
    (4, 17, 15),  # (N, C, L), L below one float vector
    (5, 33),  # rows of 33 channels
    (2, 3, 4, 5, 6),
    (1, 2, 3, 17),
]


@pytest.mark.parametrize("shape", TAIL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_tails_and_odd_sizes(shape, dtype, activation, training):
    for layout in layouts_for(shape):
        check_against_references(shape, dtype, layout, activation, training)


@pytest.mark.parametrize(
    "shape",
    [(4, 1000, 2, 2), (16, 2048), (2, 515, 3)],
    ids=["nchw_2x2", "mlp_2048", "ncl_3"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_many_channels_tiny_planes(shape, dtype, training):
    for layout in layouts_for(shape):
        check_against_references(shape, dtype, layout, "relu", training)


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((4, 2, 1024, 1024), "contiguous"),
        ((2, 3, 1024, 1024), "channels_last"),
        ((1, 1, 5, 1 << 20), "contiguous"),
    ],
    ids=["nchw_c2", "channels_last_c3", "one_channel"],
)
def test_large_planes_beyond_cache(shape, layout):
    # 16-32 MB per tensor in float32, few channels: blocks of a channel are
    # spread over the threads and the output pass streams from memory. torch's
    # own float32 reductions over millions of values per channel are off by
    # ~1e-3, which flips its ReLU mask where |y| < 1e-3: against torch without
    # the ReLU, loosely; against float64 with it, tightly.
    check_against_references(
        shape, torch.float32, layout, "identity", training=True,
        torch_tolerance=dict(atol=5e-3, rtol=5e-3),
    )
    check_against_references(
        shape, torch.float32, layout, "relu", training=True, compare_torch=False
    )


@pytest.mark.parametrize(
    "shape,layout",
    [((32, 64, 45, 47), "contiguous"), ((32, 67, 45, 45), "channels_last")],
    ids=["nchw_odd_planes", "channels_last_odd_rows"],
)
@pytest.mark.parametrize("training", [True, False])
def test_streamed_outputs_with_unaligned_vectors(shape, layout, training):
    # 17 MB of float32: every pass writes its output with non-temporal stores
    # where a whole vector is aligned (slab passes from 8 MB of output, passes
    # reading from memory from 16 MiB of input); odd planes and rows mix them
    # with plain and partial stores. Against float64 only: torch's float32
    # parameter gradients over ~68k values per channel are off by more than
    # TOLERANCE.
    check_against_references(shape, torch.float32, layout, "relu", training, compare_torch=False)


PAGE_BYTES = 4096


def page_distance(a, b):
    """Distance between the page offsets of two tensors' data, around the 4 KiB circle."""
    d = (a.data_ptr() - b.data_ptr()) % PAGE_BYTES
    return min(d, PAGE_BYTES - d)


def view_at(base, shape, layout, start):
    """A dense tensor of `shape` in `layout` whose data start `start` elements into base."""
    numel = math.prod(shape)
    if layout == "channels_last":
        n, c, h, w = shape
        return base[start:start + numel].view(n, h, w, c).permute(0, 3, 1, 2)
    return base[start:start + numel].view(shape)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_outputs_start_far_from_their_inputs_within_a_page(layout):
    # csrc/output_placement.h: outputs of 64 KiB and more start at the page
    # offset farthest from the inputs' (4K aliasing of loads and stores).
    # Inputs at several page offsets; the outputs must be ordinary tensors:
    # storage offset 0, exact storage size, 64-byte aligned, the strides of
    # empty_like(input), resizable and serializable, and the same values as
    # for a freshly allocated input.
    shape = (4, 32, 16, 16)
    numel = math.prod(shape)
    gen = torch.Generator().manual_seed(0)
    x_base = torch.randn(numel + 1024, generator=gen)
    g_base = torch.randn(numel + 1024, generator=gen)
    weight, bias = torch.rand(32, generator=gen) + 0.5, torch.randn(32, generator=gen)
    ops = torch.ops.fused_bn
    for x_start, g_start in [(0, 0), (16, 0), (100, 700), (512, 16), (1000, 480)]:
        x, grad = view_at(x_base, shape, layout, x_start), view_at(g_base, shape, layout, g_start)
        y, mean, invstd = ops.batch_norm_act(
            x, weight, bias, None, None, None, True, 0.1, 1e-5, "relu")
        grad_input = ops.batch_norm_act_backward(
            grad, x, weight, bias, mean, invstd, True, "relu")[0]
        dropped = ops.dropout(x, 0.3, torch.tensor([1, 2]), True)[0]
        # The farthest point of the circle from one offset is 2048 bytes away,
        # from two at least 1024; outputs stay on the 64-byte grid.
        assert page_distance(y, x) >= 2048 - 32 and page_distance(dropped, x) >= 2048 - 32
        assert page_distance(grad_input, x) >= 1024 - 32
        assert page_distance(grad_input, grad) >= 1024 - 32
        for out in (y, grad_input, dropped):
            assert out.storage_offset() == 0 and out.data_ptr() % 64 == 0
            assert out.untyped_storage().nbytes() == numel * 4
            assert out.stride() == torch.empty_like(x).stride()
        fresh = x.clone()
        expected_y = ops.batch_norm_act(
            fresh, weight, bias, None, None, None, True, 0.1, 1e-5, "relu")[0]
        assert torch.equal(y, expected_y)
        assert torch.equal(
            grad_input,
            ops.batch_norm_act_backward(
                grad.clone(), fresh, weight, bias, mean, invstd, True, "relu")[0],
        )
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), y)
    values = y.clone()
    y.resize_(2 * numel)
    in_memory_order = values.permute(0, 2, 3, 1) if layout == "channels_last" else values
    assert torch.equal(y[:numel], in_memory_order.reshape(-1))


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((32, 64, 45, 47), "contiguous"),
        ((64, 67, 45, 45), "channels_last"),
        ((9, 64, 9), "contiguous"),
    ],
    ids=["nchw_streamed", "channels_last_streamed", "small"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_reduced_precision_outputs_are_rounded_float32_results(shape, layout, dtype, activation):
    # bfloat16/float16 kernels load into float32, compute as the float32
    # kernels do (same blocks, same order) and round once when storing: the
    # outputs must equal the float32 kernels' results rounded to nearest even,
    # bit for bit. In the first two shapes (NCHW slabs: 8.7 MB of output;
    # channels-last rows: 17 MB of input) whole aligned vectors are written
    # with non-temporal stores, the odd plane and row ends with ordinary and
    # partial ones.
    gen = torch.Generator().manual_seed(0)
    x = in_layout(torch.randn(shape, generator=gen).to(dtype), layout)
    grad = in_layout(torch.randn(shape, generator=gen).to(dtype), layout)
    weight = torch.rand(shape[1], generator=gen) + 0.5
    bias = torch.randn(shape[1], generator=gen)
    ops = torch.ops.fused_bn
    y, mean, invstd = ops.batch_norm_act(
        x, weight, bias, None, None, None, True, 0.1, 1e-5, activation)
    y32, mean32, invstd32 = ops.batch_norm_act(
        x.float(), weight, bias, None, None, None, True, 0.1, 1e-5, activation)
    assert torch.equal(mean, mean32) and torch.equal(invstd, invstd32)
    assert torch.equal(y, y32.to(dtype))
    grads = ops.batch_norm_act_backward(grad, x, weight, bias, mean, invstd, True, activation)
    # The ReLU derivative follows the rounded output the user saw: where it
    # rounded to 0 (float16 underflow), no gradient passes.
    grad32 = grad.float().masked_fill(y == 0, 0) if activation == "relu" else grad.float()
    grads32 = ops.batch_norm_act_backward(
        grad32, x.float(), weight, bias, mean, invstd, True, activation)
    assert torch.equal(grads[0], grads32[0].to(dtype))
    assert torch.equal(grads[1], grads32[1]) and torch.equal(grads[2], grads32[2])


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((8, 64, 9, 9), "contiguous"),  # channel path with 1 and with 2 threads
        ((8, 3, 40, 40), "contiguous"),  # channel path with 1 thread, split path with 2
        # Channel slabs of 1 MB (x) and 2 MB (x and grad), beyond a core's L2:
        # 2 and 3 threads share every channel (split planes, uneven shares).
        ((16, 6, 130, 130), "contiguous"),
        ((8, 48, 10, 10), "channels_last"),
        ((300, 37), "contiguous"),
    ],
)
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_thread_count_does_not_change_results(shape, layout, activation, training):
    # Work is cut by shape only and partial results merged in a fixed order,
    # so results are bitwise equal for any thread count (eval's backward: one
    # pass that sums while it writes grad_input).
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(
                check_against_references(shape, torch.float32, layout, activation, training)
            )
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for key in results[0]:
            assert torch.equal(results[0][key], result[key]), key


@pytest.mark.parametrize(
    "shape,layout",
    [
        ((16, 4, 32, 32), "contiguous"),
        ((16, 4, 32, 32), "channels_last"),
        ((4096, 8), "contiguous"),
    ],
)
def test_float32_statistics_with_large_offset(shape, layout):
    # x = 1e4 + N(0, 1): naive float32 sums lose the variance entirely.
    gen = torch.Generator().manual_seed(0)
    x = in_layout((1e4 + torch.randn(shape, generator=gen, dtype=torch.float64)).float(), layout)
    dims = [0] + list(range(2, x.dim()))
    count = x.numel() // x.shape[1]
    mean64, var64 = x.double().mean(dims), x.double().var(dims, unbiased=False)

    mean, m2 = torch.ops.fused_bn.batch_norm_stats(x)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(m2.double() / count, var64, rtol=1e-5, atol=0)

    _, batch_mean, invstd = torch.ops.fused_bn.batch_norm_act(
        x, None, None, None, None, None, True, 0.1, 1e-5, "identity"
    )
    torch.testing.assert_close(batch_mean.double(), mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd.double(), (var64 + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    # The float32 mean itself is rounded by up to 5e-4 (half an ulp at 1e4),
    # which shifts the output (x * scale + shift, folded as torch does) and
    # grad_weight (sum of g * (x - mean)) by up to 5e-4 * scale and
    # 5e-4 * |sum g| * invstd. Only against float64: torch's own float32
    # channels-last statistics are off by ~1e-2 here.
    check_against_references(
        shape, torch.float32, layout, "identity", True, offset=1e4,
        tolerance=dict(atol=2e-2, rtol=1e-3), compare_torch=False,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_mask_in_backward_matches_forward_output(dtype, layout):
    # Inputs at and next to the running mean put many pre-activations at or
    # within rounding of 0; the gradient must flow exactly where the forward
    # output is positive (eval mode: grad_input = weight * invstd * grad there).
    channels = 19
    running_mean = torch.linspace(-1, 1, channels, dtype=torch.float64)
    steps = torch.tensor([-1e-6, -1e-7, 0.0, 1e-7, 1e-6], dtype=torch.float64)
    x = running_mean.view(1, channels, 1, 1) + steps.view(1, 1, 1, 5) * torch.ones(6, 1, 7, 1)
    x = in_layout(x.to(dtype), layout)
    module = fused_bn.BatchNormReLU2d(channels).to(
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    with torch.no_grad():
        module.running_mean.copy_(running_mean)
        module.weight.uniform_(0.5, 2.0)
    module.eval()
    x.requires_grad_()
    y = module(x)
    y.backward(torch.ones_like(y))
    assert (y > 0).any() and (y == 0).any()
    assert torch.equal(x.grad != 0, y > 0)


def compiled_capabilities():
    return fused_bn.build_info()["cpu_capabilities"]


def test_build_info_reports_cpu_capability():
    info = fused_bn.build_info()
    assert "default" in info["cpu_capabilities"]
    assert info["cpu_capability"] in info["cpu_capabilities"]


@pytest.mark.skipif(
    not (torch._C.has_openmp and sys.platform == "linux"), reason="torch without OpenMP"
)
def test_kernels_are_built_with_openmp():
    # at::parallel_for compiled without -fopenmp silently runs on one thread.
    assert fused_bn.build_info()["openmp"] is True


@pytest.mark.skipif(
    not (torch._C.has_openmp and sys.platform == "linux"), reason="torch without OpenMP"
)
def test_kernels_run_on_several_threads():
    # CPU time spent outside the calling thread (the other OpenMP thread's share
    # of the channels) shows that the kernel ran in parallel. Serial: ~0%; in
    # parallel the share is well above 5% even with a slow-waking worker.
    x = torch.randn(16, 64, 64, 64)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ops.fused_bn.batch_norm_stats(x)
        process, caller = time.process_time(), time.thread_time()
        for _ in range(20):
            torch.ops.fused_bn.batch_norm_stats(x)
        process, caller = time.process_time() - process, time.thread_time() - caller
    finally:
        torch.set_num_threads(previous)
    assert process - caller > 0.05 * process, (process, caller)


def run_with_capability(capability, *args):
    env = dict(os.environ, FUSED_BN_CPU_CAPABILITY=capability)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_cpu_capability(capability):
    if capability not in compiled_capabilities():
        pytest.skip(f"built without the {capability} kernels")
    probe = run_with_capability(
        capability, "-c", "import fused_bn; print(fused_bn.build_info()['cpu_capability'])"
    )
    if "does not support" in probe.stderr:
        pytest.skip(f"this CPU does not support {capability}")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == capability
    if capability == fused_bn.build_info()["cpu_capability"]:
        return  # the rest of this file runs with it
    # The kernel-specific cases of this file, with that copy of the kernels.
    # ... and the Dropout loops (Philox rounds and mask application), which
    # follow the same choice.
    dropout_tests = os.path.join(os.path.dirname(__file__), "test_dropout.py")
    run = run_with_capability(
        capability, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, dropout_tests,
        "-k", "tails_and_odd_sizes or relu_mask or large_offset or thread_count or documented_rule "
        "or forward_and_backward_are_exact or large_outputs or reduced_precision",
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_unknown_cpu_capability_is_a_clear_error():
    run = run_with_capability("sse9", "-c", "import fused_bn; fused_bn.build_info()")
    assert run.returncode != 0
    assert "FUSED_BN_CPU_CAPABILITY=sse9: expected one of default, avx2, avx512" in run.stderr
