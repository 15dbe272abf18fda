"""Regression tests for the defects of issue #18 ("PyTorch's numbers and errors on hostile
input — no crash, no silent wrong value, no state change"), one or more per item, each
named after what it checks and each comparing with PyTorch itself.

Calls that crashed the interpreter (SIGFPE, out-of-bounds writes) run in a separate
process (torch_parity.run_snippet), so that a crash fails the test instead of pytest.
The SyncBatchNorm items run on gloo process groups with the harness of
test_sync_batchnorm, whose timeouts turn a hang into a failure.
"""

import math
import re
import time

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from conftest import FUSED_BN, FUSED_BN_RELU, TOLERANCE, TORCH_BN, make_pair, reference_bn_module
from test_sync_batchnorm import run_distributed
from torch import nn
from torch_parity import (
    BATCH_NORM_OPERATOR,
    assert_close_to_torch,
    assert_same_error,
    assert_unchanged,
    outcome,
    run_snippet,
    snapshot,
)

import fused_bn
import fused_bn.functional as FF

ops = torch.ops.fused_bn
nan, inf = math.nan, math.inf


def torch_module(kind, activation, channels, **options):
    bn = TORCH_BN[kind](channels, **options)
    return nn.Sequential(bn, nn.ReLU()) if activation == "relu" else bn


def fused_module(kind, activation, channels, **options):
    return (FUSED_BN_RELU if activation == "relu" else FUSED_BN)[kind](channels, **options)


def assert_state_like(fused, reference, dtype, what=""):
    """Running statistics and num_batches_tracked of the fused module equal PyTorch's
    (NaN and Inf at the same places)."""
    ref_bn = reference_bn_module(reference)
    for key in ("running_mean", "running_var"):
        if getattr(ref_bn, key) is not None:
            assert_close_to_torch(getattr(fused, key), getattr(ref_bn, key),
                                  what=f"{what}{key}", **TOLERANCE[dtype])
    if ref_bn.num_batches_tracked is not None:
        assert fused.num_batches_tracked.item() == ref_bn.num_batches_tracked.item()


def forward_backward(module, x, grad):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad


def assert_matches_torch_step(reference, fused, x, grad, dtype):
    """One forward and backward of both modules on the same input: outputs, input gradient,
    parameter gradients and running statistics, NaN/Inf positions included."""
    y_ref, gx_ref = forward_backward(reference, x, grad)
    y, gx = forward_backward(fused, x, grad)
    tol = TOLERANCE[dtype]
    assert_close_to_torch(y, y_ref, what="output", **tol)
    assert_close_to_torch(gx, gx_ref, what="grad_input", **tol)
    ref_bn = reference_bn_module(reference)
    for name in ("weight", "bias"):
        if getattr(ref_bn, name) is not None:
            assert_close_to_torch(getattr(fused, name).grad, getattr(ref_bn, name).grad,
                                  what=f"grad_{name}", **tol)
    assert_state_like(fused, reference, dtype)


# ---- 1. NaN, Inf and overflowing batch variances -----------------------------------------


