"""PyTorch's own module test machinery, with the fused classes in place of torch's.

torch ships `torch.testing._internal.common_modules.module_db`: for nn.BatchNorm1d/2d/3d a
ModuleInfo with sample constructor/forward inputs (module_inputs_func) and error inputs
(module_error_inputs_func). PyTorch's generic module tests (its test/test_modules.py) run
every sample through a list of checks; this file runs the same kinds of checks, in its own
code, on

  * fused_bn.BatchNormXd     in place of nn.BatchNormXd, and
  * fused_bn.BatchNormReLUXd in place of nn.Sequential(nn.BatchNormXd, nn.ReLU()),

built from each sample's constructor arguments: forward (against torch's module with the
same state, and after .float()/.double()), factory kwargs, repr, pickling and deepcopy,
state_dict round trips, non-contiguous inputs, channels_last inputs and modules,
gradcheck and gradgradcheck in float64 with batched gradients, whether training mode is
read, construction under torch.device("meta"), and the error inputs.

Each check runs on PyTorch's module first: a check that plain PyTorch does not pass is
skipped (with PyTorch's failure as the reason), and every check PyTorch passes must pass
with fused_bn. This torch has no Dropout ModuleInfo; Dropout gets the same checks on
samples written here in the same form (ModuleInput/FunctionInput).
"""

import copy
import io
import pickle
import re
import warnings
from itertools import product

import pytest
import torch
from conftest import TOLERANCE
from torch import nn
from torch.testing._internal.common_modules import (
    ErrorModuleInput,
    FunctionInput,
    ModuleErrorEnum,
    ModuleInput,
    module_db,
)
from torch.testing._internal.common_utils import freeze_rng_state, gradcheck, gradgradcheck
from torch_parity import outcome

import fused_bn

FUSED = {
    nn.BatchNorm1d: {"plain": fused_bn.BatchNorm1d, "relu": fused_bn.BatchNormReLU1d},
    nn.BatchNorm2d: {"plain": fused_bn.BatchNorm2d, "relu": fused_bn.BatchNormReLU2d},
    nn.BatchNorm3d: {"plain": fused_bn.BatchNorm3d, "relu": fused_bn.BatchNormReLU3d},
    nn.Dropout: {"plain": fused_bn.Dropout},
}


def dropout_module_inputs(module_info, device, dtype, requires_grad, training, **kwargs):
    """Dropout samples in module_db's form (this torch's module_db has none)."""
    def make(shape):
        g = torch.Generator().manual_seed(sum(shape) + 1)
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        return x.requires_grad_(requires_grad)

    return [
        ModuleInput(FunctionInput(), FunctionInput(make((4, 5))), desc="default_p"),
        ModuleInput(FunctionInput(0.0), FunctionInput(make((3, 4, 5))), desc="p0"),
        ModuleInput(FunctionInput(1.0), FunctionInput(make((2, 3, 4, 5))), desc="p1"),
        ModuleInput(FunctionInput(p=0.3), FunctionInput(make((2, 3, 4, 5))), desc="4d"),
        ModuleInput(FunctionInput(0.7), FunctionInput(make((2, 3, 2, 3, 4))), desc="5d"),
        ModuleInput(FunctionInput(0.5), FunctionInput(make((0, 3))), desc="empty"),
        ModuleInput(FunctionInput(0.5), FunctionInput(make((6,))), desc="1d"),
    ]


def dropout_error_inputs(module_info, device, dtype, requires_grad, training, **kwargs):
    x = torch.randn(3, 4, dtype=dtype, device=device)
    return [
        ErrorModuleInput(ModuleInput(FunctionInput(p), FunctionInput(x)),
                         error_on=ModuleErrorEnum.CONSTRUCTION_ERROR, error_type=ValueError,
                         error_regex="dropout probability has to be between 0 and 1")
        for p in (-0.1, 1.5, 2)
    ]


class DropoutInfo:
    """The parts of a ModuleInfo these checks use."""

    module_cls = nn.Dropout
    name = "nn.Dropout"
    module_inputs_func = staticmethod(dropout_module_inputs)
    module_error_inputs_func = staticmethod(dropout_error_inputs)


INFOS = [info for info in module_db if info.module_cls in FUSED]
if not any(info.module_cls is nn.Dropout for info in INFOS):
    INFOS.append(DropoutInfo())
CASES = [(info, variant) for info in INFOS for variant in FUSED[info.module_cls]]
CASE_IDS = [f"{info.module_cls.__name__}-{variant}" for info, variant in CASES]


