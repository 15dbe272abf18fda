"""Operator-level checks: opcheck, gradcheck, torch.compile and saved memory."""

import copy

import pytest
import torch
from conftest import layout_input
from torch import nn

import fused_bn

ops = torch.ops.fused_bn


def channel_params(channels, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, generator=g, dtype=torch.float64) * 0.3
    return weight.to(dtype), bias.to(dtype)


OPCHECK_INPUTS = [
    ((6, 4, 5, 5), "contiguous", torch.float32),
    ((6, 4, 5, 5), "channels_last", torch.float32),
    ((3, 4, 7), "strided", torch.float64),
    ((12, 4), "contiguous", torch.bfloat16),
    # 128 KiB: the CPU ops place such outputs within a page (output_placement.h)
    ((8, 16, 16, 16), "channels_last", torch.float32),
]


def sample_stats(x):
    mean, m2 = ops.batch_norm_stats(x)
    count = x.numel() // x.size(1)
    return mean, (m2 / count + 1e-5).rsqrt()


# (activation, activation_params): every activation kernel path (identity and
# ReLU are instantiated on their own, the others share one).
ACTIVATION_CASES = [
    ("identity", []),
    ("relu", []),
    ("leaky_relu", [0.2]),
    ("silu", []),
    ("hardtanh", [-0.5, 0.8]),
]


@pytest.mark.parametrize(
    "activation,params", ACTIVATION_CASES, ids=[a for a, _ in ACTIVATION_CASES]
)
@pytest.mark.parametrize("shape,layout,dtype", OPCHECK_INPUTS)
def test_opcheck_every_op(shape, layout, dtype, activation, params):
    x = layout_input(shape, layout, dtype)
    residual = layout_input(shape, layout, dtype, seed=7)
    C = shape[1]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    weight, bias = channel_params(C, param_dtype)
    weight.requires_grad_()
    bias.requires_grad_()
    x_grad = x.detach().clone().requires_grad_()
    for training in (True, False):
        for momentum, res in ((0.1, None), (None, residual)):
            running_mean = torch.zeros(C, dtype=param_dtype)
            running_var = torch.ones(C, dtype=param_dtype)
            tracked = torch.tensor(3)
            torch.library.opcheck(
                ops.batch_norm_act.default,
                (x_grad, weight, bias, running_mean, running_var, tracked, training, momentum,
                 1e-5, activation, params, res),
            )
    mean, invstd = sample_stats(x)
    grad_out = layout_input(shape, "contiguous", dtype, seed=5)
    for res, mask in ((None, [True, True, True, True]), (residual, [False, True, False, True])):
        torch.library.opcheck(
            ops.batch_norm_act_backward.default,
            (grad_out, x, weight.detach(), bias.detach(), mean, invstd, True, activation, params,
             res, mask),
        )
    torch.library.opcheck(ops.batch_norm_stats.default, (x,))
    torch.library.opcheck(
        ops.batch_norm_act_elemt.default,
        (x, weight.detach(), bias.detach(), mean, invstd, activation, params),
    )
    sum_dy, sum_dy_xmu = ops.batch_norm_act_backward_reduce(
        grad_out, x, weight.detach(), bias.detach(), mean, invstd, activation, params
    )
    torch.library.opcheck(
        ops.batch_norm_act_backward_reduce.default,
        (grad_out, x, weight.detach(), bias.detach(), mean, invstd, activation, params),
    )
    count = x.numel() // C
    torch.library.opcheck(
        ops.batch_norm_act_backward_elemt.default,
        (grad_out, x, weight.detach(), bias.detach(), mean, invstd, sum_dy / count,
         sum_dy_xmu / count, activation, params),
    )


@pytest.mark.parametrize("momentum", [0.1, None])
def test_opcheck_update_running_stats(momentum):
    x = layout_input((8, 3, 4), "contiguous", torch.float32)
    mean, invstd = sample_stats(x)
    torch.library.opcheck(
        ops.update_running_stats_.default,
        (torch.zeros(3), torch.ones(3), torch.tensor(2), mean, invstd, momentum, 1e-5, 32),
    )


