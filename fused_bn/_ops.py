"""Loads the native extension and registers, for each fused_bn operator, its
fake (meta) kernel for torch.compile/torch.export. The autograd formulas are
C++ (csrc/batch_norm_autograd.cpp, csrc/dropout_autograd.cpp).

The operator schemas live in csrc/ops.cpp; the kernels in csrc/cpu and csrc/cuda.
"""

import torch

from . import _C  # noqa: F401  (importing registers torch.ops.fused_bn.*)

ops = torch.ops.fused_bn

def build_info():
    """How the extension was built: version, torch version, CUDA compiled or not, CUDA archs,
    the CPU instruction sets compiled (``cpu_capabilities``) and the one in use (``cpu_capability``,
    forced with the environment variable FUSED_BN_CPU_CAPABILITY=default|avx2|avx512)."""
    return _C.build_info()


def accumulate_dtype(dtype):
    """Dtype of per-channel statistics: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_memory_format(input):
    """Mirror of output_memory_format() in csrc/batch_norm_common.cpp."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _like_input(input):
    return torch.empty(
        input.shape,
        dtype=input.dtype,
        device=input.device,
        memory_format=output_memory_format(input),
    )


def _channel_stat(input):
    return input.new_empty((input.shape[1],), dtype=accumulate_dtype(input.dtype))


# ---- fake kernels -----------------------------------------------------------


def _check_same_device(input, *tensors):
    # The fake kernels also serve meta tensors, for which PyTorch's own check says this.
    for t in tensors:
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"Tensor on device {t.device} is not on the expected device {input.device}!"
            )


def _empty_batch_output(input, weight, bias):
    """As BatchNormOps::empty_batch: input.clone() * weight[0] + bias[0], as PyTorch."""
    dtype = input.dtype
    for param in (weight, bias):
        if param is not None and param.numel() > 0:
            dtype = torch.result_type(input.new_empty((0,), dtype=dtype), param.reshape(-1)[0])
    return torch.empty_like(input, dtype=dtype)


@torch.library.register_fake("fused_bn::batch_norm_act")
def _(
    input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
    activation="identity", activation_params=(), residual=None,
):
    _check_same_device(input, weight, bias, running_mean, running_var, residual)
    if input.numel() == 0:
        return _empty_batch_output(input, weight, bias), _channel_stat(input), _channel_stat(input)
    return _like_input(input), _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fused_bn::batch_norm_act_backward")
def _(
    grad_output, input, weight, bias, mean, invstd, training, activation="identity",
    activation_params=(), residual=None, output_mask=(True, True, True, True),
):
    def param_grad(param):
        stat = _channel_stat(input)
        return stat if param is None else stat.to(param.dtype).reshape(param.shape)

    def wanted(needed, make, like):
        return make() if needed else like.new_empty((0,))

    grad_input_mask, weight_mask, bias_mask, residual_mask = output_mask
    return (
        wanted(grad_input_mask, lambda: _like_input(input), input),
        wanted(weight_mask, lambda: param_grad(weight), mean),
        wanted(bias_mask, lambda: param_grad(bias), mean),
        wanted(residual_mask and residual is not None, lambda: _like_input(input), input),
    )


@torch.library.register_fake("fused_bn::batch_norm_stats")
def _(input):
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fused_bn::batch_norm_act_elemt")
def _(input, weight, bias, mean, invstd, activation="identity", activation_params=()):
    return _like_input(input)


@torch.library.register_fake("fused_bn::batch_norm_act_backward_reduce")
def _(grad_output, input, weight, bias, mean, invstd, activation="identity", activation_params=()):
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fused_bn::batch_norm_act_backward_elemt")
def _(
    grad_output, input, weight, bias, mean, invstd, mean_dy, mean_dy_xmu, activation="identity",
    activation_params=(),
):
    return _like_input(input)


# ---- Dropout ------------------------------------------------------------------
# The ops work on the input in its dense memory order and return
# empty_like(input) outputs (csrc/dropout_common.h).


def dropout_mask_bytes(numel):
    """Bytes of the 1-bit dropout mask of a tensor of `numel` elements."""
    return (numel + 7) // 8


@torch.library.register_fake("fused_bn::dropout")
def _(input, p, seed_offset, save_mask):
    mask_bytes = dropout_mask_bytes(input.numel()) if save_mask else 0
    return torch.empty_like(input), input.new_empty((mask_bytes,), dtype=torch.uint8)


@torch.library.register_fake("fused_bn::dropout_")
def _(self, p, seed_offset):
    return None


@torch.library.register_fake("fused_bn::dropout_apply_mask")
def _(input, mask, p):
    return torch.empty_like(input)


@torch.library.register_fake("fused_bn::philox4x32")
def _(counter, key):
    return torch.empty_like(counter, memory_format=torch.contiguous_format)