def torch_factory(info, variant):
    if variant == "relu":
        return lambda *args, **kwargs: nn.Sequential(info.module_cls(*args, **kwargs), nn.ReLU())
    return info.module_cls


def fused_factory(info, variant):
    return FUSED[info.module_cls][variant]


def inner(module):
    """The module holding the parameters and buffers (the BatchNorm of a Sequential)."""
    return module[0] if isinstance(module, nn.Sequential) else module


def samples(info, dtype, requires_grad, training):
    torch.manual_seed(0)  # module_inputs_func draws random inputs
    return [s for s in info.module_inputs_func(info, device="cpu", dtype=dtype,
                                                requires_grad=requires_grad, training=training)
            if s.forward_input is not None]


def build(factory, sample, dtype, training, seed=0):
    """The module of a sample, in `dtype` and mode, with random parameters and running
    statistics (the same for the same seed, whatever the factory)."""
    module = factory(*sample.constructor_input.args, **sample.constructor_input.kwargs)
    module.to(dtype).train(training)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(inner(module).state_dict(keep_vars=True).items()):
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=g, dtype=torch.float64)
                tensor.copy_(values + 0.5 if name in ("weight", "running_var") else values - 0.5)
    return module


def forward_args(sample):
    return sample.forward_input.args, sample.forward_input.kwargs


def tolerance(dtype):
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


def assert_equal(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance(dtype),
                               msg=lambda m: f"{what}: {m}")


# How PyTorch's module can fail a check (anything else is a bug of the check): an
# assertion, or an error raised by PyTorch (gradcheck's GradcheckError is a RuntimeError).
PYTORCH_FAILURES = (AssertionError, RuntimeError, ValueError, NotImplementedError, IndexError)


def run_check(check, info, variant, training, dtype=torch.float64, requires_grad=False,
              source=None, **kwargs):
    """check(factory, reference, info, training, sample) for every sample, first with
    PyTorch's module: a sample PyTorch fails is left out (and named in a warning), and
    fused_bn must pass every other one; when PyTorch fails them all, the test skips."""
    if source is None:
        def source():
            return samples(info, dtype, requires_grad, training)
    reference, fused = torch_factory(info, variant), fused_factory(info, variant)
    left_out = []
    for index in range(len(source())):
        sample = source()[index]  # fresh tensors for each run
        expected = outcome(check, reference, reference, info, training, sample, **kwargs)
        if expected.raised and not isinstance(expected.error, PYTORCH_FAILURES):
            raise expected.error  # a bug of the check itself, not PyTorch failing it
        if expected.raised:
            left_out.append(f"{_describe(sample)}: {expected.describe()}"[:300])
            continue
        check(fused, reference, info, training, source()[index], **kwargs)
    if left_out and len(left_out) == len(source()):
        pytest.skip("PyTorch's own module fails this check: " + "; ".join(left_out))
    if left_out:
        warnings.warn("samples left out, as PyTorch's own module fails them: "
                      + "; ".join(left_out), stacklevel=2)


def _describe(sample):
    if isinstance(sample, ErrorModuleInput):
        return f"error input {sample.error_regex!r}"
    return f"sample {sample.desc or 'default'!r}"


def parametrized(test):
    test = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])(test)
    return pytest.mark.parametrize("info,variant", CASES, ids=CASE_IDS)(test)


def is_dropout(info):
    return info.module_cls is nn.Dropout


# ---- forward ---------------------------------------------------------------------------


def check_forward(factory, reference, info, training, sample):
    """Outputs and state equal to PyTorch's module with the same state; then .float() /
    .double() converts every parameter and buffer, and forward still runs (test_forward)."""
    args, kwargs = forward_args(sample)
    dtype = args[0].dtype
    with freeze_rng_state():
        module = build(factory, sample, dtype, training)
        expected_module = build(reference, sample, dtype, training)
        output = module(*args, **kwargs)
        expected = expected_module(*args, **kwargs)
    if not is_dropout(info) or not training or module.p in (0.0, 1.0):
        assert_equal(output, expected, dtype, f"{sample.desc}: output")
    else:  # random masks: each element dropped or scaled
        scaled = args[0] / (1 - module.p)
        kept = torch.isclose(output, scaled, **tolerance(dtype))
        assert (kept | (output == 0)).all(), f"{sample.desc}: not dropout"
    for key, value in inner(expected_module).state_dict().items():
        assert_equal(inner(module).state_dict()[key], value, dtype, f"{sample.desc}: {key}")
    method = {torch.float32: "float", torch.float64: "double"}[dtype]
    getattr(module, method)()
    module(*args, **kwargs)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            assert tensor.dtype == dtype, f"{sample.desc}: {name} is {tensor.dtype}"


