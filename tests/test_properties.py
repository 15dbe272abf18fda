"""Property-based tests (hypothesis): fused_bn against PyTorch on random cases.

BatchNorm(+ReLU): random shapes of 2 to 5 dimensions with 0 and 1 possible in every one,
random strides (contiguous, channels_last, permuted, sliced, expanded, storage offset),
dtypes (float64, float32, bfloat16, float16; float32 or same-dtype parameters for the
last two), train/eval steps, every constructor option (affine, track_running_stats,
bias=False, momentum None/0/1/other, eps), and values with NaN, ±Inf, huge, denormal
numbers and constant channels. Forward output, input/weight/bias gradients, running
statistics and num_batches_tracked are compared with PyTorch's modules; errors must be
PyTorch's (type and message) and leave the fused module and the input unchanged.

How results are compared (assert_no_worse_than_torch):
  * NaN exactly where PyTorch (same dtype) has NaN, the same infinities at the same places;
  * elsewhere |fused - ref64| <= atol * scale + rtol * |ref64| + 2 * |torch - ref64|, where
    ref64 is PyTorch in float64 on the same (already rounded) values, `torch` is PyTorch in
    the case's dtype and `scale` is max(1, max |ref64|) over the channel. So fused_bn may be
    at most about twice as far from the exact result as PyTorch itself, plus TOLERANCE:
        float64   atol 1e-9, rtol 1e-8   (PyTorch float64 is the reference itself)
        float32   atol 1e-5, rtol 1e-5
        float16   atol 2e-3, rtol 2e-3   (half an ulp is 2.4e-4 relative)
        bfloat16  atol 1e-2, rtol 1e-2   (half an ulp is 2e-3 relative)
  * the ReLU modules' backward is compared with PyTorch's BatchNorm backward of
    grad_output masked where fused_bn's output is > 0 or NaN (torch.relu's rule applied to
    the output fused_bn returned): at pre-activations within rounding of 0 the two
    implementations may round to different sides, but the gradient must agree with the
    output the user saw (issue #18 item 5).

"Huge" values are large enough that squares overflow but sums of a batch do not (float64
~1e300, float32/bfloat16 ~1e35, float16 ~6e4): at the very edge of the range (float32
3e38) PyTorch itself gives different results for contiguous and channels_last input (a
finite mean with an infinite variance, or NaN), so no single answer exists to compare with.
Constant channels use values whose sums are exact (x - mean is exactly 0).

Every example runs in a forked child (torch_parity.run_forked): a crash (SIGFPE...) fails
the example instead of killing pytest. Profiles (tests/conftest.py): "ci" (default,
derandomized, bounded) and "long" (HYPOTHESIS_PROFILE=long).
"""

import copy
import inspect
import math

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (test extra)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import FUSED_BN, FUSED_BN_RELU, TORCH_BN  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch_parity import (  # noqa: E402
    BATCH_NORM_OPERATOR,
    assert_empty_output_where_torch_fails_on_zero_channels,
    assert_nonfinite_match,
    assert_same_error,
    assert_unchanged,
    outcome,
    run_forked,
    same_values,
    snapshot,
)

import fused_bn  # noqa: E402
import fused_bn.functional as FF  # noqa: E402