def test_split_ops_compose_to_the_fused_op():
    # stats -> elemt and reduce -> elemt (the synchronized-BN path) equal the fused ops.
    x = layout_input((5, 3, 4, 6), "channels_last", torch.float64)
    weight, bias = channel_params(3)
    out, mean, invstd = ops.batch_norm_act(
        x, weight, bias, None, None, None, True, 0.1, 1e-5, "relu")
    stat_mean, m2 = ops.batch_norm_stats(x)
    count = x.numel() // 3
    torch.testing.assert_close(stat_mean, mean)
    torch.testing.assert_close((m2 / count + 1e-5).rsqrt(), invstd)
    torch.testing.assert_close(ops.batch_norm_act_elemt(x, weight, bias, mean, invstd, "relu"), out)
    dy = torch.randn_like(x)
    grad_input, grad_weight, grad_bias, _ = ops.batch_norm_act_backward(
        dy, x, weight, bias, mean, invstd, True, "relu"
    )
    sum_dy, sum_dy_xmu = ops.batch_norm_act_backward_reduce(
        dy, x, weight, bias, mean, invstd, "relu"
    )
    torch.testing.assert_close(sum_dy, grad_bias)
    torch.testing.assert_close(sum_dy_xmu * invstd, grad_weight)
    torch.testing.assert_close(
        ops.batch_norm_act_backward_elemt(
            dy, x, weight, bias, mean, invstd, sum_dy / count, sum_dy_xmu / count, "relu"
        ),
        grad_input,
    )


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "shape,layout",
    [((4, 3, 3, 2), "contiguous"), ((4, 3, 3, 2), "channels_last"), ((7, 2), "contiguous")],
)
def test_gradcheck(shape, layout, affine, training, activation):
    x = layout_input(shape, layout, torch.float64).requires_grad_()
    C = shape[1]
    weight, bias = channel_params(C)
    params = (weight.requires_grad_(), bias.requires_grad_()) if affine else (None, None)
    running_mean = torch.randn(C, dtype=torch.float64) * 0.1
    running_var = torch.rand(C, dtype=torch.float64) + 0.5

    def fn(x, *params):
        return fused_bn.functional.batch_norm(
            x, running_mean.clone(), running_var.clone(), *params,
            training=training, activation=activation,
        )

    inputs = (x, *params) if affine else (x,)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "requires_grad",
    [(True, False, False), (False, True, False), (False, False, True), (True, True, True)],
)
def test_grads_of_the_inputs_that_require_them(requires_grad):
    x = layout_input((5, 3, 4), "contiguous", torch.float64)
    weight, bias = channel_params(3)
    inputs = [t.requires_grad_(needed) for t, needed in zip((x, weight, bias), requires_grad)]
    wanted = [t for t in inputs if t.requires_grad]
    dy = layout_input((5, 3, 4), "contiguous", torch.float64, seed=3)
    y, _, _ = ops.batch_norm_act(*inputs, None, None, None, True, 0.1, 1e-5, "relu")
    reference = torch.relu(nn.functional.batch_norm(x, None, None, weight, bias, training=True))
    for grad, expected in zip(
        torch.autograd.grad(y, wanted, dy), torch.autograd.grad(reference, wanted, dy)
    ):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_gradgradcheck(layout, affine, training, activation):
    # Second derivatives (the gradients of the gradients) in float64.
    x = layout_input((4, 3, 3, 5), layout, torch.float64).requires_grad_()
    params = [p.requires_grad_() for p in channel_params(3)] if affine else []
    running_mean = torch.randn(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x, *params):
        weight, bias = params if affine else (None, None)
        return ops.batch_norm_act(x, weight, bias, running_mean, running_var, None, training,
                                  0.1, 1e-5, activation)[0]

    assert torch.autograd.gradgradcheck(fn, (x, *params), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_gradient_penalty_matches_torch(layout, training):
    # A WGAN-GP style penalty on the input gradient, differentiated again,
    # through conv -> BN+ReLU -> conv -> BN with a loss whose gradient depends
    # on the output: the same values and gradients (every parameter's, the
    # input's) as the same network built from torch's modules.
    x0 = layout_input((6, 3, 7, 7), layout, torch.float64)

    def network(bn_relu, bn):
        torch.manual_seed(3)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), *bn_relu, nn.Conv2d(4, 4, 3), bn)
        net = net.double().to(memory_format=torch.channels_last if layout == "channels_last"
                              else torch.contiguous_format)
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.3, 0.3)
                    module.running_var.uniform_(0.5, 1.5)
        return net.train(training)

    fused = network([fused_bn.BatchNormReLU2d(4)], fused_bn.BatchNorm2d(4))
    reference = network([nn.BatchNorm2d(4), nn.ReLU()], nn.BatchNorm2d(4))
    results = []
    for net in (fused, reference):
        x = x0.clone().requires_grad_()
        y = net(x)
        v = torch.sin(torch.arange(y.numel(), dtype=torch.float64)).view_as(y)
        loss = (y * v).sum() + y.pow(2).mean()
        (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
        (grad_x ** 2).sum().backward()
        results.append([grad_x.detach(), x.grad] + [p.grad for p in net.parameters()])
    # bias grads included: BatchNorm's bias enters the input gradient only through
    # the ReLU mask (and not at all before a second BatchNorm): zeros, as torch's.
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8)