@parametrized
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_forward(info, variant, training, dtype):
    run_check(check_forward, info, variant, training, dtype=dtype)


def check_factory_kwargs(factory, reference, info, training, sample):
    """device= and dtype= reach every floating-point parameter and buffer."""
    c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for dtype in (torch.float32, torch.float64):
        extra = {} if is_dropout(info) else dict(device="cpu", dtype=dtype)
        module = factory(*c_args, **c_kwargs, **extra).train(training)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            assert tensor.device == torch.device("cpu"), name
            if tensor.is_floating_point():
                assert tensor.dtype == dtype, f"{sample.desc}: {name} is {tensor.dtype}"


@parametrized
def test_factory_kwargs(info, variant, training):
    run_check(check_factory_kwargs, info, variant, training)


def check_repr(factory, reference, info, training, sample):
    """repr and str work, and say what PyTorch's module says about its configuration."""
    module = build(factory, sample, torch.float32, training)
    expected = inner(build(reference, sample, torch.float32, training))
    text = repr(module)
    assert str(module) == text
    assert expected.extra_repr() in text, f"{text!r} lacks {expected.extra_repr()!r}"


@parametrized
def test_repr(info, variant, training):
    run_check(check_repr, info, variant, training)


def check_pickle(factory, reference, info, training, sample):
    """torch.save/torch.load, pickle and deepcopy give a module of the same class, mode,
    state and output (test_pickle)."""
    dtype = torch.float64
    args, kwargs = forward_args(sample)
    module = build(factory, sample, dtype, training)
    with freeze_rng_state():
        output = module(*args, **kwargs)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    copies = [
        torch.load(buffer, weights_only=False),
        pickle.loads(pickle.dumps(module)),
        copy.deepcopy(module),
    ]
    for clone in copies:
        assert type(clone) is type(module)
        assert clone.training == module.training
        for key, value in module.state_dict().items():
            assert torch.equal(clone.state_dict()[key], value), key
        with freeze_rng_state():
            assert_equal(clone(*args, **kwargs), output, dtype, f"{sample.desc}: copy")


@parametrized
def test_pickle(info, variant, training):
    run_check(check_pickle, info, variant, training)


def check_state_dict_round_trip(factory, reference, info, training, sample):
    """After a forward step, state_dict loads into PyTorch's module and back, keys and
    values unchanged, and PyTorch's module then computes the same eval output."""
    dtype = torch.float64
    args, kwargs = forward_args(sample)
    module = build(factory, sample, dtype, training)
    with freeze_rng_state():
        module(*args, **kwargs)
    state = inner(module).state_dict()
    target = build(reference, sample, dtype, training, seed=1)
    assert list(inner(target).state_dict()) == list(state), "state_dict keys"
    inner(target).load_state_dict(state)
    back = build(factory, sample, dtype, training, seed=2)
    inner(back).load_state_dict(inner(target).state_dict())
    for key, value in state.items():
        assert torch.equal(inner(back).state_dict()[key], value), key
    if not is_dropout(info):
        target.eval()
        module.eval()
        assert_equal(module(*args, **kwargs), target(*args, **kwargs), dtype,
                     f"{sample.desc}: eval output after the round trip")


@parametrized
def test_state_dict_round_trip(info, variant, training):
    run_check(check_state_dict_round_trip, info, variant, training)


# ---- layouts ------------------------------------------------------------------------------


def _non_contiguous(t):
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    return out.requires_grad_(t.requires_grad)


def _forward_backward(module, args, kwargs, grad_output):
    for t in args:
        if isinstance(t, torch.Tensor):
            t.grad = None
    for p in module.parameters():
        p.grad = None
    with freeze_rng_state():
        output = module(*args, **kwargs)
    if output.requires_grad:
        output.backward(grad_output)
    grads = [t.grad for t in args if isinstance(t, torch.Tensor)]
    return output.detach(), grads, [p.grad for p in module.parameters()]


