"""fused_bn Dropout: Philox known answers, the documented keep rule, statistics,
exact forward/backward, PyTorch semantics, autograd, opcheck, torch.compile and
saved memory. CPU and CUDA masks are compared bit for bit when a GPU is present."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import layout_input
from torch import nn

import fused_bn
import fused_bn.functional as FF

ops = torch.ops.fused_bn

MASK_MODES = ("bits", "recompute")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "strided")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device (compares CUDA against CPU bit for bit)",
)

# Random123's known-answer vectors for Philox4x32-10: (counter, key, result),
# words low first.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def low_high(value):
    return value & 0xFFFFFFFF, value >> 32


def reference_keep(numel, p, seed, offset):
    """The keep rule of include/fused_bn/dropout_mask.h, written out in Python on
    top of the philox4x32 op (checked against the known answers)."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64)
    offset_lo, offset_hi = low_high(offset)
    counter = torch.stack(
        [
            groups & 0xFFFFFFFF,
            groups >> 32,
            torch.full_like(groups, offset_lo),
            torch.full_like(groups, offset_hi),
        ],
        dim=1,
    )
    draws = ops.philox4x32(counter, torch.tensor(low_high(seed))).reshape(-1)[:numel]
    threshold = math.floor((1.0 - p) * 2**32 + 0.5)
    return draws < threshold


