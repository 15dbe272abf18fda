"""The fused activations and the residual add, against PyTorch's module pair.

``BatchNormActXd(C, activation=a)(x, residual)`` must equal
``a_module(nn.BatchNormXd(C)(x) + residual)`` in value and in every gradient, and leave
the running statistics as ``nn.BatchNormXd`` does, for every activation, in train and
eval, in every layout.
"""

import math

import pytest
import torch
from conftest import TOLERANCE, TORCH_BN, layout_input
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fused_bn
from fused_bn.activations import ACTIVATIONS, Activation, activation_of

FUSED_ACT = {1: fused_bn.BatchNormAct1d, 2: fused_bn.BatchNormAct2d, 3: fused_bn.BatchNormAct3d}

# (name, parameters, the PyTorch module): every activation, some with
# non-default parameters.
CASES = [
    ("identity", {}, nn.Identity()),
    ("relu", {}, nn.ReLU()),
    ("relu6", {}, nn.ReLU6()),
    ("hardtanh", {"min_val": -0.5, "max_val": 0.8}, nn.Hardtanh(-0.5, 0.8)),
    ("leaky_relu", {"negative_slope": 0.2}, nn.LeakyReLU(0.2)),
    ("silu", {}, nn.SiLU()),
    ("hardswish", {}, nn.Hardswish()),
    ("elu", {"alpha": 0.7}, nn.ELU(0.7)),
]
CASE_IDS = [name for name, _, _ in CASES]
SHAPES = {1: (6, 5), 2: (4, 5, 3, 7), 3: (2, 5, 3, 2, 3)}


def make_pair(kind, name, params, activation_module, dtype=torch.float64, seed=0):
    """(PyTorch BatchNorm, activation module) and the fused module, with equal random
    parameters and running statistics."""
    torch.manual_seed(seed)
    channels = SHAPES[kind][1]
    reference = TORCH_BN[kind](channels)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
        reference.running_mean.uniform_(-0.2, 0.2)
        reference.running_var.uniform_(0.5, 1.5)
    fused = FUSED_ACT[kind](channels, activation=name, **params)
    fused.load_state_dict(reference.state_dict())
    return reference.to(dtype), activation_module, fused.to(dtype)


def run_both(reference, activation, fused, x, residual, grad):
    """Outputs and gradients (input, residual, weight, bias) of both."""
    results = []
    for module, forward in (
        (reference, lambda x, r: activation(reference(x) + r if r is not None else reference(x))),
        (fused, lambda x, r: fused(x, r)),
    ):
        x_leaf = x.detach().clone().requires_grad_()
        r_leaf = residual.detach().clone().requires_grad_() if residual is not None else None
        y = forward(x_leaf, r_leaf)
        wanted = [x_leaf, module.weight, module.bias] + ([r_leaf] if r_leaf is not None else [])
        grads = torch.autograd.grad(y, wanted, grad)
        results.append((y.detach(), grads))
    return results


@pytest.mark.parametrize("name,params,activation", CASES, ids=CASE_IDS)
@pytest.mark.parametrize(
    "kind,layout",
    [(kind, layout) for kind in (1, 2, 3) for layout in ("contiguous", "channels_last", "strided")
     if not (kind == 1 and layout == "channels_last")],  # channels_last: 4-D and 5-D only
)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_matches_pytorch_pair_in_float64(
    name, params, activation, kind, layout, training, with_residual
):
    reference, activation, fused = make_pair(kind, name, params, activation)
    reference.train(training)
    fused.train(training)
    shape = SHAPES[kind]
    x = layout_input(shape, layout, torch.float64)
    residual = layout_input(shape, layout, torch.float64, seed=3) if with_residual else None
    grad = layout_input(shape, "contiguous", torch.float64, seed=5)
    (y_ref, grads_ref), (y, grads) = run_both(reference, activation, fused, x, residual, grad)
    tolerance = TOLERANCE[torch.float64]
    torch.testing.assert_close(y, y_ref, **tolerance)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tolerance)
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, buffer), getattr(reference, buffer), **tolerance)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last if kind == 2
                               else torch.channels_last_3d)


def _near_a_kink(y, name, params, tolerance):
    """Where the activation's derivative jumps within `tolerance` of y: there a rounding
    step decides the branch, in PyTorch's pair as in the fused op."""
    kinks = {
        "relu": [0.0], "relu6": [0.0, 6.0], "leaky_relu": [0.0], "elu": [0.0],
        "hardtanh": [params.get("min_val", -1.0), params.get("max_val", 1.0)],
        "hardswish": [-3.0, 3.0],
    }.get(name, [])
    near = torch.zeros_like(y, dtype=torch.bool)
    for kink in kinks:
        near |= (y - kink).abs() <= tolerance
    return near


