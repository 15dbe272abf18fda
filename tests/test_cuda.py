"""CUDA kernels: equivalence with PyTorch, CUDA against CPU, gradcheck, > 2^31
elements, CUDA graphs and opcheck, for every activation and the residual add. Skipped
where no CUDA device is available.

The kernels not yet verified on a GPU (activations other than identity and ReLU, the
residual add) are compared only under FUSED_BN_CUDA_KERNELS=next; otherwise the tests
check that the ops refuse them and that the modules compute with PyTorch's ops instead,
still matching (docs/cuda.md, benchmarks/gpu_check.sh runs both selections).

FUSED_BN_TEST_DEVICE=cpu runs the file on CPU (CUDA against CPU then compares CPU with
CPU): a check, without a GPU, that every call of the file matches the current op
schemas and references (tests/test_cuda_dry_run.py runs it so in every suite).
"""

import copy
import os

import pytest
import torch
from conftest import TORCH_BN, bn_kind, fused_class
from torch import nn

import fused_bn
from fused_bn import functional as FB
from fused_bn._ops import ops
from fused_bn.activations import activation_of

FUSED_ACT = {1: fused_bn.BatchNormAct1d, 2: fused_bn.BatchNormAct2d, 3: fused_bn.BatchNormAct3d}
DEVICE = os.environ.get("FUSED_BN_TEST_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (DRY_RUN or torch.cuda.is_available()), reason="CUDA not available"),
]
needs_gpu = pytest.mark.skipif(DRY_RUN, reason="a CUDA-only feature (FUSED_BN_TEST_DEVICE=cpu)")
# Against a float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
DTYPES = list(TOLERANCE)
# Planar with small and odd inner sizes, rows ((N, C)), several blocks per
# channel, and C not a multiple of the 32-channel tile or the vector width.
SHAPES = [(16, 24), (4, 8, 13), (4, 16, 8, 8), (3, 35, 7, 7), (2, 8, 3, 4, 5), (64, 3, 16, 16)]

# Every activation with non-default parameters, and its PyTorch module (the reference pair).
ACTIVATIONS = [
    ("identity", {}, nn.Identity()), ("relu", {}, nn.ReLU()), ("relu6", {}, nn.ReLU6()),
    ("hardtanh", dict(min_val=-0.5, max_val=0.8), nn.Hardtanh(-0.5, 0.8)),
    ("leaky_relu", dict(negative_slope=0.2), nn.LeakyReLU(0.2)), ("silu", {}, nn.SiLU()),
    ("hardswish", {}, nn.Hardswish()), ("elu", dict(alpha=0.7), nn.ELU(0.7)),
]
ACTIVATION_IDS = [name for name, _, _ in ACTIVATIONS]
# The kernel selection (fused_bn/functional.py): without "next", CUDA kernels that have not
# run on a GPU yet are refused by the ops, and the modules compute with PyTorch's ops instead.
UNVERIFIED_ON_DEVICE = DEVICE == "cuda" and FB.CUDA_KERNELS != "next"
UNVERIFIED_MESSAGE = "FUSED_BN_CUDA_KERNELS=next"


def takes_fused_kernels(activation, residual):
    """Whether a call on DEVICE runs fused_bn's kernels (else PyTorch's composite)."""
    return not (UNVERIFIED_ON_DEVICE and (residual or activation not in ("identity", "relu")))


def op_params(activation, params):
    """The ops' activation_params list from the modules' keyword parameters."""
    return list(activation_of(activation, **params).params)



def layouts(shape):
    return ["contiguous", "strided"] + (["channels_last"] if len(shape) in (4, 5) else [])