def unpack_mask(mask, numel):
    bits = (mask.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=mask.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def memory_order(t):
    """The elements of a non-overlapping dense tensor (such as an empty_like
    result) in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def from_memory_order(flat, like):
    """A tensor laid out as empty_like(like) whose memory order is `flat`."""
    out = torch.empty_like(like, dtype=flat.dtype)
    memory_order(out).copy_(flat)
    return out


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled(values, keep, p):
    """values * keep / (1 - p) in the accumulation dtype, rounded to values' dtype."""
    acc = acc_dtype(values.dtype)
    scale = torch.tensor(1.0 / (1.0 - p) if p < 1 else 0.0, dtype=acc)
    return (values.to(acc) * keep.to(acc) * scale).to(values.dtype)


def seed_offset(seed=0x1234_5678_9ABC, offset=0x2_0000_0007):
    return torch.tensor([seed, offset], dtype=torch.int64)


# ---- Philox and the keep rule --------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_philox_known_answers(device):
    for counter, key, expected in PHILOX_KNOWN_ANSWERS:
        result = ops.philox4x32(
            torch.tensor([counter], device=device), torch.tensor(key, device=device)
        )
        assert result.cpu().tolist() == [list(expected)]


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 4099, 100_003])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_and_output_follow_the_documented_rule(numel, p):
    seed, offset = 0x1234_5678_9ABC, 0x2_0000_0007  # both with non-zero high words
    x = torch.randn(numel, dtype=torch.float64)
    out, mask = ops.dropout(x, p, seed_offset(seed, offset), True)
    keep = reference_keep(numel, p, seed, offset)
    assert mask.dtype == torch.uint8 and mask.shape == ((numel + 7) // 8,)
    assert torch.equal(unpack_mask(mask, numel), keep)
    assert torch.equal(out, scaled(x, keep, p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_bounds(p):
    n = 1 << 21
    _, mask = ops.dropout(torch.ones(n), p, seed_offset(7, 3), True)
    kept = unpack_mask(mask, n).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma


def correlation(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum() / (a.norm() * b.norm())


def test_no_correlation_between_neighbours_or_channels():
    shape = (16, 64, 32, 32)
    n = math.prod(shape)
    _, mask = ops.dropout(torch.ones(shape), 0.5, seed_offset(11, 0), True)
    keep = unpack_mask(mask, n)
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 5, 7, 8, 16):  # within and across Philox groups and mask bytes
        assert abs(correlation(keep[:-lag], keep[lag:])) < bound, lag
    # Per-channel masks (over batch and space): pairwise correlations of 64
    # channels stay within the noise of 16 * 32 * 32 samples each.
    per_channel = keep.reshape(shape).transpose(0, 1).reshape(shape[1], -1).double()
    corr = torch.corrcoef(per_channel)
    off_diagonal = corr[~torch.eye(shape[1], dtype=torch.bool)]
    assert off_diagonal.abs().max() < 5.5 / math.sqrt(per_channel.shape[1])


def test_different_seeds_and_offsets_give_independent_masks():
    n = 1 << 16
    masks = [
        unpack_mask(ops.dropout(torch.ones(n), 0.5, seed_offset(s, o), True)[1], n)
        for s, o in [(1, 0), (2, 0), (1, 1), (1 << 40, 0)]
    ]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert abs(correlation(masks[i], masks[j])) < 5 / math.sqrt(n)


def test_thread_count_does_not_change_the_mask():
    x = torch.randn(3, 5, 257, 129)  # not a multiple of 8 elements
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(ops.dropout(x, 0.3, seed_offset(), True))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ---- exact forward and backward ------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("save_mask", [True, False])
def test_forward_and_backward_are_exact(dtype, layout, save_mask):
    p = 0.3
    x = layout_input((4, 6, 9, 11), layout, dtype).requires_grad_()
    seed, offset = 99, 5
    out, mask = ops.dropout(x, p, seed_offset(seed, offset), save_mask)
    assert out.stride() == torch.empty_like(x).stride()
    keep = from_memory_order(reference_keep(x.numel(), p, seed, offset), out)
    assert torch.equal(out, scaled(x.detach(), keep, p))
    assert mask.numel() == ((x.numel() + 7) // 8 if save_mask else 0)
    grad_out = layout_input((4, 6, 9, 11), "contiguous", dtype, seed=5)
    (grad_in,) = torch.autograd.grad(out, x, grad_out)
    assert torch.equal(grad_in, scaled(grad_out, keep, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset_elements", [0, 1])
def test_large_outputs_are_exact(dtype, offset_elements):
    # Outputs of 8 MB and more take the non-temporal store path (a view one
    # element in is unaligned and falls back to ordinary stores); forward,
    # backward and the in-place op must give the same exact result.
    p, seed, offset = 0.2, 7, 3
    numel = (9 << 20) // torch.finfo(dtype).bits * 8 + 13
    base = torch.randn(numel + offset_elements).to(dtype)
    x = base[offset_elements:]
    keep = reference_keep(numel, p, seed, offset)
    out, mask = ops.dropout(x, p, seed_offset(seed, offset), True)
    assert torch.equal(out, scaled(x, keep, p))
    grad = ops.dropout_apply_mask(x, mask, p)
    assert torch.equal(grad, scaled(x, keep, p))
    in_place = base.clone()[offset_elements:]
    ops.dropout_(in_place, p, seed_offset(seed, offset))
    assert torch.equal(in_place, scaled(x, keep, p))


def rounded_bits(values, dtype):
    """float32 values rounded to bfloat16/float16 as c10's conversions do, as int16 bits:
    to nearest even; NaN as 0x7FC0 (bfloat16) or sign | 0x7E00 (float16)."""
    bits = values.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if dtype == torch.bfloat16:
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nan_bits = torch.full_like(rounded, 0x7FC0)
    else:
        as_half = values.nan_to_num(0.0).to(torch.float16)
        rounded = as_half.view(torch.int16).to(torch.int64) & 0xFFFF
        nan_bits = ((bits >> 16) & 0x8000) | 0x7E00
    out = torch.where(values.isnan(), nan_bits, rounded)
    return (out - ((out >> 15) << 16)).to(torch.int16)  # as signed 16-bit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_special_values_are_exact_bits(dtype):
    # NaN of either sign and with payloads, infinities, signed zeros,
    # subnormals and the largest finite values, in every lane of the vector
    # loops and in their scalar tails: the output bits are those of c10's
    # rounding of the float32 product.
    info = torch.finfo(dtype)
    specials = torch.tensor(
        [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
         info.tiny / 4, -info.tiny / 4, info.max, -info.max, 1.0, -3.5, info.eps],
        dtype=torch.float32,
    )
    # NaNs with a payload, which a plain hardware conversion would carry over.
    payload_nans = torch.tensor([0x7FA0, -0x0060] if dtype == torch.bfloat16 else [0x7D00, -0x0300],
                                dtype=torch.int16).view(dtype)
    # 533 elements: whole vectors and a tail
    values = torch.cat([specials.to(dtype), payload_nans]).repeat(41)[: 16 * 33 + 5]
    p, seed, offset = 0.5, 11, 2
    out, mask = ops.dropout(values, p, seed_offset(seed, offset), True)
    keep = reference_keep(values.numel(), p, seed, offset)
    products = values.float() * keep.float() * torch.tensor(1.0 / (1.0 - p))
    expected = rounded_bits(products, dtype)
    assert torch.equal(out.view(torch.int16), expected)
    assert torch.equal(ops.dropout_apply_mask(values, mask, p).view(torch.int16), expected)


@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_functional_backward_uses_the_forward_mask(mask_mode):
    x = layout_input((8, 16, 10, 10), "channels_last", torch.float32).requires_grad_()
    out = FF.dropout(x, 0.4, training=True, mask_mode=mask_mode)
    keep = out != 0
    grad_out = torch.randn_like(out).contiguous()
    out.backward(grad_out)
    assert torch.equal(out, scaled(x.detach(), keep, 0.4))
    assert torch.equal(x.grad, scaled(grad_out, keep, 0.4))


@pytest.mark.parametrize("save_mask", [True, False])
def test_gradcheck(save_mask):
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda t: ops.dropout(t, 0.4, seed_offset(), save_mask)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# ---- PyTorch semantics -----------------------------------------------------------


def test_eval_p0_and_empty_return_the_input_as_torch():
    x = torch.randn(4, 5)
    assert FF.dropout(x, 0.5, training=False) is x
    assert FF.dropout(x, 0.0, training=True) is x
    empty = torch.empty(0, 3)
    assert FF.dropout(empty, 0.5) is empty
    assert F.dropout(x, 0.5, training=False) is x  # the behaviour mirrored


@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_p1_gives_zeros_and_zero_gradient_as_torch(mask_mode):
    x = torch.randn(5, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = FF.dropout(x, 1.0, mask_mode=mask_mode)
    out_ref = F.dropout(x_ref, 1.0)
    assert torch.equal(out, out_ref) and not out.any()
    out.sum().backward()
    out_ref.sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and not x.grad.any()


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_bad_probability_raises_torch_error(p):
    with pytest.raises(ValueError) as torch_error:
        F.dropout(torch.ones(3), p)
    with pytest.raises(ValueError) as ours:
        FF.dropout(torch.ones(3), p)
    assert str(ours.value) == str(torch_error.value)
    with pytest.raises(ValueError) as ours_module:
        fused_bn.Dropout(p)
    with pytest.raises(ValueError) as torch_module:
        nn.Dropout(p)
    assert str(ours_module.value) == str(torch_module.value)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ops.dropout(torch.ones(3), p, seed_offset(), True)


def test_bad_arguments_raise_clear_errors():
    x = torch.ones(10)
    with pytest.raises(ValueError, match="mask_mode"):
        FF.dropout(x, 0.5, mask_mode="bytes")
    with pytest.raises(ValueError, match="mask_mode"):
        fused_bn.Dropout(0.5, mask_mode="bytes")
    with pytest.raises(RuntimeError, match="seed_offset"):
        ops.dropout(x, 0.5, torch.tensor([1, 2, 3]), True)
    with pytest.raises(RuntimeError, match="seed_offset"):
        ops.dropout(x, 0.5, torch.tensor([1.0, 2.0]), True)
    with pytest.raises(RuntimeError, match="floating point"):
        ops.dropout(torch.ones(10, dtype=torch.int64), 0.5, seed_offset(), True)
    with pytest.raises(RuntimeError, match="mask of 2 bytes"):
        ops.dropout_apply_mask(x, torch.zeros(3, dtype=torch.uint8), 0.5)
    with pytest.raises(RuntimeError, match="counter"):
        ops.philox4x32(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


def test_manual_seed_reproduces_and_consecutive_calls_differ():
    x = torch.randn(64, 1024)
    torch.manual_seed(0)
    first, second = FF.dropout(x, 0.5), FF.dropout(x, 0.5)
    torch.manual_seed(0)
    assert torch.equal(FF.dropout(x, 0.5), first)
    assert torch.equal(FF.dropout(x, 0.5), second)
    assert not torch.equal(first, second)
    torch.manual_seed(1)
    assert not torch.equal(FF.dropout(x, 0.5), first)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_module_is_a_drop_in_for_nn_dropout(dtype, layout):
    module = fused_bn.Dropout(0.25)
    assert isinstance(module, nn.Dropout)
    assert "p=0.25" in repr(module) and "mask_mode=" in repr(module)
    x = layout_input((2, 8, 6, 5), layout, dtype)
    out = module(x)
    assert out.shape == x.shape and out.dtype == dtype
    keep = out != 0
    assert torch.equal(out, scaled(x, keep, 0.25))
    module.eval()
    assert module(x) is x


# ---- in place ----------------------------------------------------------------------


def test_inplace_on_a_leaf_requiring_grad_raises_as_torch():
    with pytest.raises(RuntimeError) as torch_error:
        nn.Dropout(0.5, inplace=True)(torch.ones(4, requires_grad=True))
    leaf = torch.ones(4, requires_grad=True)
    with pytest.raises(RuntimeError) as ours:
        fused_bn.Dropout(0.5, inplace=True)(leaf)
    assert str(ours.value) == str(torch_error.value)
    assert torch.equal(leaf, torch.ones(4))


@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_inplace_under_autograd_behaves_as_torch(mask_mode):
    x = torch.randn(6, 40, requires_grad=True)
    hidden = x * 2
    version = hidden._version
    out = fused_bn.Dropout(0.5, inplace=True, mask_mode=mask_mode)(hidden)
    assert out is hidden and hidden._version > version
    keep = out != 0
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.equal(x.grad, scaled(grad_out, keep, 0.5) * 2)
    # A tensor saved by an earlier op and then modified in place is caught at backward.
    y = torch.randn(5, requires_grad=True)
    activated = y.sigmoid()  # saves its output
    fused_bn.Dropout(0.5, inplace=True)(activated)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        activated.sum().backward()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inplace_without_grad_equals_out_of_place(layout):
    x = layout_input((4, 8, 6, 7), layout, torch.float32)
    torch.manual_seed(3)
    expected = FF.dropout(x, 0.3)
    target = x.clone() if layout != "strided" else layout_input((4, 8, 6, 7), layout, torch.float32)
    torch.manual_seed(3)
    result = FF.dropout(target, 0.3, inplace=True)
    assert result is target
    assert torch.equal(target, expected)


# ---- opcheck, compile, memory ---------------------------------------------------


OPCHECK_INPUTS = [
    ((6, 4, 5, 5), "contiguous", torch.float32),
    ((6, 4, 5, 5), "channels_last", torch.float32),
    ((3, 4, 7), "strided", torch.float64),
    ((12, 5), "contiguous", torch.bfloat16),
    ((0, 3), "contiguous", torch.float16),
    ((8, 16, 16, 16), "channels_last", torch.float32),  # 128 KiB: placed outputs
]


@pytest.mark.parametrize("shape,layout,dtype", OPCHECK_INPUTS)
def test_opcheck(shape, layout, dtype):
    x = layout_input(shape, layout, dtype)
    x_grad = x.detach().clone().requires_grad_(dtype != torch.float16)
    for save_mask in (True, False):
        torch.library.opcheck(ops.dropout.default, (x_grad, 0.3, seed_offset(), save_mask))
    _, mask = ops.dropout(x, 0.3, seed_offset(), True)
    torch.library.opcheck(ops.dropout_apply_mask.default, (x_grad, mask, 0.3))
    torch.library.opcheck(ops.dropout_.default, (x.clone(), 0.3, seed_offset()))
    counter = torch.tensor([c for c, _, _ in PHILOX_KNOWN_ANSWERS], dtype=torch.int64)
    torch.library.opcheck(ops.philox4x32.default, (counter, torch.tensor([5, 6])))


@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_torch_compile_fullgraph(mask_mode):
    def step(x, inplace):
        hidden = x * 3.0
        return FF.dropout(hidden, 0.4, training=True, inplace=inplace, mask_mode=mask_mode)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for inplace in (False, True):
        x = torch.randn(4, 8, 10, requires_grad=True)
        torch.manual_seed(5)
        out = compiled(x, inplace)
        torch.manual_seed(5)
        assert torch.equal(compiled(x.detach(), inplace), out.detach())  # reproducible
        keep = out != 0
        assert 0.4 < keep.float().mean() < 0.8
        assert torch.equal(out, scaled(x.detach() * 3.0, keep, 0.4))
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        assert torch.equal(x.grad, scaled(grad_out, keep, 0.4) * 3.0)


def saved_bytes(mask_mode, x):
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FF.dropout(x, 0.5, mask_mode=mask_mode)
    return sum(saved)


def test_bytes_saved_for_backward():
    x = torch.randn(32, 16, 28, 29, requires_grad=True)  # numel not a multiple of 8... times 8
    assert saved_bytes("bits", x) <= x.numel() // 8 + 8
    assert saved_bytes("recompute", x) <= 16


# ---- CUDA ---------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 13, 4096 + 5, 1_000_003])
def test_cuda_and_cpu_masks_are_bit_identical(dtype, numel):
    x = torch.randn(numel, dtype=torch.float64).to(dtype)
    cpu_out, cpu_mask = ops.dropout(x, 0.37, seed_offset(), True)
    cuda_out, cuda_mask = ops.dropout(x.cuda(), 0.37, seed_offset().cuda(), True)
    assert torch.equal(cuda_mask.cpu(), cpu_mask)
    assert torch.equal(cuda_out.cpu(), cpu_out)
    grad = torch.randn(numel, dtype=torch.float64).to(dtype)
    assert torch.equal(
        ops.dropout_apply_mask(grad.cuda(), cuda_mask, 0.37).cpu(),
        ops.dropout_apply_mask(grad, cpu_mask, 0.37),
    )


@needs_cuda
@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_cuda_functional_backward_and_reproducibility(mask_mode):
    x = torch.randn(16, 32, 9, 9, device="cuda").to(memory_format=torch.channels_last)
    x.requires_grad_()
    torch.manual_seed(0)
    out = FF.dropout(x, 0.3, mask_mode=mask_mode)
    torch.manual_seed(0)
    assert torch.equal(FF.dropout(x.detach(), 0.3, mask_mode=mask_mode), out.detach())
    keep = out != 0
    grad_out = torch.randn_like(out).contiguous()
    out.backward(grad_out)
    assert torch.equal(x.grad, scaled(grad_out, keep, 0.3))


@needs_cuda
def test_cuda_graph_replays_draw_new_masks():
    x = torch.ones(1 << 16, device="cuda")
    static_out = torch.empty_like(x)
    FF.dropout(x, 0.5)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out.copy_(FF.dropout(x, 0.5))
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append(static_out.clone())
    assert not torch.equal(replays[0], replays[1])
    for out in replays:
        assert abs((out != 0).float().mean().item() - 0.5) < 0.02