@pytest.mark.parametrize("name,params,activation", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_reduced_precision_within_tolerance(name, params, activation, dtype, layout, with_residual):
    """float32/bfloat16/float16 against the float64 pair (float32 parameters for the
    half types, as mixed precision has them). Gradients are compared away from the
    activations' kinks, where one rounding step picks the branch."""
    reference64, activation, fused64 = make_pair(2, name, params, activation)
    fused = make_pair(2, name, params, activation)[2].float()
    shape = (8, 5, 6, 6)
    x = layout_input(shape, layout, torch.float64)
    residual = layout_input(shape, layout, torch.float64, seed=3) if with_residual else None
    grad = layout_input(shape, "contiguous", torch.float64, seed=5)
    (y_ref, grads_ref), _ = run_both(reference64, activation, fused64, x, residual, grad)
    x_low = x.to(dtype)
    r_low = residual.to(dtype) if residual is not None else None
    x_leaf = x_low.detach().clone().requires_grad_()
    r_leaf = r_low.detach().clone().requires_grad_() if r_low is not None else None
    y = fused(x_leaf, r_leaf)
    wanted = [x_leaf] + ([r_leaf] if r_leaf is not None else [])
    grads = torch.autograd.grad(y, wanted, grad.to(dtype))
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), y_ref, **tolerance)
    # The pre-activation of the reference, to find the kinks.
    pre = reference64(x) + (residual if residual is not None else 0)
    away = ~_near_a_kink(pre.detach(), name, params, 0.05)
    expected = [grads_ref[0]] + ([grads_ref[3]] if residual is not None else [])
    for g, g_ref in zip(grads, expected):
        # grad_input mixes every element of its channel: compare channels whose
        # elements are all away from a kink; grad_residual elementwise.
        keep = away if g is not grads[0] else away.all(dim=(0, 2, 3), keepdim=True).expand_as(away)
        torch.testing.assert_close(g.double()[keep], g_ref[keep], **tolerance)


@pytest.mark.parametrize("name,params,activation", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(name, params, activation, training):
    """First and second derivatives in float64 with respect to input, residual, weight and
    bias, away from the kinks (inputs are shifted so no pre-activation sits on one)."""
    act = Activation.of(name, **params)
    torch.manual_seed(1)
    channels = 3
    running_mean = torch.randn(channels, dtype=torch.float64) * 0.1
    running_var = torch.rand(channels, dtype=torch.float64) + 0.5
    x = (torch.randn(4, channels, 5, dtype=torch.float64) * 1.3 + 0.37).requires_grad_()
    residual = (torch.randn(4, channels, 5, dtype=torch.float64) * 0.2).requires_grad_()
    weight = (torch.rand(channels, dtype=torch.float64) + 0.5).requires_grad_()
    bias = (torch.randn(channels, dtype=torch.float64) * 0.1).requires_grad_()

    def fn(x, residual, weight, bias):
        return fused_bn.functional.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, training=training,
            activation=act, residual=residual,
        )

    inputs = (x, residual, weight, bias)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-5, rtol=1e-4)


@given(
    name=st.sampled_from(ACTIVATIONS),
    shape=st.lists(st.integers(0, 4), min_size=2, max_size=4).map(tuple),
    training=st.booleans(),
    with_residual=st.booleans(),
    slope=st.floats(-2, 2, allow_nan=False),
)
def test_any_shape_matches_pytorch(name, shape, training, with_residual, slope):
    """Random shapes (zeros and ones in every dimension) against the float64 pair."""
    params = {"hardtanh": (slope - 1, slope + 1), "leaky_relu": (slope,), "elu": (abs(slope),)}
    act = Activation(name, params.get(name, ()))
    x = torch.randn(shape, dtype=torch.float64)
    channels = shape[1]
    residual = torch.randn(shape, dtype=torch.float64) if with_residual else None
    values_per_channel = shape[0] * math.prod(shape[2:])  # F.batch_norm's count
    if training and values_per_channel == 1:
        return  # PyTorch raises; test_errors covers it
    running = (torch.zeros(channels, dtype=torch.float64),
               torch.ones(channels, dtype=torch.float64))
    expected_stats = tuple(t.clone() for t in running)
    expected = torch.nn.functional.batch_norm(x, *expected_stats, training=training)
    expected = act.function(expected + residual if with_residual else expected)
    actual = fused_bn.functional.batch_norm(
        x, *running, training=training, activation=act, residual=residual
    )
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float64])
    for stat, expected_stat in zip(running, expected_stats):
        torch.testing.assert_close(stat, expected_stat, **TOLERANCE[torch.float64])


# The factor act'(NaN) of fused_bn's activations: PyTorch's scalar rule for each
# (a NaN passes every "is it below/above the kink" test as false).
NAN_SLOPE = {"leaky_relu": 0.2, "silu": math.nan}