def check_non_contiguous(factory, reference, info, training, sample):
    """Contiguous and non-contiguous inputs and output gradients give the same output
    and gradients, in every combination (test_non_contiguous_tensors)."""
    dtype = torch.float64
    args, kwargs = forward_args(sample)
    module = build(factory, sample, dtype, training)
    with freeze_rng_state():
        probe = module(*args, **kwargs)
    grad_output = torch.randn(probe.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    default = _forward_backward(module, args, kwargs, grad_output)
    nc_args = tuple(_non_contiguous(t) for t in args)
    for in_args, g_out in product((args, nc_args), (grad_output, _non_contiguous(grad_output))):
        output, grads, param_grads = _forward_backward(module, in_args, kwargs, g_out)
        assert_equal(output, default[0], dtype, f"{sample.desc}: output")
        for got, want in zip(grads, default[1]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        for got, want in zip(param_grads, default[2]):
            torch.testing.assert_close(got, want, equal_nan=True)


@parametrized
def test_non_contiguous_tensors(info, variant, training):
    run_check(check_non_contiguous, info, variant, training, requires_grad=True)


def _formats(ndim):
    if ndim == 4:
        return [torch.contiguous_format, torch.channels_last], [
            torch.preserve_format, torch.contiguous_format, torch.channels_last]
    if ndim == 5:
        return [torch.contiguous_format, torch.channels_last_3d], [
            torch.preserve_format, torch.contiguous_format, torch.channels_last_3d]
    return [torch.contiguous_format], [torch.preserve_format, torch.contiguous_format]


def _assert_format(t, input_format, what):
    if input_format in (torch.channels_last, torch.channels_last_3d):
        assert t.is_contiguous(memory_format=input_format), f"{what} lost {input_format}"
    else:
        assert t.is_contiguous(), f"{what} is not contiguous"


def check_memory_format(factory, reference, info, training, sample):
    """channels_last inputs and modules: the same outputs and gradients as contiguous, and
    outputs and input gradients in the input's memory format (test_memory_format)."""
    dtype = torch.float64
    args, kwargs = forward_args(sample)
    x = args[0]
    input_formats, module_formats = _formats(x.dim())
    module = build(factory, sample, dtype, training)
    params = tuple(module.parameters())
    with freeze_rng_state():
        desired = module(*args, **kwargs)
    grad_output = torch.rand(desired.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    diff = training and desired.requires_grad
    if diff:
        desired_grads = torch.autograd.grad(desired, (x, *params), grad_output)
    for input_format in input_formats:
        x_f = x.detach().clone().to(memory_format=input_format).requires_grad_(x.requires_grad)
        for module_format in module_formats:
            module.to(memory_format=module_format)
            with freeze_rng_state():
                output = module(x_f, *args[1:], **kwargs)
            where = f"{sample.desc}, input {input_format}, module {module_format}"
            assert_equal(output, desired, dtype, f"{where}: output")
            _assert_format(output, input_format, where + ": output")
            if diff:
                g = torch.empty_like(output).copy_(grad_output)
                grads = torch.autograd.grad(output, (x_f, *params), g)
                for got, want in zip(grads, desired_grads):
                    assert_equal(got, want, dtype, f"{where}: gradients")
                _assert_format(grads[0], input_format, where + ": grad_input")


@parametrized
def test_memory_format(info, variant, training):
    run_check(check_memory_format, info, variant, training, requires_grad=True)


# ---- gradients -----------------------------------------------------------------------------


def _gradients_helper(factory, sample, training, check):
    """check (gradcheck or gradgradcheck, with batched gradients) of the total derivative
    with respect to the input and every parameter, then of each partial derivative
    (test_grad/test_gradgrad's _test_gradients_helper)."""
    args, kwargs = forward_args(sample)
    module = build(factory, sample, torch.float64, training)
    params = tuple(module.parameters())

    n_args = len(args)

    def fn(*inputs):
        with freeze_rng_state():
            return module(*inputs[:n_args], **kwargs)

    assert check(fn, args + params, check_batched_grad=True), sample.desc
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    for p, old in zip(params, requires):
        p.requires_grad_(old)
        assert check(fn, args + params, check_batched_grad=True), f"{sample.desc}: partial"
        p.requires_grad_(False)
    for p, old in zip(params, requires):
        p.requires_grad_(old)


def check_grad(factory, reference, info, training, sample):
    _gradients_helper(factory, sample, training, gradcheck)


def check_gradgrad(factory, reference, info, training, sample):
    _gradients_helper(factory, sample, training, gradgradcheck)


@parametrized
def test_grad(info, variant, training):
    run_check(check_grad, info, variant, training, requires_grad=True)


@parametrized
def test_gradgrad(info, variant, training):
    run_check(check_gradgrad, info, variant, training, requires_grad=True)


# ---- modes, construction, errors --------------------------------------------------------------


def check_train_eval_attribute(factory, reference, info, training, sample):
    """Without its `training` attribute, the module's forward fails as PyTorch's does (an
    AttributeError naming 'training') or works as PyTorch's does
    (test_if_train_and_eval_modes_differ)."""
    args, kwargs = forward_args(sample)
    results = []
    for make in (factory, reference):
        module = build(make, sample, torch.float32, training)
        delattr(inner(module), "training")
        results.append(outcome(module, *args, **kwargs))
    got, want = results
    assert got.raised == want.raised, f"{sample.desc}: {got.describe()} vs {want.describe()}"
    if want.raised:
        assert type(got.error) is type(want.error) is AttributeError
        assert "'training'" in str(got.error)


@parametrized
def test_if_train_and_eval_modes_differ(info, variant, training):
    run_check(check_train_eval_attribute, info, variant, training, dtype=torch.float32)


def check_device_ctx_init(factory, reference, info, training, sample):
    """Built under torch.device("meta"): parameters and buffers on meta, with the
    metadata (shape, dtype, strides) of the CPU module's (test_device_ctx_init)."""
    c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    on_cpu = factory(*c_args, **c_kwargs)
    with torch.device("meta"):
        on_meta = factory(*c_args, **c_kwargs)
    pairs = list(zip(on_meta.parameters(), on_cpu.parameters())) + list(
        zip(on_meta.buffers(), on_cpu.buffers()))
    for meta, cpu in pairs:
        assert meta.is_meta
        assert (meta.shape, meta.dtype, meta.stride()) == (cpu.shape, cpu.dtype, cpu.stride())


@parametrized
def test_device_ctx_init(info, variant, training):
    run_check(check_device_ctx_init, info, variant, training, dtype=torch.float32)


def _attempt(make, error_input):
    sample = error_input.module_error_input
    c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        return outcome(make, *c_args, **c_kwargs)
    module = make(*c_args, **c_kwargs)  # in training mode, as in PyTorch's test
    args, kwargs = forward_args(sample)
    return outcome(module, *args, **kwargs)


def check_errors(factory, reference, info, training, error_input):
    """The error input raises its documented type and message, and exactly what
    PyTorch's module raises (test_errors)."""
    got, want = _attempt(factory, error_input), _attempt(reference, error_input)
    assert got.raised, f"{error_input.error_regex!r}: {got.describe()}"
    assert isinstance(got.error, error_input.error_type), got.describe()
    assert re.search(error_input.error_regex, str(got.error)), got.describe()
    assert want.raised and type(got.error) is type(want.error), (
        f"{got.describe()}; PyTorch {want.describe()}")
    assert str(got.error) == str(want.error), f"{got.describe()}; PyTorch {want.describe()}"


@pytest.mark.parametrize("info,variant", CASES, ids=CASE_IDS)
def test_errors(info, variant):
    if info.module_error_inputs_func is None:
        pytest.skip(f"{info.name} has no error inputs in module_db")

    def source():
        return list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                  requires_grad=False, training=True))

    run_check(check_errors, info, variant, True, source=source)


def check_inplace(factory, reference, info, training, sample):
    """The inplace variant gives the out-of-place result and gradient and writes only into
    its own input (test_check_inplace)."""
    dtype = torch.float64
    c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    out_of_place = factory(*c_args, **c_kwargs, inplace=False).train(training)
    in_place = factory(*c_args, **c_kwargs, inplace=True).train(training)
    x = sample.forward_input.args[0]
    version = x._version
    with freeze_rng_state():
        expected = out_of_place(x)
    assert x._version == version, "the out-of-place module wrote into its input"
    x_copy = x.detach().clone().requires_grad_()
    x_clone = x_copy.clone()
    clone_version = x_clone._version
    with freeze_rng_state():
        output = in_place(x_clone)
    assert x_clone._version > clone_version, "the inplace module did not write"
    torch.testing.assert_close(output, expected)
    grad = torch.randn(expected.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    expected.backward(grad)
    output.backward(grad)
    torch.testing.assert_close(x_copy.grad, x.grad)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_check_inplace_dropout(training):
    info = next(i for i in INFOS if i.module_cls is nn.Dropout)
    run_check(check_inplace, info, "plain", training, requires_grad=True)