@pytest.mark.parametrize("value", [nan, inf, -inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_or_inf_in_batch_propagates_to_output_and_running_stats(value, activation, dtype):
    """Issue #18 item 1: the channel holding a NaN/Inf gets PyTorch's NaN/Inf output,
    running_mean (inf for +Inf) and running_var (NaN), not a variance of 0."""
    reference, fused = make_pair((4, 3, 5, 5), activation, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    x[1, 1, 2, 2] = value
    grad = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    assert_matches_torch_step(reference, fused, x, grad, dtype)


@pytest.mark.parametrize("value", [nan, inf, -inf], ids=["nan", "+inf", "-inf"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_statistics_of_nan_or_inf_batch_are_torchs(value, layout):
    """Issue #18 item 1, at the op: the (mean, invstd) batch_norm_act returns are those of
    torch.native_batch_norm (invstd NaN, not 1/sqrt(eps))."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    x[1, 1, 2, 2] = value
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    _, mean, invstd = ops.batch_norm_act(
        x, None, None, None, None, None, True, 0.1, 1e-5, "identity")
    _, ref_mean, ref_invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)
    assert_close_to_torch(mean, ref_mean, what="mean", atol=1e-6, rtol=1e-5)
    assert_close_to_torch(invstd, ref_invstd, what="invstd", atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e300), (torch.float32, 1e30)])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_overflowing_batch_variance_gives_torchs_results(dtype, scale, activation, layout):
    """Issue #18 item 1: data whose variance overflows (float64 near 1e300; float32 near
    1e30, where the sums stay finite) gives PyTorch's outputs (0 + bias: invstd = 0) and
    running_var = inf, not outputs near 1e303 and an unchanged running_var."""
    reference, fused = make_pair((4, 3, 5, 5), activation, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1) * scale
    x[:, 1] = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)  # one ordinary channel
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    assert_matches_torch_step(reference, fused, x, grad, dtype)


# ---- 2. eval-mode backward at NaN/Inf inputs ----------------------------------------------


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_backward_at_nan_or_inf_input_is_torchs(activation, dtype):
    """Issue #18 item 2: in eval the input gradient is g * w * invstd (masked by ReLU's
    `output > 0`, which passes NaN outputs); it does not depend on x, so it stays finite at
    a NaN/Inf input element, as in PyTorch."""
    reference, fused = make_pair((4, 3, 6), activation, dtype=dtype)
    reference.eval()
    fused.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64).to(dtype)
    x[1, 1, 2], x[2, 0, 1], x[0, 2, 3], x[3, 1, 5] = nan, inf, -inf, nan
    grad = torch.randn(4, 3, 6, generator=g, dtype=torch.float64).to(dtype)
    assert_matches_torch_step(reference, fused, x, grad, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_passes_the_gradient_where_its_output_is_nan_like_torch(training, dtype):
    """Issue #18 item 2 (ReLU part), in training as well: torch's ReLU backward blocks the
    gradient only where the output is <= 0, so it passes it where the output is NaN; the
    fused mask (pre-activation > 0) blocked it, which changes grad_bias (and, in eval,
    grad_input). Without running statistics, so that item 1 does not interfere."""
    reference, fused = make_pair((4, 3, 5), "relu", dtype=dtype, track_running_stats=False)
    reference.train(training)
    fused.train(training)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(dtype)
    x[2, 1, 3] = nan  # in training, the whole channel's output is NaN
    grad = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(dtype)
    assert_matches_torch_step(reference, fused, x, grad, dtype)


# ---- 3. eps <= 0 --------------------------------------------------------------------------


EPS_CASES = [(True, 0.0), (True, -1.0), (False, -1.0), (True, -0.0), (False, -1e-12)]


@pytest.mark.parametrize("training,eps", EPS_CASES)
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_non_positive_eps_raises_torchs_error_in_modules(training, eps, activation):
    """Issue #18 item 3: eps <= 0 in training (eps < 0 in eval) raises PyTorch's ValueError
    and changes nothing. (PyTorch's module has already counted the batch in
    num_batches_tracked when it raises; fused_bn changes nothing, which is better.)"""
    x = torch.randn(4, 3, 5, 5)
    reference = torch_module(2, activation, 3, eps=eps).train(training)
    fused = fused_module(2, activation, 3, eps=eps).train(training)
    before = snapshot(fused=fused, x=x)
    expected = outcome(reference, x)
    assert_same_error(expected, outcome(fused, x))
    assert_unchanged(before, fused=fused, x=x)


@pytest.mark.parametrize("training,eps", EPS_CASES)
def test_non_positive_eps_raises_torchs_error_in_functional(training, eps):
    """Issue #18 item 3, in fused_bn.functional.batch_norm: F.batch_norm's ValueError,
    running statistics untouched."""
    x = torch.randn(6, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    before = snapshot(rm=rm, rv=rv, x=x)
    expected = outcome(F.batch_norm, x, rm.clone(), rv.clone(), training=training, eps=eps)
    actual = outcome(FF.batch_norm, x, rm, rv, training=training, eps=eps)
    assert_same_error(expected, actual)
    assert_unchanged(before, rm=rm, rv=rv, x=x)


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_zero_eps_in_eval_is_accepted_like_torch(activation):
    """Issue #18 item 3, the other side: eps = 0 is valid in eval (PyTorch: non-negative)."""
    reference, fused = make_pair((4, 3, 5), activation, eps=0.0)
    reference.eval()
    fused.eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert_matches_torch_step(reference, fused, x, torch.ones_like(x), torch.float64)


# ---- 4. and 9. running statistics that require grad ----------------------------------------


@pytest.mark.parametrize("which", ["running_mean", "running_var", "both"])
@pytest.mark.parametrize("training", [False, True])
def test_running_stats_requiring_grad_raise_torchs_error_in_functional(which, training):
    """Issue #18 items 4 and 9: PyTorch refuses running statistics that require grad
    (the op is not differentiable with respect to them); fused_bn must not silently give
    them no gradient, nor update them before raising."""
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

    def stats():
        rm = torch.zeros(3, dtype=torch.float64).requires_grad_(which in ("running_mean", "both"))
        rv = torch.ones(3, dtype=torch.float64).requires_grad_(which in ("running_var", "both"))
        return rm, rv

    expected = outcome(F.batch_norm, x, *stats(), training=training)
    rm, rv = stats()
    before = snapshot(rm=rm, rv=rv, x=x)
    assert_same_error(expected, outcome(FF.batch_norm, x, rm, rv, training=training),
                      operator=BATCH_NORM_OPERATOR)
    assert_unchanged(before, rm=rm, rv=rv, x=x)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_running_stats_requiring_grad_raise_torchs_error_and_change_nothing(
    which, training, activation
):
    """Issue #18 items 4 and 9, in the modules: PyTorch's message; num_batches_tracked and
    the other running statistic are not updated before the error. (PyTorch's own module
    has incremented num_batches_tracked when it raises; fused_bn changes nothing.)"""
    reference = torch_module(1, activation, 3).train(training)
    fused = fused_module(1, activation, 3).train(training)
    getattr(reference_bn_module(reference), which).requires_grad_()
    getattr(fused, which).requires_grad_()
    x = torch.randn(6, 3)
    before = snapshot(fused=fused, x=x)
    assert_same_error(outcome(reference, x), outcome(fused, x), operator=BATCH_NORM_OPERATOR)
    assert_unchanged(before, fused=fused, x=x)


@pytest.mark.parametrize("training", [False, True])
def test_running_stats_requiring_grad_are_fine_under_no_grad(training):
    """Issue #18 item 4, the other side: without autograd recording, PyTorch accepts them."""
    reference, fused = make_pair((6, 3), "relu")
    reference.train(training)
    fused.train(training)
    for module in (reference_bn_module(reference), fused):
        module.running_mean.requires_grad_()
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        assert_close_to_torch(fused(x), reference(x), what="output", **TOLERANCE[torch.float64])
    assert_state_like(fused, reference, torch.float64)


# ---- 5. the ReLU mask of backward agrees with the output --------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("parameter_dtype", ["float32", "same"])
def test_relu_gradient_is_zero_where_the_eval_output_is_zero(dtype, parameter_dtype):
    """Issue #18 item 5: eval BN+ReLU with x equal to running_mean (and bias 0): where the
    output the user saw is 0, PyTorch's ReLU passes no gradient; neither may fused_bn
    (the recomputed pre-activation rounds to a tiny non-zero value in float32)."""
    param_dtype = torch.float32 if parameter_dtype == "float32" else dtype
    if dtype == torch.float64:
        param_dtype = torch.float64
    channels = 64
    g = torch.Generator().manual_seed(4)
    reference = torch_module(1, "relu", channels).to(param_dtype).eval()
    fused = fused_module(1, "relu", channels).to(param_dtype).eval()
    running_mean = torch.randn(channels, generator=g).to(dtype).to(param_dtype)
    values = dict(
        running_mean=running_mean,
        running_var=torch.rand(channels, generator=g).to(param_dtype) + 0.5,
        weight=torch.rand(channels, generator=g).to(param_dtype) + 0.5,
        bias=torch.zeros(channels, dtype=param_dtype),
    )
    with torch.no_grad():
        for module in (reference[0], fused):
            for name, value in values.items():
                getattr(module, name).copy_(value)
    x = running_mean.to(dtype).expand(37, channels).clone()
    x[::2] += torch.randn(19, channels, generator=g).to(dtype)  # ordinary rows as well
    grad = torch.ones_like(x)
    y_ref, gx_ref = forward_backward(reference, x, grad)
    y, gx = forward_backward(fused, x, grad)
    tol = TOLERANCE[dtype]
    assert_close_to_torch(y, y_ref, what="output", **tol)
    leaked = (y == 0) & (gx != 0)
    assert not leaked.any(), (
        f"{int(leaked.sum())} elements with output 0 received a gradient, e.g. "
        f"{gx[leaked][:5].tolist()} (PyTorch: {gx_ref[leaked][:5].tolist()})"
    )
    # Elsewhere the gradient is PyTorch's: g * weight * invstd where the output is > 0.
    passes = y > 0
    assert_close_to_torch(gx[passes], gx_ref[passes], what="grad_input", **tol)


# ---- 6. zero-size spatial dimensions (SIGFPE) -----------------------------------------------

ZERO_SPATIAL_MODULE = """
import torch
from torch import nn
import fused_bn

kind, activation, training, shape = {kind}, {activation!r}, {training}, {shape}
bn = {{1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}}[kind](3)
reference = nn.Sequential(bn, nn.ReLU()) if activation == "relu" else bn
family = {{"relu": "BatchNormReLU", "identity": "BatchNorm"}}[activation]
fused = getattr(fused_bn, f"{{family}}{{kind}}d")(3)
reference.train(training)
fused.train(training)
x = torch.randn(shape)
x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
y_ref, y = reference(x_ref), fused(x_fused)
assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, (y.shape, y_ref.shape)
y_ref.sum().backward()
y.sum().backward()
assert x_fused.grad.shape == x_ref.grad.shape
torch.testing.assert_close(fused.weight.grad, bn.weight.grad)
torch.testing.assert_close(fused.bias.grad, bn.bias.grad)
torch.testing.assert_close(fused.state_dict(), bn.state_dict())
print("same as torch")
"""


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize(
    "kind,shape", [(1, (2, 3, 0)), (2, (2, 3, 0, 5)), (3, (2, 3, 4, 0, 5)), (3, (1, 3, 0, 0, 0))]
)
def test_zero_size_spatial_dimension_does_not_crash(kind, shape, activation, training):
    """Issue #18 item 6: N > 0 with a zero-size spatial dimension: an empty output and
    zero parameter gradients as PyTorch, not SIGFPE. In a subprocess: it killed the
    interpreter."""
    code = ZERO_SPATIAL_MODULE.format(
        kind=kind, activation=activation, training=training, shape=shape
    )
    assert "same as torch" in run_snippet(code)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_functional_with_zero_size_spatial_dimension_does_not_crash(activation, training):
    """Issue #18 item 6: fused_bn.functional.batch_norm, as F.batch_norm (+ relu)."""
    code = f"""
    import torch
    import torch.nn.functional as F
    import fused_bn

    x = torch.randn(2, 3, 0, 4)
    rm, rv = torch.zeros(3), torch.ones(3)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = fused_bn.functional.batch_norm(x, rm, rv, w, b, training={training},
                                       activation={activation!r})
    y_ref = F.batch_norm(x, rm_ref, rv_ref, w, b, training={training})
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    torch.testing.assert_close((rm, rv), (rm_ref, rv_ref))
    print("same as torch")
    """
    assert "same as torch" in run_snippet(code)


ELEMT_OPS = {
    "batch_norm_act_elemt": "ops.batch_norm_act_elemt(x, w, b, mean, invstd, act)",
    "batch_norm_act_backward_elemt":
        "ops.batch_norm_act_backward_elemt(x, x, w, b, mean, invstd, mean, mean, act)",
    "batch_norm_act_backward_reduce":
        "ops.batch_norm_act_backward_reduce(x, x, w, b, mean, invstd, act)",
    "batch_norm_act_backward_eval":
        "ops.batch_norm_act_backward(x, x, w, b, mean, invstd, False, act)",
    "batch_norm_act_eval": "ops.batch_norm_act(x, w, b, mean, invstd, None, False, 0.1, 1e-5, act)",
}


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("op", list(ELEMT_OPS))
def test_ops_with_zero_size_spatial_dimension_do_not_crash(op, activation):
    """Issue #18 item 6, the ops SyncBatchNorm and the modules build on: element-wise
    results are empty like the input, per-channel sums of nothing are 0."""
    code = f"""
    import torch
    import fused_bn

    ops = torch.ops.fused_bn
    x = torch.randn(2, 3, 0, 4)
    w, b, mean, invstd = torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 1
    act = {activation!r}
    result = {ELEMT_OPS[op]}
    results = result if isinstance(result, (tuple, list)) else (result,)
    first = results[0]
    if first.dim() == 4:
        assert first.shape == x.shape and first.dtype == x.dtype, first.shape
        per_channel = results[1:]
    else:
        per_channel = results
    if {op!r} != "batch_norm_act_eval":
        for t in per_channel:  # sums of an empty set, and parameter gradients of nothing
            assert torch.equal(t, torch.zeros_like(t)), t
    print("no crash")
    """
    assert "no crash" in run_snippet(code)


# ---- 7. per-channel arguments are validated before memory is touched ---------------------

UPDATE_RUNNING_STATS = """
import torch
import fused_bn

short, guard = {short!r}, 7.0
buffers = {{}}
def per_channel(name, n, fill):
    # An n-element view at the start of a larger buffer full of `guard`.
    buffer = torch.full((n + 4,), guard)
    buffer[:n] = fill
    buffers[name] = buffer
    return buffer[:n]

C = 5
lengths = {{name: (3 if name in short else C) for name in ("rm", "rv", "mean", "invstd")}}
rm = per_channel("rm", lengths["rm"], 0.0)
rv = per_channel("rv", lengths["rv"], 1.0)
mean = per_channel("mean", lengths["mean"], 0.5)
invstd = per_channel("invstd", lengths["invstd"], 2.0)
before = {{name: b.clone() for name, b in buffers.items()}}
nbt = torch.tensor(3)
try:
    torch.ops.fused_bn.update_running_stats_(rm, rv, nbt, mean, invstd, 0.1, 1e-5, 8)
except RuntimeError as error:
    print("raised:", error)
for name, buffer in buffers.items():
    n = lengths[name]
    assert torch.equal(buffer[n:], before[name][n:]), (
        f"wrote past the end of the {{n}}-element view {{name}}: {{buffer.tolist()}}")
for name, buffer in buffers.items():
    assert torch.equal(buffer, before[name]), f"{{name}} changed: {{buffer.tolist()}}"
assert nbt.item() == 3, "num_batches_tracked changed"
print("untouched")
"""


@pytest.mark.parametrize(
    "short",
    [("rv", "invstd"), ("rm", "mean"), ("rm", "rv"), ("mean", "invstd"), ("rm",), ("rv",),
     ("mean",), ("invstd",)],
    ids="-".join,
)
def test_update_running_stats_rejects_mismatched_lengths_before_writing(short):
    """Issue #18 item 7: running statistics, batch mean and invstd of different lengths
    (3-element views of larger buffers, C = 5 for the others) raise before anything is read
    or written; nothing past the views changes (running_var and invstd both of 3 elements
    with C = 5 elsewhere: two elements past the view were overwritten). In a subprocess: an
    out-of-bounds write may crash."""
    output = run_snippet(UPDATE_RUNNING_STATS.format(short=list(short)))
    assert "raised:" in output, f"update_running_stats_ accepted the lengths: {output}"
    assert "untouched" in output


def test_update_running_stats_on_strided_views_writes_only_the_views():
    """Issue #18 item 7 (contiguity): strided running statistics are updated as contiguous
    ones would be, and the elements between them are left alone."""
    mean, invstd = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 1.0, 0.5])
    storage = torch.full((12,), 7.0)
    rm, rv = storage[0::4], storage[1::4]
    rm.fill_(0.0)
    rv.fill_(1.0)
    dense_rm, dense_rv = torch.zeros(3), torch.ones(3)
    ops.update_running_stats_(rm, rv, None, mean, invstd, 0.1, 1e-5, 8)
    ops.update_running_stats_(dense_rm, dense_rv, None, mean, invstd, 0.1, 1e-5, 8)
    assert torch.equal(rm, dense_rm) and torch.equal(rv, dense_rv)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[0::4] = untouched[1::4] = False
    assert torch.equal(storage[untouched], torch.full((6,), 7.0))


PER_CHANNEL_OPS = {
    "batch_norm_act_eval": (
        "ops.batch_norm_act(x, a['weight'], a['bias'], a['mean'], a['invstd'], None, False, "
        "0.1, 1e-5, 'relu')",
        ("weight", "bias", "mean", "invstd")),
    "batch_norm_act_train": (
        "ops.batch_norm_act(x, a['weight'], a['bias'], a['mean'], a['invstd'], None, True, "
        "0.1, 1e-5, 'relu')",
        ("weight", "bias", "mean", "invstd")),
    "batch_norm_act_backward": (
        "ops.batch_norm_act_backward(g, x, a['weight'], a['bias'], a['mean'], a['invstd'], True, "
        "'relu')", ("weight", "bias", "mean", "invstd")),
    "batch_norm_act_elemt": (
        "ops.batch_norm_act_elemt(x, a['weight'], a['bias'], a['mean'], a['invstd'], 'relu')",
        ("weight", "bias", "mean", "invstd")),
    "batch_norm_act_backward_reduce": (
        "ops.batch_norm_act_backward_reduce(g, x, a['weight'], a['bias'], a['mean'], a['invstd'], "
        "'relu')", ("weight", "bias", "mean", "invstd")),
    "batch_norm_act_backward_elemt": (
        "ops.batch_norm_act_backward_elemt(g, x, a['weight'], a['bias'], a['mean'], a['invstd'], "
        "a['mean_dy'], a['mean_dy_xmu'], 'relu')",
        ("weight", "bias", "mean", "invstd", "mean_dy", "mean_dy_xmu")),
}


@pytest.mark.parametrize("op", list(PER_CHANNEL_OPS))
def test_ops_reject_per_channel_arguments_of_the_wrong_length(op):
    """Issue #18 item 7, every op: a per-channel argument with 3 elements for C = 5 input
    (a view of a larger buffer, so that an unchecked read or write stays in memory) raises
    a RuntimeError and leaves the buffer as it was. In a subprocess."""
    call, names = PER_CHANNEL_OPS[op]
    code = f"""
    import torch
    import fused_bn

    ops = torch.ops.fused_bn
    C = 5
    x, g = torch.randn(4, C, 3), torch.randn(4, C, 3)
    def full(fill, n=C):
        return torch.full((n,), fill)
    good = dict(weight=full(1.5), bias=full(0.5), mean=full(0.1), invstd=full(2.0),
                mean_dy=full(0.3), mean_dy_xmu=full(0.2))
    for name in {names!r}:
        a = dict(good)
        buffer = torch.full((8,), 7.0)
        a[name] = buffer[:3]
        try:
            {call}
        except RuntimeError as error:
            print(name, "raised:", error)
        else:
            print(name, "ACCEPTED")
        assert torch.equal(buffer, torch.full((8,), 7.0)), (name, buffer)
    print("done")
    """
    output = run_snippet(code)
    assert "done" in output
    accepted = [line for line in output.splitlines() if "ACCEPTED" in line]
    assert not accepted, f"{op} accepted per-channel arguments of the wrong length: {accepted}"


# ---- 8. and 10. SyncBatchNorm: mismatches between ranks, all ranks commit or none -----------

GLOO_INTERNALS = re.compile(r"gloo|timed out|timeout|connection (closed|reset)|enforce", re.I)
MISMATCH_DEADLINE_S = 30  # well below the harness's 60 s collective timeout


def _rank_case(rank, case):
    """(module, input, backward?) of `rank` in a mismatch case; rank 1 is the odd one."""
    torch.manual_seed(rank)
    odd = rank == 1
    module = fused_bn.SyncBatchNormReLU(3)
    x = torch.randn(4, 3, 5)
    backward = False
    if case == "input_channels" and odd:
        x = torch.randn(4, 4, 5)
    elif case == "num_features" and odd:
        module, x = fused_bn.SyncBatchNormReLU(4), torch.randn(4, 4, 5)
    elif case == "dtype_between_ranks":
        backward = True
        if odd:
            module, x = module.double(), x.double()
    elif case == "float64_weight" and odd:
        module.weight = nn.Parameter(module.weight.detach().double())
    elif case == "float64_input" and odd:
        x = x.double()
    return module, x.requires_grad_(), backward


def mismatch_step(rank, world_size, case):
    module, x, backward = _rank_case(rank, case)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    start = time.monotonic()
    error = None
    try:
        y = module(x)
        if backward:
            y.backward(torch.ones_like(y))
    except Exception as e:  # noqa: BLE001 - the test inspects it
        error = (type(e).__name__, str(e))
    return dict(
        error=error,
        seconds=time.monotonic() - start,
        before=before,
        after={k: v.clone() for k, v in module.state_dict().items()},
    )


def local_torch_error(case):
    """What PyTorch raises on the odd rank's call alone (single process), if anything."""
    module, x, _ = _rank_case(1, case)
    reference = nn.SyncBatchNorm(module.num_features).to(module.running_mean.dtype)
    if module.weight.dtype != reference.weight.dtype:
        reference.weight = nn.Parameter(reference.weight.detach().to(module.weight.dtype))
    return outcome(reference, x.detach())


def _changed(result):
    return any(not torch.equal(result["after"][k], v) for k, v in result["before"].items())


@pytest.mark.parametrize(
    "case",
    ["input_channels", "num_features", "dtype_between_ranks", "float64_weight", "float64_input"],
)
def test_sync_batchnorm_mismatch_between_ranks_is_a_clear_error_on_every_rank(tmp_path, case):
    """Issue #18 items 8 and 10: a rank with another channel count, num_features or dtype
    (input, module, or a float64 weight) makes every rank raise a clear error, in bounded
    time (no gloo abort of the peer, no timeout), and the ranks stay consistent: all
    commit the step or none does. A rank whose call is wrong on its own raises PyTorch's
    error for it."""
    results = run_distributed(tmp_path, 2, mismatch_step, case, timeout=90)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} did not raise"
        name, message = result["error"]
        assert name in ("RuntimeError", "ValueError"), f"rank {rank}: {name}: {message}"
        assert not GLOO_INTERNALS.search(message), (
            f"rank {rank} got a communication failure, not a clear error: {message}"
        )
        assert result["seconds"] < MISMATCH_DEADLINE_S, f"rank {rank} took {result['seconds']} s"
    changed = [_changed(r) for r in results]
    assert all(changed) or not any(changed), f"ranks diverged: state changed on {changed}"
    if case in ("input_channels", "float64_weight", "float64_input"):
        expected = local_torch_error(case)
        name, message = results[1]["error"]
        assert expected.raised
        assert name == type(expected.error).__name__ and str(expected.error) in message, (
            f"the odd rank raised {name}: {message}; PyTorch alone raises {expected.describe()}"
        )
        assert not any(changed), "a step that raised on a rank was committed"


