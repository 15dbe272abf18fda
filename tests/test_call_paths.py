"""The host-side paths of a call: the direct entry points (fused_bn._C) against torch.ops,
the C++ backward node, and eval statistics from running statistics of any layout."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import fused_bn
from fused_bn import functional as Fb


class RecordOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def fused_op_calls(calls):
    return [f for f in calls if getattr(f, "namespace", None) == "fused_bn"]


@pytest.mark.parametrize("module", [fused_bn.BatchNormReLU2d(3), fused_bn.BatchNorm2d(3)])
@pytest.mark.parametrize("training", [True, False])
def test_torch_function_modes_see_the_op(module, training):
    module.train(training)
    x = torch.randn(2, 3, 4, 4)
    expected = module(x)  # the direct path
    with RecordOps() as mode:
        got = module(x)
    assert [str(f) for f in fused_op_calls(mode.calls)] == ["fused_bn.batch_norm_act.default"]
    if not training:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_dropout_under_a_mode_sees_the_op():
    x = torch.randn(4, 8)
    with RecordOps() as mode:
        Fb.dropout(x, 0.5, training=True)
    assert [str(f) for f in fused_op_calls(mode.calls)] == ["fused_bn.dropout.default"]


class Tagged(torch.Tensor):
    """A subclass with its own __torch_function__: it must see the op."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_see_the_op():
    Tagged.seen.clear()
    fused_bn.BatchNormReLU1d(4)(torch.randn(8, 4).as_subclass(Tagged))
    assert "fused_bn.batch_norm_act.default" in [str(f) for f in Tagged.seen]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_direct_and_op_paths_agree_bit_for_bit(training, activation):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for route in ("direct", "op"):
        module = fused_bn.BatchNormAct2d(5, activation=activation).double().train(training)
        with torch.no_grad():
            module.running_var.fill_(2.0)
        if route == "op":
            with RecordOps():
                y = module(x)
        else:
            y = module(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        results.append((y, gx, module.running_mean.clone(), module.running_var.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dropout_direct_path_draws_as_the_op_path():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    direct = Fb.dropout(x, 0.3, training=True)
    torch.manual_seed(3)
    with RecordOps():
        via_op = Fb.dropout(x, 0.3, training=True)
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)


def test_backward_node():
    module = fused_bn.BatchNormReLU1d(4).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = module(x, r)
    assert y.grad_fn.name() == "BatchNormActBackward"
    # Edges: input, residual, weight, bias.
    assert len(y.grad_fn.next_functions) == 4
    first = torch.autograd.grad(y.sum(), (x, r, module.weight), retain_graph=True)
    second = torch.autograd.grad(y.sum(), (x, r, module.weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
        y.sum().backward()


def test_backward_node_refuses_an_input_modified_in_place():
    module = fused_bn.BatchNormReLU1d(4)
    x = torch.randn(6, 4, requires_grad=True)
    h = x * 1
    y = module(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_backward_node_saves_through_saved_tensor_hooks():
    module = fused_bn.BatchNormReLU1d(4)
    x = torch.randn(6, 4, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    # input, weight, bias, mean, invstd (no residual)
    assert sorted(packed) == sorted([x.shape] + [torch.Size([4])] * 4)
    y.sum().backward()
    assert x.grad is not None


def test_forward_mode_direct_call_changes_nothing():
    module = fused_bn.BatchNormReLU1d(3)
    x = torch.randn(4, 3)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            fused_bn._C.batch_norm_act(
                dual, module.weight, module.bias, module.running_mean, module.running_var,
                module.num_batches_tracked, True, 0.1, 1e-5, "relu", [], None,
            )
    assert module.num_batches_tracked.item() == 0
    assert torch.equal(module.running_mean, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stats_layout", ["dense", "strided", "column"])
def test_eval_statistics_from_any_running_statistics(dtype, stats_layout):
    # The CPU loop (dense stats) and the general path (others) against PyTorch with dense
    # statistics, bit for bit (PyTorch's own result with strided statistics comes from
    # another, unfolded formula).
    C = 5
    x = torch.randn(3, C, 4, dtype=dtype)
    stats_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    base_mean = torch.randn(2 * C, dtype=stats_dtype)
    base_var = torch.rand(2 * C, dtype=stats_dtype) + 0.5
    if stats_layout == "dense":
        mean, var = base_mean[:C].clone(), base_var[:C].clone()
    elif stats_layout == "strided":
        mean, var = base_mean[::2], base_var[::2]
    else:
        mean, var = base_mean[:C].reshape(C, 1), base_var[:C].reshape(C, 1)
    dense_mean, dense_var = mean.reshape(C).contiguous(), var.reshape(C).contiguous()
    expected = nn.functional.batch_norm(x, dense_mean, dense_var, eps=1e-3)
    got = Fb.batch_norm(x, mean, var, eps=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