@pytest.mark.parametrize("name,params,activation", CASES, ids=CASE_IDS)
def test_nan_and_inf_propagate_as_in_pytorch(name, params, activation):
    """Forward: NaN and +-inf give PyTorch's outputs. Backward in eval: PyTorch's gradients
    at the infinities; at NaN, PyTorch's own kernels disagree with each other (ReLU6 and
    Hardtanh pass no gradient in their vectorized loop but do in its scalar tail;
    Hardswish and ELU give NaN in float64's vector loop and 1 in float32's), so fused_bn
    follows the scalar rule everywhere: NaN is below or above no kink."""
    reference, activation, fused = make_pair(2, name, params, activation)
    reference.eval()
    fused.eval()
    x = layout_input(SHAPES[2], "contiguous", torch.float64)
    x[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    grad = torch.ones_like(x)
    (y_ref, grads_ref), (y, grads) = run_both(reference, activation, fused, x, None, grad)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    nan = x.isnan()
    torch.testing.assert_close(grads[0][~nan], grads_ref[0][~nan], equal_nan=True)
    scale = (fused.weight * (fused.running_var + fused.eps).rsqrt()).detach()
    expected_at_nan = NAN_SLOPE.get(name, 1.0) * scale[0]
    torch.testing.assert_close(grads[0][nan], expected_at_nan.expand(1), equal_nan=True)


def test_activation_arguments():
    assert str(fused_bn.BatchNormAct2d(3).activation) == "relu"
    module = fused_bn.BatchNormAct2d(3, activation="leaky_relu", negative_slope=0.3)
    assert module.activation == Activation("leaky_relu", (0.3,))
    assert "activation=leaky_relu(negative_slope=0.3)" in repr(module)
    assert fused_bn.BatchNormAct2d(3, activation=nn.Hardtanh(-2, 3)).activation == Activation(
        "hardtanh", (-2.0, 3.0))
    assert activation_of(nn.ReLU6()) == Activation("relu6")
    assert activation_of("elu") == Activation("elu", (1.0,))
    assert isinstance(Activation("elu", (0.5,)).module(), nn.ELU)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_bn.BatchNormAct2d(3, activation="gelu")
    with pytest.raises(ValueError, match="GELU cannot be fused"):
        fused_bn.BatchNormAct2d(3, activation=nn.GELU())
    with pytest.raises(TypeError, match="has no parameter"):
        fused_bn.BatchNormAct2d(3, activation="relu", negative_slope=0.1)
    with pytest.raises(ValueError, match="max_val must be greater than min_val"):
        Activation("hardtanh", (1.0, 1.0))
    with pytest.raises(TypeError):
        fused_bn.BatchNorm2d(3, activation="relu")  # nn.BatchNorm2d's constructor


def test_residual_must_match_the_input():
    module = fused_bn.BatchNormReLU2d(3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="residual of shape"):
        module(x, torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        module(x, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])


def test_residual_gradient_is_the_activation_gradient():
    """grad_residual is grad_output times the activation's derivative: exactly the
    gradient that reaches the BatchNorm output."""
    module = fused_bn.BatchNormAct2d(3, activation="silu").double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    residual = torch.randn_like(x).requires_grad_()
    y = module(x, residual)
    grad = torch.randn_like(y)
    (grad_residual,) = torch.autograd.grad(y, residual, grad)
    pre = torch.nn.functional.batch_norm(x, None, None, module.weight, module.bias, True) + residual
    pre = pre.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.nn.functional.silu(pre), pre, grad)
    torch.testing.assert_close(grad_residual, expected)


@pytest.mark.parametrize("name", ["silu", "leaky_relu", "hardswish"])
def test_compile_fullgraph(name):
    module = fused_bn.BatchNormAct2d(4, activation=name)
    reference = fused_bn.BatchNormAct2d(4, activation=name)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    residual = torch.randn(3, 4, 5, 5)
    y = compiled(x, residual)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(x_ref, residual)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(module.running_var, reference.running_var)


def test_forward_ad_and_vmap_with_residual():
    """Under forward-mode AD and torch.func the modules compute with PyTorch's ops: same
    values and tangents as the pair."""
    module = fused_bn.BatchNormAct2d(3, activation="elu").double().eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    residual = torch.randn_like(x)
    tangent = torch.randn_like(x)
    out, jvp = torch.func.jvp(lambda r: module(x, r), (residual,), (tangent,))
    pre = module.eval()(x, None)  # identity check is below; ELU of (bn(x) + r)
    assert pre.shape == x.shape
    expected_pre = torch.nn.functional.batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias, False
    ) + residual
    torch.testing.assert_close(out, torch.nn.functional.elu(expected_pre))
    slope = torch.where(expected_pre > 0, torch.ones_like(expected_pre), expected_pre.exp())
    torch.testing.assert_close(jvp, tangent * slope)