def make_input(shape, layout, dtype, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
        x = wide[..., ::2]
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = (x * 1.5 + 0.3).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


def make_modules(shape, activation, dtype, param_dtype=None):
    """A float64 torch reference (BatchNormXd [+ ReLU]) and the fused module in
    `param_dtype` (default: dtype), with equal random parameters and buffers."""
    dims, channels = bn_kind(shape), shape[1]
    torch.manual_seed(0)
    bn = TORCH_BN[dims](channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    fused = fused_class(dims, activation)(channels)
    fused.load_state_dict(bn.state_dict())
    fused.to(DEVICE, param_dtype or dtype)
    # The reference gets the fused module's parameters and buffers as rounded
    # to its dtype: a bias rounded to bfloat16 moves the ReLU's threshold, and
    # an element near it would otherwise differ by its whole gradient.
    bn.load_state_dict(fused.state_dict())
    reference = nn.Sequential(bn, nn.ReLU()) if activation == "relu" else bn
    return reference.to(DEVICE, torch.float64), fused


def run_step(module, x, dy):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(dy)
    return y, x.grad


def bn_of(reference):
    return reference[0] if isinstance(reference, nn.Sequential) else reference


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout", [(s, lay) for s in SHAPES for lay in layouts(s)], ids=str
)
def test_module_matches_torch(shape, layout, dtype, activation, training):
    reference, fused = make_modules(shape, activation, dtype)
    reference.train(training)
    fused.train(training)
    x = make_input(shape, layout, dtype)
    dy = make_input(shape, layout, dtype, seed=2)
    y, dx = run_step(fused, x, dy)
    y_ref, dx_ref = run_step(reference, x.double(), dy.double())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    ref_bn = bn_of(reference)
    torch.testing.assert_close(fused.weight.grad.double(), ref_bn.weight.grad, **tol)
    torch.testing.assert_close(fused.bias.grad.double(), ref_bn.bias.grad, **tol)
    torch.testing.assert_close(fused.running_mean.double(), ref_bn.running_mean, **tol)
    torch.testing.assert_close(fused.running_var.double(), ref_bn.running_var, **tol)
    assert fused.num_batches_tracked.item() == ref_bn.num_batches_tracked.item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_mixed_precision_matches_torch(dtype, layout):
    """Half/bfloat16 input with float32 weight and running statistics, as
    torch's own CUDA BatchNorm accepts."""
    shape = (8, 32, 6, 6)
    reference, fused = make_modules(shape, "relu", dtype, param_dtype=torch.float32)
    x = make_input(shape, layout, dtype)
    dy = make_input(shape, layout, dtype, seed=2)
    y, dx = run_step(fused, x, dy)
    y_ref, dx_ref = run_step(reference, x.double(), dy.double())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and fused.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(dx.double(), dx_ref, **tol)
    torch.testing.assert_close(fused.weight.grad.double(), bn_of(reference).weight.grad, **tol)
    torch.testing.assert_close(fused.running_var.double(), bn_of(reference).running_var, **tol)


def op_calls(x, dy, residual, weight, bias, running_mean, running_var, activation, params):
    """Every BatchNorm op on one input, as a dict of name -> outputs."""
    act = (activation, params)
    out, mean, invstd = ops.batch_norm_act(
        x, weight, bias, running_mean, running_var, None, True, 0.1, 1e-5, *act, residual
    )
    count = x.numel() // x.shape[1]
    sum_dy, sum_dy_xmu = ops.batch_norm_act_backward_reduce(
        dy, x, weight, bias, mean, invstd, *act
    )
    return {
        "train": (out, mean, invstd),
        "eval": ops.batch_norm_act(
            x, weight, bias, running_mean, running_var, None, False, 0.1, 1e-5, *act, residual
        ),
        "backward_train": ops.batch_norm_act_backward(
            dy, x, weight, bias, mean, invstd, True, *act, residual, [True, True, True, True]
        ),
        "backward_eval": ops.batch_norm_act_backward(
            dy, x, weight, bias, mean, invstd, False, *act, residual, [True, True, True, True]
        ),
        # Only grad_input: the others come back empty.
        "backward_input_only": ops.batch_norm_act_backward(
            dy, x, weight, bias, mean, invstd, True, *act, residual, [True, False, False, False]
        ),
        "stats": ops.batch_norm_stats(x),
        "elemt": ops.batch_norm_act_elemt(x, weight, bias, mean, invstd, *act),
        "backward_reduce": (sum_dy, sum_dy_xmu),
        "backward_elemt": ops.batch_norm_act_backward_elemt(
            dy, x, weight, bias, mean, invstd, sum_dy / count, sum_dy_xmu / count, *act
        ),
    }


# Every activation plain, and the residual add after a kinked and a smooth one.
ACTIVATION_CASES = [(name, params, False) for name, params, _ in ACTIVATIONS] + [
    ("relu", {}, True), ("elu", dict(alpha=0.7), True),
]
ACTIVATION_CASE_IDS = ACTIVATION_IDS + ["relu-residual", "elu-residual"]


@pytest.mark.parametrize("activation,params,residual", ACTIVATION_CASES, ids=ACTIVATION_CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout",
    [((4, 16, 8, 8), "contiguous"), ((4, 16, 8, 8), "channels_last"), ((64, 40), "contiguous"),
     ((3, 5, 9), "strided"), ((2, 8, 3, 4, 5), "channels_last")],
    ids=str,
)
def test_cuda_matches_cpu(shape, layout, dtype, activation, params, residual):
    """The same inputs through every op on both devices."""
    x = make_input(shape, layout, dtype)
    dy = make_input(shape, layout, dtype, seed=2)
    r = make_input(shape, layout, dtype, seed=5) if residual else None
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(3)
    C = shape[1]
    weight, bias, running_mean = (
        torch.rand(C, generator=g, dtype=param_dtype) + 0.5 for _ in range(3)
    )
    running_var = torch.rand(C, generator=g, dtype=param_dtype) + 0.5
    params = (weight, bias, running_mean, running_var, activation, op_params(activation, params))
    # Copies (also on CPU in a dry run): the training call updates the running statistics.
    on_device = [p.to(DEVICE, copy=True) if isinstance(p, torch.Tensor) else p for p in params]
    if not takes_fused_kernels(activation, residual):
        with pytest.raises(RuntimeError, match=UNVERIFIED_MESSAGE):
            op_calls(x, dy, r, *on_device)
        return
    on_cuda = op_calls(x, dy, r, *on_device)
    on_cpu = op_calls(x.cpu(), dy.cpu(), r.cpu() if residual else None, *params)
    # Same math, different summation order: float accumulation rounding only,
    # plus one rounding of the output in reduced precision.
    tol = TOLERANCE[dtype] if dtype in (torch.float16, torch.bfloat16) else dict(
        atol=1e-5 if dtype == torch.float32 else 1e-12,
        rtol=1e-5 if dtype == torch.float32 else 1e-12,
    )
    for name, cuda_result in on_cuda.items():
        cuda_result = cuda_result if isinstance(cuda_result, tuple) else (cuda_result,)
        cpu_result = on_cpu[name] if isinstance(on_cpu[name], tuple) else (on_cpu[name],)
        assert len(cuda_result) == len(cpu_result), name
        for got, want in zip(cuda_result, cpu_result):
            assert got.device.type == DEVICE and got.dtype == want.dtype, name
            assert got.shape == want.shape and got.stride() == want.stride(), name
            torch.testing.assert_close(got.cpu(), want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    grad_residual = on_cuda["backward_train"][3]
    assert grad_residual.numel() == (x.numel() if residual else 0)
    assert all(t.numel() == 0 for t in on_cuda["backward_input_only"][1:])


# Smooth activations only besides identity/ReLU: a finite difference across a kink fails.
GRADCHECK_CASES = [("identity", {}, False), ("relu", {}, False), ("silu", {}, True),
                   ("elu", dict(alpha=0.7), False)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,params,residual", GRADCHECK_CASES,
                         ids=["identity", "relu", "silu-residual", "elu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_gradcheck_float64(layout, activation, params, residual, training):
    shape = (6, 3) if layout == "rows" else (3, 4, 3, 5)
    input_layout = "contiguous" if layout == "rows" else layout
    x = make_input(shape, input_layout, torch.float64).requires_grad_()
    r = make_input(shape, input_layout, torch.float64, seed=5).requires_grad_()
    g = torch.Generator().manual_seed(4)
    weight = (
        (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(DEVICE).requires_grad_()
    )
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    running_mean = torch.zeros(shape[1], dtype=torch.float64, device=DEVICE)
    running_var = torch.ones(shape[1], dtype=torch.float64, device=DEVICE)

    def fn(x, weight, bias, r):
        # Fresh copies: the training call updates the running statistics.
        return FB.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias,
            training=training, activation=activation, residual=r if residual else None,
            **params,
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias, r))


@pytest.mark.parametrize("activation,params,residual",
                         [("identity", {}, False), ("relu", {}, False),
                          ("hardtanh", dict(min_val=-0.5, max_val=0.8), True)],
                         ids=["identity", "relu", "hardtanh-residual"])
def test_opcheck_every_op(activation, params, residual):
    if not takes_fused_kernels(activation, residual):
        pytest.skip("kernels not verified on a GPU (the ops refuse them: test_cuda_matches_cpu)")
    shape = (4, 6, 5, 3)
    x = make_input(shape, "channels_last", torch.float32)
    dy = make_input(shape, "channels_last", torch.float32, seed=2)
    r = make_input(shape, "channels_last", torch.float32, seed=5) if residual else None
    act = (activation, op_params(activation, params))
    weight = torch.rand(6, device=DEVICE) + 0.5
    bias = torch.randn(6, device=DEVICE)
    running_mean, running_var = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    _, mean, invstd = ops.batch_norm_act(
        x, weight, bias, running_mean, running_var, None, True, 0.1, 1e-5, *act, r
    )
    mean_dy, mean_dy_xmu = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)
    calls = [
        (ops.batch_norm_act, (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(),
                              running_mean, running_var, None, True, 0.1, 1e-5, *act, r)),
        (ops.batch_norm_act, (x, weight, bias, running_mean, running_var, None, False, 0.1, 1e-5,
                              *act, r)),
        (ops.batch_norm_act_backward, (dy, x.detach(), weight.detach(), bias.detach(), mean,
                                       invstd, True, *act, r, [True, True, True, residual])),
        (ops.batch_norm_stats, (x.detach(),)),
        (ops.batch_norm_act_elemt, (x.detach(), weight.detach(), bias.detach(), mean, invstd,
                                    *act)),
        (ops.batch_norm_act_backward_reduce, (dy, x.detach(), weight.detach(), bias.detach(),
                                              mean, invstd, *act)),
        (ops.batch_norm_act_backward_elemt, (dy, x.detach(), weight.detach(), bias.detach(), mean,
                                             invstd, mean_dy, mean_dy_xmu, *act)),
        (ops.update_running_stats_, (running_mean.clone(), running_var.clone(),
                                     torch.zeros((), dtype=torch.long, device=DEVICE), mean,
                                     invstd, 0.1, 1e-5, 60)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


def running_stats_case(channels, running_dtype, stat_dtype):
    g = torch.Generator().manual_seed(channels)
    batch = (torch.randn(channels, generator=g, dtype=torch.float64).to(stat_dtype),
             (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(stat_dtype))
    running = ((torch.randn(channels, generator=g, dtype=torch.float64) * 0.2).to(running_dtype),
               (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).to(running_dtype),
               torch.tensor(4))
    return batch, running


@pytest.mark.parametrize("count", [50, 0])
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize(
    "running_dtype,stat_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64),
     (torch.bfloat16, torch.float32), (torch.float16, torch.float32)], ids=str,
)
@pytest.mark.parametrize("channels", [3, 1000])
def test_update_running_stats_kernel_matches_cpu(channels, running_dtype, stat_dtype, momentum,
                                                 count):
    """The one-launch CUDA update (more channels than threads too) against the CPU op."""
    (mean, invstd), running = running_stats_case(channels, running_dtype, stat_dtype)
    results = []
    for device in ("cpu", DEVICE):
        state = [t.to(device, copy=True) for t in running]
        ops.update_running_stats_(*state, mean.to(device), invstd.to(device), momentum, 1e-5,
                                  count)
        results.append(state)
    (cpu_mean, cpu_var, cpu_batches), (cuda_mean, cuda_var, cuda_batches) = results
    # One rounding step of the running type: nvcc may fuse the lerp's multiply-add.
    step = torch.finfo(running_dtype).eps
    torch.testing.assert_close(cuda_mean.cpu(), cpu_mean, atol=step, rtol=step)
    torch.testing.assert_close(cuda_var.cpu(), cpu_var, atol=step, rtol=step)
    assert cuda_batches.item() == cpu_batches.item() == 5
    if count == 0:
        assert torch.equal(cuda_mean.cpu(), running[0]) and torch.equal(cuda_var.cpu(), running[1])


def test_update_running_stats_strided_buffers_take_the_general_path():
    (mean, invstd), (running_mean, running_var, batches) = running_stats_case(
        7, torch.float32, torch.float32)
    expected = [t.to(DEVICE, copy=True) for t in (running_mean, running_var, batches)]
    ops.update_running_stats_(*expected, mean.to(DEVICE), invstd.to(DEVICE), None, 1e-5, 30)
    wide = torch.zeros(14, device=DEVICE)
    strided_mean = wide[::2].copy_(running_mean)
    actual = [strided_mean, running_var.to(DEVICE), batches.to(DEVICE)]
    ops.update_running_stats_(*actual, mean.to(DEVICE), invstd.to(DEVICE), None, 1e-5, 30)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6)


def test_update_running_stats_without_num_batches_tracked():
    (mean, invstd), (running_mean, running_var, _) = running_stats_case(
        5, torch.float32, torch.float32)
    cpu = [running_mean.clone(), running_var.clone()]
    ops.update_running_stats_(*cpu, None, mean, invstd, 0.3, 1e-5, 20)
    cuda = [running_mean.to(DEVICE), running_var.to(DEVICE)]
    ops.update_running_stats_(*cuda, None, mean.to(DEVICE), invstd.to(DEVICE), 0.3, 1e-5, 20)
    for c, g in zip(cpu, cuda):
        torch.testing.assert_close(g.cpu(), c, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="needs num_batches_tracked"):
        ops.update_running_stats_(*cuda, None, mean.to(DEVICE), invstd.to(DEVICE), None, 1e-5, 20)


class ResidualBlock(nn.Module):
    """conv -> BatchNormAct2d(conv(a) + a) with a fused activation and residual add."""

    def __init__(self, activation, **params):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = fused_bn.BatchNormAct2d(16, activation=activation, **params)

    def forward(self, x):
        a = self.stem(x)
        return self.bn(self.conv(a), a)


GRAPH_MODELS = {
    "relu": lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), fused_bn.BatchNormReLU2d(16)),
    "hardswish-residual": lambda: ResidualBlock("hardswish"),
    "leaky_relu-residual": lambda: ResidualBlock("leaky_relu", negative_slope=0.2),
}


@needs_gpu
@pytest.mark.parametrize("model_name", list(GRAPH_MODELS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_graph_train_step(layout, model_name):
    """A whole training step (forward, backward, optimizer) captured once and
    replayed on new data matches the same steps run eagerly (the unverified kernels'
    models with PyTorch's composite unless FUSED_BN_CUDA_KERNELS=next)."""
    shape = (8, 16, 10, 10)
    torch.manual_seed(0)
    model = GRAPH_MODELS[model_name]().to(DEVICE)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    graphed_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1)
    batches = [
        make_input((shape[0], 3) + shape[2:], layout, torch.float32, seed=s) for s in range(5)
    ]
    static_x = batches[0].clone()

    def step(module, optimizer, x):
        optimizer.zero_grad(set_to_none=False)
        loss = module(x).square().mean()
        loss.backward()
        optimizer.step()
        return loss

    # Warm up on a side stream (first-call allocations) before capture, on a
    # throwaway copy so both models see the same steps.
    warm, warm_opt = copy.deepcopy(model), None
    warm_opt = torch.optim.SGD(warm.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(warm, warm_opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # zero_grad(set_to_none=False) needs gradients to exist before capture.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for p in eager.parameters():
        p.grad = torch.zeros_like(p)
    with torch.cuda.graph(graph):
        static_loss = step(model, graphed_opt, static_x)
    # Capture does not run the step: replay batch 0, then the others.
    for x in batches:
        static_x.copy_(x)
        graph.replay()
        loss = step(eager, eager_opt, x)
        torch.testing.assert_close(static_loss, loss, atol=1e-5, rtol=1e-5)
    bn, eager_bn = (m[-1] if model_name == "relu" else m.bn for m in (model, eager))
    torch.testing.assert_close(bn.running_mean, eager_bn.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, eager_bn.running_var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.weight, eager_bn.weight, atol=1e-5, rtol=1e-5)
    assert bn.num_batches_tracked.item() == eager_bn.num_batches_tracked.item() == len(batches)


def test_wrong_device_and_dtype_errors():
    x = make_input((4, 3, 5), "contiguous", torch.float32)
    if not DRY_RUN:
        with pytest.raises(RuntimeError, match="same device"):
            ops.batch_norm_act(x, torch.ones(3), None, None, None, None, True, 0.1, 1e-5, "relu")
    with pytest.raises(NotImplementedError, match="not implemented for 'Int'"):
        ops.batch_norm_act(x.int(), None, None, None, None, None, True, 0.1, 1e-5, "relu")
    # The message the CPU op gives (PyTorch's wording).
    messages = []
    for device in (DEVICE, "cpu"):
        with pytest.raises(RuntimeError) as error:
            ops.batch_norm_act(x.to(device), torch.ones(3, dtype=torch.float64, device=device),
                               None, None, None, None, True, 0.1, 1e-5, "relu")
        messages.append(str(error.value).splitlines()[0])
    assert messages[0] == messages[1]


def test_empty_batch():
    x = torch.empty(0, 5, 4, 4, device=DEVICE)
    y, mean, invstd = ops.batch_norm_act(x, None, None, None, None, None, True, 0.1, 1e-5, "relu")
    assert y.shape == x.shape and mean.eq(0).all() and invstd.eq(0).all()
    dx, dw, db, _ = ops.batch_norm_act_backward(
        x, x, torch.ones(5, device=DEVICE), None, mean, invstd, True, "relu"
    )
    assert dx.shape == x.shape and dw.eq(0).all() and db.eq(0).all()


@needs_gpu
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_more_than_2_31_elements_float16(layout):
    """64-bit indexing: a float16 input of more than 2^31 elements, forward
    and backward, checked channel by channel against float32 torch math."""
    shape = (2, 8, 2**14, 2**13 + 4)
    assert torch.Size(shape).numel() > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.empty(shape, dtype=torch.float16, device=DEVICE,
                    memory_format=torch.channels_last if layout == "channels_last"
                    else torch.contiguous_format)
    x.normal_(0.5, 2.0)
    weight = torch.linspace(0.5, 1.5, shape[1], device=DEVICE)
    bias = torch.linspace(-0.5, 0.5, shape[1], device=DEVICE)
    y, mean, invstd = ops.batch_norm_act(x, weight, bias, None, None, None, True, 0.1, 1e-5, "relu")
    dy = torch.empty_like(x).normal_()
    dx, dweight, dbias, _ = ops.batch_norm_act_backward(
        dy, x, weight, bias, mean, invstd, True, "relu"
    )
    count = x.numel() // shape[1]
    for c in range(shape[1]):
        xc = x[:, c].float()
        var, mu = torch.var_mean(xc, correction=0)
        torch.testing.assert_close(mean[c], mu, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(invstd[c], (var + 1e-5).rsqrt(), atol=1e-4, rtol=1e-4)
        pre = (xc - mean[c]) * invstd[c] * weight[c] + bias[c]
        torch.testing.assert_close(y[:, c].float(), pre.relu(), atol=1e-2, rtol=1e-2)
        g = dy[:, c].float() * (pre > 0)
        sum_g, sum_gx = g.sum(), (g * (xc - mean[c])).sum()
        torch.testing.assert_close(dbias[c], sum_g, atol=1e-2 * count**0.5, rtol=1e-3)
        torch.testing.assert_close(
            dweight[c], sum_gx * invstd[c], atol=1e-2 * count**0.5, rtol=1e-3
        )
        a = weight[c] * invstd[c]
        dx_ref = a * (g - sum_g / count - (xc - mean[c]) * invstd[c] ** 2 * sum_gx / count)
        # Where the pre-activation rounds to about 0, the kernel's fused
        # multiply-add and this reference may disagree on the ReLU mask.
        decided = pre.abs() > 1e-4
        torch.testing.assert_close(dx[:, c].float()[decided], dx_ref[decided], atol=1e-2, rtol=1e-2)
        del xc, pre, g, dx_ref, decided


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", [((4, 6, 5, 7), "contiguous"),
                                          ((4, 6, 5, 7), "channels_last"),
                                          ((32, 6), "contiguous")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation,params,torch_activation", ACTIVATIONS, ids=ACTIVATION_IDS)
def test_every_activation_and_residual(activation, params, torch_activation, residual, dtype,
                                       shape, layout, training):
    """BatchNormActXd on DEVICE against the same module on CPU and against PyTorch's pair
    act(BatchNormXd(x) + r) in float64; outputs, every gradient, running statistics."""
    torch.manual_seed(0)
    on_cpu = FUSED_ACT[bn_kind(shape)](shape[1], activation=activation, **params).to(dtype)
    with torch.no_grad():
        on_cpu.weight.uniform_(0.5, 1.5)
        on_cpu.bias.uniform_(-0.5, 0.5)
        on_cpu.running_mean.uniform_(-0.2, 0.2)
        on_cpu.running_var.uniform_(0.5, 1.5)
    # The reference gets the parameters as rounded to dtype (see make_modules).
    torch_bn = TORCH_BN[bn_kind(shape)](shape[1]).double()
    torch_bn.load_state_dict(on_cpu.state_dict())
    on_device = copy.deepcopy(on_cpu).to(DEVICE)
    for module in (on_cpu, on_device, torch_bn):
        module.train(training)
    x = make_input(shape, layout, dtype, device="cpu")
    r = make_input(shape, layout, dtype, seed=5, device="cpu") if residual else None
    dy = make_input(shape, layout, dtype, seed=6, device="cpu")

    def step(forward, bn, device, step_dtype):
        xs = x.to(device, step_dtype, copy=True).requires_grad_()
        rs = r.to(device, step_dtype, copy=True).requires_grad_() if residual else None
        y = forward(xs, rs)
        y.backward(dy.to(device, step_dtype))
        values = [y, xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
        return y, values + ([rs.grad] if residual else [])

    _, cpu_values = step(on_cpu, on_cpu, "cpu", dtype)
    y, device_values = step(on_device, on_device, DEVICE, dtype)
    _, torch_values = step(
        lambda x, r: torch_activation(torch_bn(x) + r if r is not None else torch_bn(x)),
        torch_bn, "cpu", torch.float64,
    )
    fused = y.grad_fn.name() == "BatchNormActBackward"
    assert fused == takes_fused_kernels(activation, residual)
    assert y.dtype == dtype and y.stride() == x.stride()
    device_tol = TOLERANCE[dtype] if dtype != torch.float64 else dict(atol=1e-12, rtol=1e-12)
    # bfloat16's coarse grid puts some pre-activations on a kink, where a tie against the
    # float64 reference flips an element's whole gradient, and its rounded sums drift past
    # any useful tolerance: its gradients are checked against CPU only.
    gradients_against_cpu_only = dtype == torch.bfloat16
    names = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var",
             "grad_residual"]
    for name, cpu_value, device_value, torch_value in zip(
        names, cpu_values, device_values, torch_values
    ):
        message = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(device_value.cpu(), cpu_value, **device_tol, msg=message)
        if name.startswith("grad_") and gradients_against_cpu_only:
            continue
        torch.testing.assert_close(
            device_value.cpu().double(), torch_value, **TOLERANCE[dtype], msg=message
        )