TOLERANCE = {  # (atol, rtol), see the module docstring
    torch.float64: (1e-9, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = list(TOLERANCE)
HAS_BIAS_ARGUMENT = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters
HUGE = {torch.float64: 1e300, torch.float32: 1e35, torch.bfloat16: 1e35, torch.float16: 6e4}
DENORMAL = {torch.float64: 1e-310, torch.float32: 1e-40, torch.bfloat16: 1e-40,
            torch.float16: 1e-6}
CONSTANTS = (0.0, 1.5, -3.0, 0.25, 8.0)  # their sums over a batch are exact


# ---- comparison ----------------------------------------------------------------------------


def _channel_scale(reference):
    """max(1, max |reference|) per channel (dim 1; each element of a 1-D tensor), broadcast."""
    r = reference.detach().double()
    finite = torch.where(r.isfinite(), r.abs(), torch.zeros_like(r))
    if r.dim() >= 2 and r.numel():
        dims = [d for d in range(r.dim()) if d != 1]
        per_channel = finite.amax(dim=dims, keepdim=True) if dims else finite
        return per_channel.clamp_min(1.0).expand_as(r)
    return finite.clamp_min(1.0)


def _per_channel(t, like):
    """A per-channel tensor (C,) shaped to broadcast against `like` (channels in dim 1)."""
    if like.dim() >= 2:
        return t.view(1, -1, *([1] * (like.dim() - 2)))
    return t


def assert_no_worse_than_torch(fused, same, ref64, dtype, what, rounding=None):
    """See the module docstring. `same`: PyTorch's result in the case's dtype, or a list
    of such results (PyTorch on the input's layout and on a contiguous copy), any of which
    fused_bn may follow. `rounding`: a per-channel absolute allowance for the rounding that
    an ill-conditioned channel amplifies (see conditioning())."""
    alternatives = same if isinstance(same, (list, tuple)) else [same]
    failures = []
    for candidate in alternatives:
        try:
            _compare_with_torch(fused, candidate, ref64, dtype, what, rounding)
            return
        except AssertionError as error:
            failures.append(str(error))
    if len(failures) > 1:
        failures[1] = "against PyTorch on a contiguous copy of the input: " + failures[1]
    raise AssertionError("\n".join(failures))


def _compare_with_torch(fused, same, ref64, dtype, what, rounding):
    assert fused is not None and same is not None, f"{what}: {fused} vs {same}"
    assert fused.dtype == same.dtype, f"{what}: dtype {fused.dtype}, PyTorch {same.dtype}"
    assert fused.shape == same.shape, f"{what}: shape {fused.shape}, PyTorch {same.shape}"
    atol, rtol = TOLERANCE[dtype]
    f, t, r = (v.detach().double() for v in (fused, same, ref64))
    t_finite, r_finite, f_finite = t.isfinite(), r.isfinite(), f.isfinite()
    base = atol * _channel_scale(r)
    if rounding is not None and f.numel():
        base = base + _per_channel(rounding.nan_to_num(0.0, 0.0, 0.0), f)
    zero = torch.zeros_like(f)
    # Where PyTorch is finite: near the float64 result (or PyTorch's, where that is not
    # finite), at most about twice as far as PyTorch.
    target = torch.where(r_finite, r, t)
    allowed = base + rtol * target.abs().nan_to_num(0.0, 0.0, 0.0) + torch.where(
        r_finite & t_finite, 2 * (t - r).abs(), zero)
    ok_finite = f_finite & ((f - target).abs() <= allowed)
    # Where PyTorch is NaN or infinite: the same NaN/Inf; or, where PyTorch lost a finite
    # float64 result (an overflow of its own), that result.
    same_special = (f.isnan() & t.isnan()) | (t.isinf() & (f == t))
    better = r_finite & f_finite & ((f - r).abs() <= base + rtol * r.abs())
    ok_special = same_special | better
    bad = torch.where(t_finite, ~ok_finite, ~ok_special)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pick = [tuple(i) for i in idx]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {f.numel()} values differ from PyTorch's more than "
            f"allowed ({int((bad & f.isnan()).sum())} NaN, {int((bad & f.isinf()).sum())} "
            f"infinite); at {idx}: fused_bn {[f[i].item() for i in pick]}, PyTorch "
            f"{[t[i].item() for i in pick]}, PyTorch float64 {[r[i].item() for i in pick]}, "
            f"allowed error {[allowed[i].item() for i in pick]}"
        )


def _reduce_per_channel(t, op):
    dims = [d for d in range(t.dim()) if d != 1]
    if t.shape[1] == 0:
        return t.new_zeros(0)
    if t.numel() == 0:
        return t.new_zeros(t.shape[1])
    return op(t, dim=dims) if dims else t


def conditioning(x64, invstd, acc_dtype):
    """Per channel: how far rounding in the accumulation dtype may legitimately move
    x_hat = (x - mean) * invstd, in units of x_hat: 16 ulps of the largest |x| (and |mean|)
    times invstd. Where the variance is tiny next to the values (constant channels, an
    expanded input, eps = 1e-10), neither PyTorch nor fused_bn is more accurate than this,
    and either may be the closer one by chance."""
    unit = torch.finfo(acc_dtype).eps
    finite = torch.where(x64.isfinite(), x64.abs(), torch.zeros_like(x64))
    largest = _reduce_per_channel(finite, torch.amax)
    return (16 * unit * (largest + 1) * invstd).nan_to_num(0.0, 0.0, 0.0)


# ---- cases ---------------------------------------------------------------------------------


@st.composite
def shapes(draw, max_numel=720):
    ndim = draw(st.integers(2, 5))
    size = st.integers(0, 5)
    shape = [draw(size), draw(st.integers(0, 4))] + [draw(size) for _ in range(ndim - 2)]
    while math.prod(shape) > max_numel:  # keep examples fast
        shape[shape.index(max(shape))] //= 2
    return tuple(shape)


@st.composite
def layouts(draw, ndim):
    kinds = ["contiguous", "permuted", "sliced", "expanded", "offset"]
    if ndim in (4, 5):
        kinds.append("channels_last")
    kind = draw(st.sampled_from(kinds))
    if kind == "permuted":
        return (kind, tuple(draw(st.permutations(range(ndim)))))
    if kind == "sliced":
        return (kind, draw(st.integers(0, ndim - 1)), draw(st.integers(2, 3)))
    if kind == "expanded":
        return (kind, draw(st.integers(0, ndim - 1)))
    if kind == "offset":
        return (kind, draw(st.integers(1, 7)))
    return (kind,)


def momentum_values():
    return st.one_of(st.sampled_from([None, 0.0, 1.0, 0.1]), st.floats(0.0, 1.0))


@st.composite
def bn_cases(draw, specials):
    shape = draw(shapes())
    dtype = draw(st.sampled_from(DTYPES))
    reduced = dtype in (torch.float16, torch.bfloat16)
    affine = draw(st.booleans())
    options = dict(
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0, 1e-10])),
        momentum=draw(momentum_values()),
        affine=affine,
        track_running_stats=draw(st.booleans()),
    )
    if affine and HAS_BIAS_ARGUMENT and draw(st.booleans()):
        options["bias"] = False
    return dict(
        shape=shape,
        dtype=dtype,
        parameter_dtype=draw(st.sampled_from(["float32", "same"])) if reduced else "same",
        activation=draw(st.sampled_from(["identity", "relu"])),
        options=options,
        steps=draw(st.sampled_from([["train"], ["eval"], ["train", "eval"], ["train", "train"],
                                    ["eval", "train"]])),
        layout=draw(layouts(len(shape))),
        grad_layout=draw(st.sampled_from(["contiguous", "like_input"])),
        values=draw(value_specs(specials)),
        num_batches_tracked=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def value_specs(draw, specials):
    spec = dict(
        scale=draw(st.sampled_from([1.0, 1e-2, 30.0])),
        offset=draw(st.sampled_from([0.0, 0.5, -2.0])),
        specials=[],
        constant_channels=0.0,
    )
    if specials:
        spec["specials"] = draw(st.lists(
            st.sampled_from(["nan", "inf", "-inf", "huge", "-huge", "denormal", "-denormal"]),
            min_size=1, max_size=3))
        spec["special_fraction"] = draw(st.sampled_from([0.02, 0.2, 1.0]))
        spec["constant_channels"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
    return spec


def make_values(shape, spec, dtype, generator):
    """float64 values, exactly representable in `dtype`."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * spec["scale"]
    x = x + spec["offset"]
    if len(shape) >= 2 and spec["constant_channels"] and shape[1]:
        pick = torch.rand(shape[1], generator=generator) < spec["constant_channels"]
        for c in pick.nonzero().flatten().tolist():
            x[:, c] = CONSTANTS[c % len(CONSTANTS)]
    if spec["specials"] and x.numel():
        table = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                 "huge": HUGE[dtype], "-huge": -HUGE[dtype],
                 "denormal": DENORMAL[dtype], "-denormal": -DENORMAL[dtype]}
        where = torch.rand(shape, generator=generator) < spec["special_fraction"]
        which = torch.randint(len(spec["specials"]), shape, generator=generator)
        for k, name in enumerate(spec["specials"]):
            mask = where & (which == k)
            if name in ("huge", "-huge", "denormal", "-denormal"):
                # Spread magnitudes (0.5 to 1 times the value) so that channels vary.
                factor = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.5 + 0.5
                x = torch.where(mask, table[name] * factor, x)
            else:
                x = torch.where(mask, torch.full_like(x, table[name]), x)
    return x.to(dtype).double()


def arrange(values, layout, dtype):
    """(leaf, view): a leaf tensor holding `values` in the layout's storage, and the function
    that turns a copy of the leaf into the input with the layout's strides."""
    kind = layout[0]
    shape = values.shape
    if kind == "channels_last":
        fmt = torch.channels_last if values.dim() == 4 else torch.channels_last_3d
        return values.to(dtype).contiguous(memory_format=fmt), lambda t: t
    if kind == "permuted":
        perm = layout[1]
        inverse = [perm.index(d) for d in range(len(perm))]
        return values.permute(perm).contiguous().to(dtype), lambda t: t.permute(inverse)
    if kind == "sliced":
        dim, step = layout[1], layout[2]
        big_shape = list(shape)
        big_shape[dim] = shape[dim] * step
        big = torch.zeros(big_shape, dtype=torch.float64)
        index = [slice(None)] * len(shape)
        index[dim] = slice(None, None, step)
        big[tuple(index)] = values
        return big.to(dtype), lambda t: t[tuple(index)]
    if kind == "expanded":
        dim = layout[1]
        index = [slice(None)] * len(shape)
        index[dim] = slice(0, 1)
        base = values[tuple(index)].clone()
        if shape[dim] == 0:
            base = values.new_zeros([1 if d == dim else s for d, s in enumerate(shape)])
        return base.to(dtype), lambda t: t.expand(shape)
    if kind == "offset":
        k = layout[1]
        flat = torch.zeros(k + values.numel(), dtype=torch.float64)
        flat[k:] = values.flatten()
        return flat.to(dtype), lambda t: t[k:].view(shape)
    return values.to(dtype), lambda t: t


# ---- BatchNorm(+ReLU) modules ----------------------------------------------------------------


def _kind(shape):
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


def build_modules(case):
    """(PyTorch BatchNorm in the case's parameter dtype, the same in float64, the fused
    module), with equal random parameters, running statistics and num_batches_tracked."""
    shape, options = case["shape"], case["options"]
    kind, channels = _kind(shape), shape[1]
    dtype = case["dtype"]
    param_dtype = torch.float32 if case["parameter_dtype"] == "float32" else dtype
    reference = TORCH_BN[kind](channels, **options)
    g = torch.Generator().manual_seed(case["seed"] ^ 0x5EED)
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.copy_(torch.rand(channels, generator=g) * 3 - 1.5)
        if reference.bias is not None:
            reference.bias.copy_(torch.randn(channels, generator=g) * 0.5)
        if reference.running_mean is not None:
            reference.running_mean.copy_(torch.randn(channels, generator=g) * 0.3)
            reference.running_var.copy_(torch.rand(channels, generator=g) * 1.8 + 0.2)
            reference.num_batches_tracked.fill_(case["num_batches_tracked"])
    reference = reference.to(param_dtype)
    reference64 = copy.deepcopy(reference).double()
    family = FUSED_BN_RELU if case["activation"] == "relu" else FUSED_BN
    fused = family[kind](channels, **options).to(param_dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, reference64, fused


def _batch_invstd(x64, eps):
    dims = [d for d in range(x64.dim()) if d != 1]
    var = x64.var(dim=dims, unbiased=False) if x64.numel() else x64.new_zeros(x64.shape[1])
    return (var + eps).rsqrt()


def check_bn_case(case):
    """One case, step by step, through fused_bn, PyTorch in the case's dtype (twice: on the
    input as laid out, and on a contiguous copy, since PyTorch's CPU kernels for the two
    differ where the variance overflows) and PyTorch in float64."""
    dtype, shape = case["dtype"], case["shape"]
    reference, reference64, fused = build_modules(case)
    reference_contiguous = copy.deepcopy(reference)
    torch_modules = (reference, reference_contiguous)
    relu = case["activation"] == "relu"
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    eps = case["options"]["eps"]
    g = torch.Generator().manual_seed(case["seed"])
    for step, mode in enumerate(case["steps"]):
        training = mode == "train"
        for module in (*torch_modules, reference64, fused):
            module.train(training)
            for p in module.parameters():
                p.grad = None
        values = make_values(shape, case["values"], dtype, g)
        leaf, view = arrange(values, case["layout"], dtype)
        grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if case["grad_layout"] == "like_input" and leaf.dim() == len(shape):
            grad = torch.empty_like(view(leaf)).copy_(grad)
        leaves = {name: leaf.detach().clone().requires_grad_() for name in ("t", "c", "f")}
        leaves["64"] = leaf.detach().double().requires_grad_()
        inputs = {name: view(t) for name, t in leaves.items()}
        inputs["c"] = inputs["c"].contiguous()
        for x in inputs.values():  # gradients per input element, before any expand's sum
            x.retain_grad()
        where = f"step {step} ({mode})"

        before = snapshot(fused=fused, input=inputs["f"])
        expected = outcome(reference, inputs["t"])
        actual = outcome(fused, inputs["f"])
        if assert_empty_output_where_torch_fails_on_zero_channels(expected, actual, inputs["f"]):
            return
        if expected.raised:
            assert_same_error(expected, actual)
            assert_unchanged(before, fused=fused, input=inputs["f"])
            return
        assert not actual.raised, f"{where}: PyTorch returned, fused_bn {actual.describe()}"
        batch_stats = training or reference64.running_var is None
        x64 = inputs["64"].detach()
        if batch_stats:
            invstd = _batch_invstd(x64, eps)
            mean_size = x64.new_zeros(shape[1])
        else:
            invstd = (before["fused.running_var"][0].double() + eps).rsqrt()
            mean_size = before["fused.running_mean"][0].double().abs()
        xhat_rounding = conditioning(x64, invstd, acc_dtype) + conditioning(
            mean_size.view(1, -1), invstd, acc_dtype)
        weight = reference64.weight
        w_abs = weight.detach().abs() if weight is not None else torch.ones(shape[1])

        out_f = actual.value
        pre = [expected.value, reference_contiguous(inputs["c"])]
        pre_64 = reference64(inputs["64"])
        activate = F.relu if relu else (lambda t: t)
        assert_no_worse_than_torch(out_f, [activate(t) for t in pre], activate(pre_64), dtype,
                                   f"{where}: output", rounding=xhat_rounding * w_abs)

        # Backward; the ReLU mask is that of the output fused_bn returned.
        passes = ~(out_f.detach() <= 0) if relu else torch.ones_like(out_f, dtype=torch.bool)
        grads = {}
        if out_f.requires_grad:
            out_f.backward(grad)
            for t in pre:
                t.backward(grad * passes)
            masked = grad.double() * passes
            pre_64.backward(masked)
            g_abs = masked.abs().nan_to_num(0.0, 0.0, 0.0)
            g_max = _reduce_per_channel(g_abs, torch.amax)
            g_sum = _reduce_per_channel(g_abs, torch.sum)
            sum_rounding = 16 * torch.finfo(acc_dtype).eps * g_sum
            assert_no_worse_than_torch(
                inputs["f"].grad, [inputs["t"].grad, inputs["c"].grad], inputs["64"].grad, dtype,
                f"{where}: grad_input",
                rounding=4 * xhat_rounding * w_abs * invstd.nan_to_num(0, 0, 0) * g_max)
            if reference.weight is not None:
                grads["weight"] = xhat_rounding * g_sum + sum_rounding
            if reference.bias is not None:
                grads["bias"] = sum_rounding
        for name, rounding in grads.items():
            assert_no_worse_than_torch(
                getattr(fused, name).grad, [getattr(m, name).grad for m in torch_modules],
                getattr(reference64, name).grad, dtype, f"{where}: grad_{name}",
                rounding=rounding)
        if batch_stats and reference.running_mean is not None:
            finite = torch.where(x64.isfinite(), x64.abs(), torch.zeros_like(x64))
            largest = _reduce_per_channel(finite, torch.amax)
            unit = 16 * torch.finfo(acc_dtype).eps
            stats_rounding = {"running_mean": unit * largest,
                              "running_var": unit * largest.square() * 2}
        else:
            stats_rounding = {"running_mean": None, "running_var": None}
        for name in ("running_mean", "running_var"):
            if getattr(reference, name) is not None:
                assert_no_worse_than_torch(
                    getattr(fused, name), [getattr(m, name) for m in torch_modules],
                    getattr(reference64, name), dtype, f"{where}: {name}",
                    rounding=stats_rounding[name])
        if reference.num_batches_tracked is not None:
            assert fused.num_batches_tracked.item() == reference.num_batches_tracked.item()


@given(case=bn_cases(specials=False))
def test_batch_norm_modules_match_torch(case):
    run_forked(check_bn_case, case)


@given(case=bn_cases(specials=True))
def test_batch_norm_modules_match_torch_on_special_values(case):
    run_forked(check_bn_case, case)


# ---- functional ---------------------------------------------------------------------------


@st.composite
def functional_cases(draw):
    shape = draw(shapes(max_numel=240))
    dtype = draw(st.sampled_from(DTYPES))
    reduced = dtype in (torch.float16, torch.bfloat16)
    return dict(
        shape=shape,
        dtype=dtype,
        parameter_dtype=draw(st.sampled_from(["float32", "same"])) if reduced else "same",
        activation=draw(st.sampled_from(["identity", "relu"])),
        training=draw(st.booleans()),
        running_stats=draw(st.booleans()),
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        momentum=draw(st.one_of(st.sampled_from([0.0, 1.0, 0.1]), st.floats(0.0, 1.0))),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        values=draw(value_specs(specials=draw(st.booleans()))),
        layout=draw(layouts(len(shape))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_functional_case(case):
    """fused_bn.functional.batch_norm(..., activation) against F.batch_norm (+ F.relu)."""
    dtype, shape = case["dtype"], case["shape"]
    channels = shape[1]
    param_dtype = torch.float32 if case["parameter_dtype"] == "float32" else dtype
    g = torch.Generator().manual_seed(case["seed"])
    values = make_values(shape, case["values"], dtype, g)
    leaf, view = arrange(values, case["layout"], dtype)
    tensors = dict(
        weight=torch.rand(channels, generator=g) * 3 - 1.5 if case["weight"] else None,
        bias=torch.randn(channels, generator=g) if case["bias"] else None,
        running_mean=torch.randn(channels, generator=g) * 0.3 if case["running_stats"] else None,
        running_var=torch.rand(channels, generator=g) + 0.2 if case["running_stats"] else None,
    )

    def arguments(to_dtype):
        return {k: None if v is None else v.to(to_dtype).clone() for k, v in tensors.items()}

    def call(fn, x, args):
        return fn(x, args["running_mean"], args["running_var"], args["weight"], args["bias"],
                  training=case["training"], momentum=case["momentum"], eps=case["eps"])

    args_t, args_f, args_64 = arguments(param_dtype), arguments(param_dtype), arguments(
        torch.float64)
    args_c = arguments(param_dtype)  # PyTorch on a contiguous copy (see check_bn_case)
    x_t, x_f, x_64 = view(leaf.clone()), view(leaf.clone()), view(leaf.double())
    x_c = view(leaf.clone()).contiguous()
    before = snapshot(input=x_f, **{k: v for k, v in args_f.items() if v is not None})
    expected = outcome(call, F.batch_norm, x_t, args_t)
    actual = outcome(call, lambda *a, **k: FF.batch_norm(*a, **k, activation=case["activation"]),
                     x_f, args_f)
    if assert_empty_output_where_torch_fails_on_zero_channels(expected, actual, x_f):
        return
    if expected.raised:
        assert_same_error(expected, actual)
        assert_unchanged(before, input=x_f, **{k: v for k, v in args_f.items() if v is not None})
        return
    assert not actual.raised, f"PyTorch returned, fused_bn {actual.describe()}"
    relu = case["activation"] == "relu"
    activate = F.relu if relu else (lambda t: t)
    out_t = [activate(expected.value), activate(call(F.batch_norm, x_c, args_c))]
    x64 = x_64.detach()
    batch_stats = case["training"] or not case["running_stats"]
    if batch_stats:
        invstd, mean_size = _batch_invstd(x64, case["eps"]), x64.new_zeros(channels)
    else:
        invstd = (tensors["running_var"].double() + case["eps"]).rsqrt()
        mean_size = tensors["running_mean"].double().abs()
    out_64 = call(F.batch_norm, x_64, args_64)
    out_64 = F.relu(out_64) if relu else out_64
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w_abs = args_64["weight"].abs() if case["weight"] else torch.ones(channels, dtype=torch.float64)
    rounding = conditioning(x64, invstd, acc_dtype) + conditioning(
        mean_size.view(1, -1), invstd, acc_dtype)
    assert_no_worse_than_torch(actual.value, out_t, out_64, dtype, "output",
                               rounding=rounding * w_abs)
    finite = torch.where(x64.isfinite(), x64.abs(), torch.zeros_like(x64))
    largest = _reduce_per_channel(finite, torch.amax)
    unit = 16 * torch.finfo(acc_dtype).eps
    stats_rounding = {"running_mean": unit * largest, "running_var": unit * largest.square() * 2}
    for name in ("running_mean", "running_var"):
        if args_t[name] is not None:
            assert_no_worse_than_torch(args_f[name], [args_t[name], args_c[name]],
                                       args_64[name], dtype, name,
                                       rounding=stats_rounding[name] if batch_stats else None)


@given(case=functional_cases())
def test_functional_batch_norm_matches_torch(case):
    run_forked(check_functional_case, case)


# ---- hostile arguments: PyTorch's errors, nothing changed -------------------------------------


@st.composite
def hostile_cases(draw):
    kind = draw(st.integers(1, 3))
    channels = draw(st.integers(0, 4))
    ndim = draw(st.sampled_from({1: [2, 3], 2: [4], 3: [5]}[kind]))
    if draw(st.booleans()):  # a wrong number of dimensions
        ndim = draw(st.integers(1, 6))
    shape = [draw(st.integers(0, 3)) for _ in range(ndim)]
    if ndim >= 2 and draw(st.booleans()):
        shape[1] = channels
    return dict(
        kind=kind,
        channels=channels,
        shape=tuple(shape),
        activation=draw(st.sampled_from(["identity", "relu"])),
        training=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 0.0, -0.0, -1e-5, -1.0])),
        momentum=draw(momentum_values()),
        affine=draw(st.booleans()),
        track_running_stats=draw(st.booleans()),
        input_dtype=draw(st.sampled_from(DTYPES + [torch.int64, torch.bool])),
        parameter_dtype=draw(st.sampled_from(DTYPES)),
        odd_tensor=draw(st.sampled_from(
            [None, "weight", "bias", "running_mean", "running_var"])),
        odd=draw(st.sampled_from(["dtype", "length", "shape_c1", "requires_grad"])),
        odd_dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _torch_rejects_shaped_running_stat(expected, case):
    return (
        expected.raised
        and case["odd"] == "shape_c1"
        and case["odd_tensor"] in ("running_mean", "running_var")
        and "TensorAccessor expected 1 dims but tensor has 2" in str(expected.error)
    )


def check_hostile_case(case):
    """Any combination: fused_bn raises exactly when PyTorch raises, with its exception
    type and message, and then leaves the module and the input as they were; when PyTorch
    returns, the outputs agree."""
    kind, channels = case["kind"], case["channels"]
    options = dict(eps=case["eps"], momentum=case["momentum"], affine=case["affine"],
                   track_running_stats=case["track_running_stats"])
    modules = []
    for family in (None, FUSED_BN_RELU if case["activation"] == "relu" else FUSED_BN):
        cls = TORCH_BN[kind] if family is None else family[kind]
        module = cls(channels, **options).to(case["parameter_dtype"]).train(case["training"])
        name = case["odd_tensor"]
        if name is not None and getattr(module, name) is not None:
            tensor = getattr(module, name).detach()
            if case["odd"] == "dtype":
                tensor = tensor.to(case["odd_dtype"])
            elif case["odd"] == "length":
                tensor = torch.ones(channels + 1, dtype=tensor.dtype)
            elif case["odd"] == "shape_c1":
                tensor = tensor.reshape(channels, 1)
            if isinstance(getattr(module, name), nn.Parameter):
                setattr(module, name, nn.Parameter(tensor))
            else:
                setattr(module, name, tensor.requires_grad_(case["odd"] == "requires_grad"))
        modules.append(module)
    reference, fused = modules
    g = torch.Generator().manual_seed(case["seed"])
    x = (torch.randn(case["shape"], generator=g, dtype=torch.float64) * 3).to(case["input_dtype"])
    before = snapshot(fused=fused, input=x)
    expected = outcome(reference, x.clone())
    if _torch_rejects_shaped_running_stat(expected, case):
        # Better than PyTorch (see test_running_stats_of_shape_c_by_1_work_like_flat_ones):
        # fused_bn computes what PyTorch computes with the flat statistic.
        name = case["odd_tensor"]
        setattr(reference, name, getattr(reference, name).reshape(-1))
        expected = outcome(reference, x.clone())
    actual = outcome(fused, x)
    if assert_empty_output_where_torch_fails_on_zero_channels(expected, actual, x):
        return
    if expected.raised:
        assert_same_error(expected, actual, operator=BATCH_NORM_OPERATOR)
        assert_unchanged(before, fused=fused, input=x)
        return
    assert not actual.raised, f"PyTorch returned, fused_bn {actual.describe()}"
    y = F.relu(expected.value) if case["activation"] == "relu" else expected.value
    if y.numel() == 0:  # of any dtype, integers included, as PyTorch returns it
        assert actual.value.shape == y.shape and actual.value.dtype == y.dtype
        return
    assert_no_worse_than_torch(actual.value, y, y, case["input_dtype"], "output")


@given(case=hostile_cases())
def test_hostile_arguments_raise_torchs_errors_and_change_nothing(case):
    run_forked(check_hostile_case, case)


# ---- Dropout -------------------------------------------------------------------------------


@st.composite
def dropout_cases(draw):
    shape = draw(shapes(max_numel=4000))
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        p=draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-6, 1 - 1e-6]), st.floats(0.0, 1.0))),
        training=draw(st.booleans()),
        inplace=draw(st.booleans()),
        requires_grad=draw(st.booleans()),
        module=draw(st.booleans()),
        mask_mode=draw(st.sampled_from(["bits", "recompute"])),
        layout=draw(layouts(len(shape))),
        specials=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _dropout_call(case, functional, module_cls, x):
    if case["module"]:
        module = module_cls(case["p"], case["inplace"])
        return module.train(case["training"])(x)
    return functional(x, case["p"], case["training"], case["inplace"])


