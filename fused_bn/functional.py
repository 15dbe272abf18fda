"""Functional API, mirroring ``torch.nn.functional``.

``batch_norm(..., activation="relu")`` equals ``F.relu(F.batch_norm(...))``
but runs as one fused kernel per pass and keeps only the input and O(C)
statistics for backward.
"""

import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from ._ops import ACTIVATIONS, ops

__all__ = ["batch_norm", "batch_norm_relu", "dropout"]


def _verify_batch_size(size):
    # torch.nn.functional's check and message.
    values_per_channel = size[0] * math.prod(size[2:])
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _check_devices(input, *per_channel):
    # The kernels check this too; checking here also covers meta/fake tensors.
    for t in per_channel:
        if t is not None and t.device != input.device:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} and {t.device}!"
            )


def _under_transform(*tensors):
    """Whether torch.func transforms (grad, vjp, jvp, vmap, ...) are active or a tensor carries
    a forward-mode tangent: the fused op's autograd (C++) supports neither."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if forward_ad._current_level < 0:  # outside forward_ad.dual_level(): no tangents
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _composite_batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
    num_batches_tracked,
):
    """The same computation in torch's own ops, which every transform knows: used under
    torch.func transforms and forward-mode AD."""
    tracked = training and num_batches_tracked is not None
    if tracked:
        # First, as torch's _BatchNorm: torch.func refuses this update of a
        # captured buffer, with its own error, before anything has changed.
        num_batches_tracked.add_(1)
    if momentum is not None:
        factor = momentum
    else:  # cumulative average, as torch's _BatchNorm
        factor = 1.0 / float(num_batches_tracked) if tracked else 0.0
    try:
        output = F.batch_norm(input, running_mean, running_var, weight, bias, training, factor, eps)
    except Exception:
        if tracked:
            num_batches_tracked.sub_(1)  # a call that raises changes nothing
        raise
    return F.relu(output) if activation == "relu" else output


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    activation,
    num_batches_tracked=None,
):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_devices(input, weight, bias, running_mean, running_var)
    if training:
        _verify_batch_size(input.size())
    elif running_mean is None or running_var is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if _under_transform(input, weight, bias):
        return _composite_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
            num_batches_tracked,
        )
    # The functional op raises on bad input before anything is written; the
    # running statistics are updated only after it has succeeded.
    # The overloads themselves (.default): each call through the packet costs more host time.
    output, mean, invstd = ops.batch_norm_act.default(
        input, weight, bias, running_mean, running_var, training, eps, activation
    )
    if training and running_mean is not None and running_var is not None:
        count = input.numel() // input.size(1) if input.size(1) else 0
        ops.update_running_stats_.default(
            running_mean, running_var, num_batches_tracked, mean, invstd, momentum, eps, count
        )
    return output


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    activation="identity",
):
    """``torch.nn.functional.batch_norm`` followed by ``activation`` ("identity" or "relu").

    In training, normalizes with the batch statistics and, when ``running_mean`` and
    ``running_var`` are given, updates them in place with ``momentum`` (the unbiased
    batch variance, as PyTorch). Otherwise normalizes with the running statistics.
    Accepts (N, C), (N, C, L) and (N, C, *spatial) inputs in float64, float32, float16
    and bfloat16 (float32 statistics for the last two), contiguous or channels_last.
    """
    if momentum is None:
        raise ValueError("momentum=None (cumulative average) needs a module's num_batches_tracked")
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation
    )


def batch_norm_relu(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """``relu(batch_norm(...))`` as one fused op; see :func:`batch_norm`."""
    return batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps, activation="relu"
    )


# ---- Dropout ------------------------------------------------------------------

DROPOUT_MASK_MODES = ("bits", "recompute")
# "bits" saves numel/8 bytes and its backward is one streaming pass; "recompute"
# saves 16 bytes but its backward runs the Philox rounds again (see README).
DEFAULT_DROPOUT_MASK_MODE = "bits"


def _dropout_seed_offset(device):
    """[seed, offset] for one dropout call, drawn from the default generator of
    `device`, so that torch.manual_seed reproduces runs and consecutive calls
    differ. On CUDA this is a device tensor made by torch's own Philox-based
    randint, which is safe under CUDA-graph capture (each replay draws anew);
    the dropout kernel reads it through a pointer."""
    return torch.randint(1 << 62, (2,), dtype=torch.int64, device=device)


def dropout(input, p=0.5, training=True, inplace=False, mask_mode=DEFAULT_DROPOUT_MASK_MODE):
    """``torch.nn.functional.dropout`` that keeps at most 1 bit per element for backward.

    Elements are zeroed with probability ``p`` and the others scaled by ``1 / (1 - p)``;
    the mask of a call depends only on its (seed, offset) and the element's index, so
    it is the same on CPU and CUDA. ``mask_mode`` picks what backward keeps: ``"bits"``
    (the mask, numel/8 bytes) or ``"recompute"`` (seed and offset only; backward
    regenerates the mask).
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if mask_mode not in DROPOUT_MASK_MODES:
        raise ValueError(f"mask_mode must be one of {DROPOUT_MASK_MODES}, got {mask_mode!r}")
    if not training or p == 0.0 or input.numel() == 0:
        return input  # as torch: the input itself
    seed_offset = _dropout_seed_offset(input.device)
    if inplace and not (torch.is_grad_enabled() and input.requires_grad):
        ops.dropout_(input, p, seed_offset)
        return input
    output, _mask = ops.dropout(input, p, seed_offset, mask_mode == "bits")
    if inplace:
        # Writing the result into the input records the mutation with autograd
        # (version counter, leaf check, rebased history) as nn.Dropout(inplace=True).
        return input.copy_(output)
    return output