def zero_size_spatial_rank(rank, world_size):
    shape = (2, 3, 0, 5) if rank == 0 else (2, 3, 4, 5)
    module = fused_bn.SyncBatchNormReLU(3).double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x.requires_grad_()
    y = module(x)
    y.backward(torch.ones_like(y))
    return dict(x=x.detach(), y=y.detach(), grad=x.grad, state=module.state_dict(),
                weight_grad=module.weight.grad)


def test_sync_batchnorm_rank_with_zero_size_spatial_dimension_does_not_crash(tmp_path):
    """Issue #18 item 6, synchronized: a rank with N > 0 but no values per channel adds
    nothing to the global batch; the result is BatchNorm+ReLU on the other rank's batch."""
    results = run_distributed(tmp_path, 2, zero_size_spatial_rank, timeout=90)
    reference = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).double()
    x = results[1]["x"].clone().requires_grad_()
    y = reference(x)
    y.backward(torch.ones_like(y))
    assert results[0]["y"].shape == (2, 3, 0, 5) and results[0]["grad"].shape == (2, 3, 0, 5)
    tol = TOLERANCE[torch.float64]
    torch.testing.assert_close(results[1]["y"], y.detach(), **tol)
    torch.testing.assert_close(results[1]["grad"], x.grad, **tol)
    for result in results:
        torch.testing.assert_close(result["state"], reference[0].state_dict(), **tol)
    total = results[0]["weight_grad"] + results[1]["weight_grad"]
    torch.testing.assert_close(total, reference[0].weight.grad, **tol)