def test_third_derivative_raises():
    x = layout_input((4, 3, 5), "contiguous", torch.float64).requires_grad_()
    y = fused_bn.BatchNormReLU1d(3).double()(x)
    (grad_x,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (grad_grad_x,) = torch.autograd.grad(grad_x.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third derivatives are not supported"):
        grad_grad_x.sum().backward()


def test_forward_mode_ad_raises():
    # Not implemented: a clear error rather than an output without its tangent.
    x = layout_input((4, 3, 5), "contiguous", torch.float64)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            ops.batch_norm_act(dual, None, None, None, None, None, True, 0.1, 1e-5, "relu")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # as usual before BN
        self.bn1 = fused_bn.BatchNormReLU2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = fused_bn.BatchNorm2d(8, momentum=None)
        # No bias before BatchNorm (as for the convolutions): BatchNorm removes
        # the mean, so that bias's gradient is analytically zero and in float32
        # only rounding noise, which compiled and eager runs need not share.
        self.head = nn.Linear(8, 4, bias=False)
        self.bn3 = fused_bn.BatchNormReLU1d(4)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.head(x.mean(dim=(2, 3))))


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_fullgraph_matches_eager(channels_last):
    torch.manual_seed(0)
    eager = SmallNet()
    compiled_model = copy.deepcopy(eager)
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
        compiled_model = compiled_model.to(memory_format=torch.channels_last)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(6, 3, 8, 8)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(
            p_compiled.grad, p_eager.grad, atol=1e-4, rtol=1e-4,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    for (name, b_eager), b_compiled in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_compiled, b_eager, atol=1e-5, rtol=1e-5, msg=name)
    eager.eval()
    compiled_model.eval()
    x = torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


def test_torch_export():
    model = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def saved_bytes(fn, x):
    """Bytes of distinct tensors that autograd saves for backward while running fn(x)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.dtype)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_saved_for_backward_is_input_plus_channel_stats(layout):
    C = 16
    x = layout_input((8, C, 16, 16), layout, torch.float32).requires_grad_()
    input_bytes = x.numel() * x.element_size()
    fused = fused_bn.BatchNormReLU2d(C)
    eager = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU())
    fused_saved = saved_bytes(fused, x)
    eager_saved = saved_bytes(eager, x)
    assert fused_saved <= input_bytes + 8 * C * 4
    assert eager_saved >= 2 * input_bytes  # eager keeps the input and the ReLU output
