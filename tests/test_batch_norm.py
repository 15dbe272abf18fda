"""fused_bn BatchNorm(+ReLU) modules against nn.BatchNormXd (+ nn.ReLU).

Every case trains a few steps and then evaluates, comparing outputs, input /
weight / bias gradients, running statistics and num_batches_tracked with
PyTorch run in float64 on the same values.
"""

import pytest
import torch
from conftest import BIAS_FALSE, TOLERANCE, layout_input, make_pair, reference_bn_module

SHAPES = [
    (16, 5),  # (N, C)
    (4, 3, 7),  # (N, C, L)
    (4, 3, 5, 6),
    (2, 3, 3, 4, 5),
    (6, 1, 4, 4),  # C = 1
    (1, 3, 4, 5),  # N = 1, spatial > 1
    (3, 2, 1, 1),  # spatial = 1
]


def layouts_for(shape):
    return ["contiguous", "strided"] + (["channels_last"] if len(shape) >= 4 else [])


CASES = [(shape, layout) for shape in SHAPES for layout in layouts_for(shape)]


def assert_close(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}"
    )


def run_and_compare(shape, layout, activation, dtype, steps=3, train=True, **options):
    reference, fused = make_pair(shape, activation, dtype=torch.float64, **options)
    fused = fused.to(dtype)
    reference.train(train)
    fused.train(train)
    ref_bn = reference_bn_module(reference)
    for step in range(steps):
        x = layout_input(shape, layout, dtype, seed=step)
        grad = layout_input(shape, "contiguous", dtype, seed=100 + step)
        x_ref = x.detach().double().requires_grad_()
        x_fused = x.detach().clone().requires_grad_()
        y_ref = reference(x_ref)
        y_fused = fused(x_fused)
        assert y_fused.dtype == dtype and y_fused.shape == x.shape
        assert_close(y_fused, y_ref, dtype, f"output (step {step})")
        y_ref.backward(grad.double())
        y_fused.backward(grad)
        assert_close(x_fused.grad, x_ref.grad, dtype, f"grad_input (step {step})")
        if ref_bn.weight is not None:
            assert_close(fused.weight.grad, ref_bn.weight.grad, dtype, "grad_weight")
        if ref_bn.bias is not None:
            assert_close(fused.bias.grad, ref_bn.bias.grad, dtype, "grad_bias")
        if ref_bn.running_mean is not None:
            assert_close(fused.running_mean, ref_bn.running_mean, dtype, "running_mean")
            assert_close(fused.running_var, ref_bn.running_var, dtype, "running_var")
            assert fused.num_batches_tracked.item() == ref_bn.num_batches_tracked.item()
    return reference, fused


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{lay}" for s, lay in CASES])
def test_float64_train_then_eval(shape, layout, activation):
    if shape[0] * (torch.Size(shape[2:]).numel()) == 1:
        pytest.skip("one value per channel cannot be trained (see test_errors)")
    run_and_compare(shape, layout, activation, torch.float64, train=True)
    run_and_compare(shape, layout, activation, torch.float64, train=False, steps=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("shape,layout", [((8, 6, 5, 7), "contiguous"),
                                          ((8, 6, 5, 7), "channels_last"),
                                          ((64, 33), "contiguous"), ((4, 6, 19), "strided")])
def test_reduced_precision(shape, layout, activation, dtype):
    run_and_compare(shape, layout, activation, dtype, steps=2)


OPTIONS = [
    dict(affine=False),
    BIAS_FALSE,
    dict(track_running_stats=False),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(affine=False, track_running_stats=False),
]


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (10, 4)])
def test_constructor_options(shape, options, activation):
    run_and_compare(shape, "contiguous", activation, torch.float64, steps=3, **options)
    run_and_compare(shape, "contiguous", activation, torch.float64, train=False, steps=1, **options)


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_eval_without_running_stats_uses_batch_statistics(activation):
    run_and_compare((6, 3, 4, 4), "channels_last", activation, torch.float64, train=False,
                    track_running_stats=False)


def test_mixed_precision_float32_parameters_with_bfloat16_input():
    import torch.nn.functional as F

    import fused_bn

    x = layout_input((8, 4, 5, 5), "channels_last", torch.bfloat16)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm_ref, rv_ref = rm.double(), rv.double()
    y = fused_bn.functional.batch_norm_relu(x, rm, rv, w, b, training=True)
    y_ref = F.relu(F.batch_norm(x.double(), rm_ref, rv_ref, w.double(), b.double(), True))
    assert not torch.equal(rm_ref, torch.zeros(4, dtype=torch.float64))
    assert y.dtype == torch.bfloat16 and rm.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "output")
    torch.testing.assert_close(rm.double(), rm_ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(rv.double(), rv_ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_output_layout_follows_input(activation):
    _, fused = make_pair((4, 3, 5, 5), activation)
    x = layout_input((4, 3, 5, 5), "channels_last", torch.float64).requires_grad_()
    y = fused(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_large_offset_statistics_are_stable():
    # x = 1e4 + N(0, 1) in float32: sum-of-squares formulas lose the variance.
    import fused_bn  # noqa: F401

    torch.manual_seed(0)
    for layout in ["contiguous", "channels_last"]:
        x64 = 1e4 + torch.randn(16, 8, 32, 32, dtype=torch.float64)
        x = x64.float()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        _, mean, invstd = torch.ops.fused_bn.batch_norm_act(
            x, None, None, None, None, None, True, 0.1, 1e-30, "identity"
        )
        x_exact = x.double()
        ref_mean = x_exact.mean(dim=(0, 2, 3))
        ref_var = x_exact.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(invstd.double().pow(-2), ref_var, rtol=1e-5, atol=0)


def test_empty_batch_matches_torch():
    for activation in ["identity", "relu"]:
        reference, fused = make_pair((0, 3, 4, 4), activation)
        ref_bn = reference_bn_module(reference)
        x = torch.randn(0, 3, 4, 4, dtype=torch.float64)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = reference(xr), fused(xf)
        assert yf.shape == yr.shape
        yr.sum().backward()
        yf.sum().backward()
        assert xf.grad.shape == xr.grad.shape
        torch.testing.assert_close(fused.weight.grad, ref_bn.weight.grad)
        torch.testing.assert_close(fused.running_mean, ref_bn.running_mean)
        torch.testing.assert_close(fused.running_var, ref_bn.running_var)
        assert fused.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 1