# ---- 11. weight and running statistics of shape (C, 1) ------------------------------------


def _c_by_1_parameters(which, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=g, dtype=torch.float64)
    if which in ("weight", "weight_and_bias"):
        w = w.view(3, 1)
    if which in ("bias", "weight_and_bias"):
        b = b.view(3, 1)
    return x, w, b


def _with_activation(fn, activation):
    if activation == "relu":
        return lambda *a, **k: F.relu(fn(*a, **k))
    return fn


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["weight", "bias", "weight_and_bias"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_weight_and_bias_of_shape_c_by_1_are_accepted_like_torch(which, training, activation):
    """Issue #18 item 11: F.batch_norm accepts a weight/bias with C elements in shape (C, 1)
    (outside autograd); so must fused_bn (not "weight should contain 3 elements not 3"),
    with PyTorch's output and running statistics."""
    x, w, b = _c_by_1_parameters(which)

    def run(fn):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        return fn(x, rm, rv, w, b, training=training), rm, rv

    expected = outcome(run, _with_activation(F.batch_norm, activation))
    assert not expected.raised, f"test bug: {expected.describe()}"
    actual = outcome(run, lambda *a, **k: FF.batch_norm(*a, **k, activation=activation))
    assert not actual.raised, f"PyTorch accepts it, fused_bn {actual.describe()}"
    for name, got, want in zip(["output", "running_mean", "running_var"], actual.value,
                               expected.value):
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        assert_close_to_torch(got, want, what=name, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["weight", "bias", "weight_and_bias"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_weight_and_bias_of_shape_c_by_1_get_right_gradients_or_an_error(
    which, training, activation
):
    """Issue #18 item 11, under autograd: PyTorch's own backward fails here ("TensorAccessor
    expected 1 dims" or "returned an invalid gradient ... [3, 1]"), so fused_bn may do
    better: it may raise, but when it returns, the gradients are PyTorch's for the same
    parameters in shape (C,), shaped like the parameters."""
    x, w, b = _c_by_1_parameters(which)

    def run(fn, weight, bias):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        y = fn(xs, rm, rv, ws, bs, training=training)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape))
        return y, xs.grad, ws.grad, bs.grad

    expected = run(_with_activation(F.batch_norm, activation), w.flatten(), b.flatten())
    actual = outcome(run, lambda *a, **k: FF.batch_norm(*a, **k, activation=activation), w, b)
    if actual.raised:
        return  # as PyTorch: an error rather than a wrong gradient
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    for name, got, want, like in zip(names, actual.value, expected, (x, x, w, b)):
        assert got.shape == like.shape, f"{name}: shape {got.shape}, expected {like.shape}"
        assert_close_to_torch(got, want.view(like.shape), what=name, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_of_shape_c_by_1_work_like_flat_ones(which, training):
    """Issue #18 item 11, running statistics. Better than PyTorch: its CPU kernel rejects a
    (C, 1) running statistic with an internal error ("TensorAccessor expected 1 dims but
    tensor has 2") while it accepts (C, 1) weight and bias; fused_bn takes any shape of C
    elements for all four, and gives the results of flat (C,) statistics."""
    x = torch.randn(5, 3, 4)

    def stats(shaped):
        rm, rv = torch.zeros(3), torch.ones(3)
        if shaped and which == "running_mean":
            rm = rm.view(3, 1)
        elif shaped:
            rv = rv.view(3, 1)
        return rm, rv

    assert outcome(F.batch_norm, x, *stats(True), training=training).raised
    flat_rm, flat_rv = stats(False)
    expected = F.batch_norm(x, flat_rm, flat_rv, training=training)
    rm, rv = stats(True)
    assert_close_to_torch(FF.batch_norm(x, rm, rv, training=training), expected, what="output",
                          **TOLERANCE[torch.float32])
    assert (rm if which == "running_mean" else rv).shape == (3, 1)
    assert_close_to_torch(rm.flatten(), flat_rm, what="running_mean", **TOLERANCE[torch.float32])
    assert_close_to_torch(rv.flatten(), flat_rv, what="running_var", **TOLERANCE[torch.float32])


# ---- 12. empty float64 batch into a float32 module ----------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("kind,shape", [(1, (0, 3)), (2, (0, 3, 4, 4)), (3, (0, 3, 2, 2, 2))])
def test_empty_float64_batch_into_float32_module_is_like_torch(kind, shape, activation, training):
    """Issue #18 item 12: PyTorch returns an empty float64 output and zero parameter
    gradients (no mixed-dtype error: there is nothing to compute)."""
    reference = torch_module(kind, activation, 3).train(training)
    fused = fused_module(kind, activation, 3).train(training)
    x = torch.randn(shape, dtype=torch.float64)

    def run(module):
        xs = x.clone().requires_grad_()
        y = module(xs)
        y.sum().backward()
        return y, xs.grad

    expected = outcome(run, reference)
    assert not expected.raised, f"test bug: {expected.describe()}"
    actual = outcome(run, fused)
    assert not actual.raised, f"PyTorch returns an empty output, fused_bn {actual.describe()}"
    for got, want in zip(actual.value, expected.value):
        assert got.shape == want.shape and got.dtype == want.dtype, (got, want)
    ref_bn = reference_bn_module(reference)
    torch.testing.assert_close(fused.weight.grad, ref_bn.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(fused.bias.grad, ref_bn.bias.grad, rtol=0, atol=0)
    torch.testing.assert_close(fused.state_dict(), ref_bn.state_dict(), rtol=0, atol=0)


# ---- 13. forward-mode AD with a tangent on the running statistics only ---------------------


@pytest.mark.parametrize("which", ["running_mean", "running_var", "both"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_forward_ad_tangent_on_running_stats_only_is_like_torch(which, activation):
    """Issue #18 item 13: eval with a dual running_mean/running_var (no tangent on the
    input or parameters): PyTorch returns the output (its tangent is None: it treats the
    running statistics as constants); fused_bn raised "jvp is not implemented"."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
    rm = torch.randn(3, generator=g, dtype=torch.float64)
    rv = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    tangent = torch.randn(3, generator=g, dtype=torch.float64)

    def run(fn):
        with forward_ad.dual_level():
            m = forward_ad.make_dual(rm, tangent) if which != "running_var" else rm
            v = forward_ad.make_dual(rv, tangent.abs()) if which != "running_mean" else rv
            primal, out_tangent = forward_ad.unpack_dual(fn(x, m, v, training=False))
            return primal, out_tangent

    expected = outcome(run, lambda *a, **k: (F.relu if activation == "relu" else (lambda t: t))(
        F.batch_norm(*a, **k)))
    assert not expected.raised, f"test bug: {expected.describe()}"
    actual = outcome(run, lambda *a, **k: FF.batch_norm(*a, **k, activation=activation))
    assert not actual.raised, f"PyTorch returns the result, fused_bn {actual.describe()}"
    assert_close_to_torch(actual.value[0], expected.value[0], what="output",
                          **TOLERANCE[torch.float64])
    if expected.value[1] is None:
        assert actual.value[1] is None or not actual.value[1].any(), actual.value[1]
    else:
        assert_close_to_torch(actual.value[1], expected.value[1], what="tangent",
                              **TOLERANCE[torch.float64])


# ---- 14. batched second-order gradients ----------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_batched_second_order_gradients_are_torchs(training, activation):
    """Issue #18 item 14: autograd.grad(..., is_grads_batched=True) on a first-order
    gradient taken with create_graph=True (as gradgradcheck's batched check does) works
    and equals PyTorch's; fused_bn raised "Batching rule not implemented for aten::detach"."""
    reference, fused = make_pair((4, 3, 5), activation)
    reference.train(training)
    fused.train(training)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    vectors = torch.randn(3, 4, 3, 5, generator=g, dtype=torch.float64)

    def run(module):
        xs = x.clone().requires_grad_()
        (first,) = torch.autograd.grad(module(xs).pow(2).sum(), xs, create_graph=True)
        (second,) = torch.autograd.grad(first, xs, vectors, is_grads_batched=True)
        return second

    expected = outcome(run, reference)
    assert not expected.raised, f"test bug: {expected.describe()}"
    actual = outcome(run, fused)
    assert not actual.raised, f"PyTorch computes it, fused_bn {actual.describe()}"
    assert_close_to_torch(actual.value, expected.value, what="batched grad-of-grad",
                          atol=1e-8, rtol=1e-7)


# ---- 15. error types and wording ---------------------------------------------------------


@pytest.mark.parametrize("call", ["functional", "module", "functional_inplace"])
def test_dropout_nan_probability_raises_torchs_error(call):
    """Issue #18 item 15: p = nan raises PyTorch's RuntimeError (fused_bn: ValueError)."""
    x = torch.ones(4, 3)

    def run(functional, module):
        if call == "functional":
            return functional(x.clone(), nan)
        if call == "functional_inplace":
            return functional(x.clone(), nan, inplace=True)
        return module(nan)(x.clone())

    expected = outcome(run, F.dropout, nn.Dropout)
    assert_same_error(expected, outcome(run, FF.dropout, fused_bn.Dropout))


@pytest.mark.parametrize(
    "dtype", [torch.complex64, torch.complex128, torch.int64, torch.int32, torch.bool]
)
@pytest.mark.parametrize("call", ["functional", "module", "functional_inplace"])
def test_dropout_non_floating_input_raises_torchs_error(dtype, call):
    """Issue #18 item 15: complex input (and, beyond the issue, integer and bool input)
    raises PyTorch's exception type and message."""
    x = torch.ones(4, 3, dtype=dtype)

    def run(functional, module):
        if call == "functional":
            return functional(x.clone(), 0.5)
        if call == "functional_inplace":
            return functional(x.clone(), 0.5, inplace=True)
        return module(0.5)(x.clone())

    expected = outcome(run, F.dropout, nn.Dropout)
    assert_same_error(expected, outcome(run, FF.dropout, fused_bn.Dropout))


MIXED_DTYPES = [
    # (input dtype, parameter dtype, running-statistics dtype)
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.float16, torch.float16),
    (torch.float16, torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float32, torch.float32),
    (torch.float32, torch.float64, torch.float64),
    (torch.bfloat16, torch.float64, torch.float64),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_mixed_dtype_module_errors_are_torchs(dtypes, activation, training):
    """Issue #18 item 15: modules whose parameters have a dtype PyTorch does not combine
    with the input's raise PyTorch's message ("mixed dtype (CPU): expect parameter to have
    scalar type of Float", ...), and change nothing."""
    input_dtype, param_dtype, _ = dtypes
    reference = torch_module(2, activation, 3).to(param_dtype).train(training)
    fused = fused_module(2, activation, 3).to(param_dtype).train(training)
    x = torch.randn(2, 3, 4, 4).to(input_dtype)
    before = snapshot(fused=fused, x=x)
    expected = outcome(reference, x)
    assert expected.raised, f"test bug: PyTorch {expected.describe()}"
    assert_same_error(expected, outcome(fused, x))
    assert_unchanged(before, fused=fused, x=x)


STAT_DTYPES = [
    # (input, weight, running_mean, running_var): combinations PyTorch rejects
    (torch.float32, torch.float32, torch.float32, torch.float64),
    (torch.float32, torch.float32, torch.float64, torch.float32),
    (torch.bfloat16, None, torch.float32, torch.bfloat16),
    (torch.bfloat16, None, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),
    (torch.float16, torch.float32, torch.float16, torch.float16),
    (torch.float16, torch.float16, torch.float32, torch.float16),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtypes", STAT_DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_mixed_running_stat_dtypes_behave_like_torch(dtypes, training):
    """Issue #18 item 15: mixed dtypes among the input, weight and running statistics that
    F.batch_norm rejects are rejected with its exception and message (fused_bn accepted
    some, e.g. bfloat16 input with float32 running_mean and bfloat16 running_var)."""
    input_dtype, weight_dtype, rm_dtype, rv_dtype = dtypes
    x = torch.randn(4, 3, 5).to(input_dtype)
    w = None if weight_dtype is None else torch.ones(3, dtype=weight_dtype)

    def run(fn):
        rm, rv = torch.zeros(3, dtype=rm_dtype), torch.ones(3, dtype=rv_dtype)
        return fn(x, rm, rv, w, None, training=training)

    expected = outcome(run, F.batch_norm)
    actual = outcome(run, FF.batch_norm)
    assert expected.raised, f"test bug: PyTorch {expected.describe()}"
    assert_same_error(expected, actual)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("where", ["module_on_meta", "input_on_meta", "weight_on_meta"])
def test_meta_device_errors_are_torchs(where, training):
    """Issue #18 item 15: tensors on the meta device next to CPU ones raise PyTorch's
    message ("Tensor on device meta is not on the expected device cpu!")."""

    def run(cls):
        module = cls(3, device="meta" if where == "module_on_meta" else None).train(training)
        if where == "weight_on_meta":
            module.weight = nn.Parameter(torch.ones(3, device="meta"))
        x = torch.randn(4, 3, device="meta" if where == "input_on_meta" else None)
        return module(x)

    assert_same_error(outcome(run, nn.BatchNorm1d), outcome(run, fused_bn.BatchNorm1d))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "cls_name,shape", [("BatchNorm1d", (4, 0)), ("BatchNorm1d", (4, 0, 3)),
                       ("BatchNorm2d", (4, 0, 3, 3)), ("BatchNorm3d", (2, 0, 2, 2, 2))]
)
def test_zero_channels_give_an_empty_output(cls_name, shape, training):
    """Issue #18 item 15: a module with num_features = 0 on (N, 0, ...) input. Better than
    PyTorch: its empty-batch path indexes weight[0] and raises an IndexError from inside
    ("select(): index 0 out of range") for affine modules only; fused_bn returns the empty
    output (as PyTorch does for affine=False)."""
    x = torch.randn(shape)
    assert outcome(lambda: getattr(nn, cls_name)(0).train(training)(x)).raised
    assert getattr(nn, cls_name)(0, affine=False).train(training)(x).shape == shape
    assert getattr(fused_bn, cls_name)(0).train(training)(x).shape == shape