def check_dropout_case(case):
    """Dropout's observable contract, compared with nn.Dropout / F.dropout:
    the same result object (the input itself in eval, for p = 0, in place), p = 1 gives
    exact zeros, every element is either dropped (0; NaN for NaN/Inf input, as x * 0) or
    scaled exactly by 1 / (1 - p), the kept fraction within binomial bounds, NaN kept where
    the input is NaN, the gradient masked and scaled like the output, and PyTorch's errors."""
    dtype, shape, p = case["dtype"], case["shape"], case["p"]
    g = torch.Generator().manual_seed(case["seed"])
    spec = dict(scale=1.0, offset=0.0, constant_channels=0.0,
                specials=["nan", "inf", "-inf", "denormal"] if case["specials"] else [],
                special_fraction=0.05)
    values = make_values(shape, spec, dtype, g)
    leaf, view = arrange(values, case["layout"], dtype)

    def prepare():
        base = leaf.detach().clone().requires_grad_(case["requires_grad"])
        x = view(base)
        if case["inplace"] and case["requires_grad"]:
            x = x * 1  # a non-leaf, which in-place dropout may modify under autograd
        return base, x

    base_t, x_t = prepare()
    base_f, x_f = prepare()
    x_in = x_f.detach().clone()
    mask_mode = case["mask_mode"]
    expected = outcome(_dropout_call, case, F.dropout, nn.Dropout, x_t)
    actual = outcome(
        _dropout_call, case,
        lambda *a: FF.dropout(*a, mask_mode=mask_mode),
        lambda p_, inplace: fused_bn.Dropout(p_, inplace, mask_mode=mask_mode), x_f)
    if expected.raised:
        assert_same_error(expected, actual)
        return
    assert not actual.raised, f"PyTorch returned, fused_bn {actual.describe()}"
    out_t, out_f = expected.value, actual.value
    assert (out_t is x_t) == (out_f is x_f), "returns the input itself where PyTorch does"
    assert out_f.shape == shape and out_f.dtype == dtype
    if not case["training"] or p == 0:
        assert same_values(out_f.detach(), x_in), "eval and p = 0: the input's values"
        return
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y, x = out_f.detach(), x_in
    if p == 1:
        assert_nonfinite_match(y, out_t.detach(), "output")  # x * 0: NaN at NaN and Inf
        assert not y.nan_to_num().any()
    else:
        scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
        kept_value = (x.to(acc) * scale).to(dtype)
        dropped_value = (x.to(acc) * 0).to(dtype)  # 0, or NaN for NaN and Inf
        kept = (y == kept_value) | (y.isnan() & kept_value.isnan())
        dropped = (y == dropped_value) | (y.isnan() & dropped_value.isnan())
        assert (kept | dropped).all(), (
            f"elements neither kept (x / (1 - p), rounded once) nor dropped: "
            f"x {x[~(kept | dropped)][:5].tolist()}, output {y[~(kept | dropped)][:5].tolist()}"
        )
        # The kept fraction over elements where kept and dropped differ.
        decidable = x.isfinite() & (kept_value != 0) & (x != 0)
        n = int(decidable.sum())
        if n:
            k = int((y[decidable] != 0).sum())
            sigma = math.sqrt(n * p * (1 - p))
            assert abs(k - n * (1 - p)) <= 6 * sigma + 1, f"kept {k} of {n} at p = {p}"
    if case["requires_grad"] and out_f.requires_grad and case["layout"][0] != "expanded":
        grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        out_f.backward(grad)
        got = view(base_f.grad)
        if p == 1:
            assert not got.any(), "p = 1: the gradient is 0"
        else:
            # Where the output shows the decision (finite non-zero input), the gradient is
            # grad_output scaled exactly like the kept values, or 0.
            visible = x.isfinite() & (x != 0)
            scale = torch.tensor(1.0 / (1.0 - p), dtype=acc)
            expected_grad = torch.where(y != 0, (grad.to(acc) * scale).to(dtype),
                                        torch.zeros_like(grad))
            assert torch.equal(got[visible], expected_grad[visible]), "gradient"


@given(case=dropout_cases())
def test_dropout_matches_torch_semantics(case):
    run_forked(check_dropout_case, case)


@given(p=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
    [math.nan, -0.0, 1.0 + 1e-12, -1e-300, math.inf, -math.inf, 2, -1])),
    training=st.booleans(), inplace=st.booleans())
def test_dropout_probability_errors_match_torch(p, training, inplace):
    """Constructor and call with any float p: PyTorch's exception type and message, or
    success where PyTorch succeeds."""
    x = torch.ones(3, 4)
    for make_torch, make_fused in ((nn.Dropout, fused_bn.Dropout),):
        expected = outcome(make_torch, p, inplace)
        actual = outcome(make_fused, p, inplace)
        if expected.raised:
            assert_same_error(expected, actual)
        else:
            assert not actual.raised, actual.describe()
    expected = outcome(F.dropout, x.clone(), p, training, inplace)
    actual = outcome(FF.dropout, x.clone(), p, training, inplace)
    if expected.raised:
        assert_same_error(expected, actual)
    else:
        assert not actual.raised, f"PyTorch returned, fused_bn {actual.describe()}"
