"""Functional API, mirroring ``torch.nn.functional``.

``batch_norm(..., activation="relu")`` equals ``F.relu(F.batch_norm(...))``,
and with ``residual=r`` equals ``F.relu(F.batch_norm(...) + r)``, but runs as
one fused kernel per pass and keeps only the input (and residual) and O(C)
statistics for backward.
"""

import math

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from . import memory
from ._ops import _C, build_info, ops
from .activations import Activation, activation_of

__all__ = ["batch_norm", "batch_norm_relu", "dropout"]

# The CUDA kernels of the activations other than identity and ReLU, and of the
# residual add, have not run on a GPU yet: without FUSED_BN_CUDA_KERNELS=next
# such calls on CUDA compute with PyTorch's own ops (_composite_batch_norm).
CUDA_KERNELS = build_info()["cuda_kernels"]
_CUDA_VERIFIED_ACTIVATIONS = ("identity", "relu")
_IDENTITY = Activation()


def _has_tangent(tensors):
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# Bound once: _route runs on every call, and each attribute lookup is host time.
_functorch_stack_top = torch._C._functorch.peek_interpreter_stack
_has_torch_function = torch._C._has_torch_function


def _under_transform(tensors):
    """Whether torch.func transforms (grad, vjp, jvp, vmap, ...) are active or a tensor
    carries a forward-mode tangent: the fused op's autograd (C++) supports neither."""
    if torch.compiler.is_compiling():
        return False
    return _transform_active(tensors)


def _transform_active(tensors):
    # Outside forward_ad.dual_level() there are no tangents.
    return _functorch_stack_top() is not None or (
        forward_ad._current_level >= 0 and _has_tangent(tensors)
    )


# How a call runs (_route).
_COMPOSITE = "composite"  # PyTorch's own ops (_composite_batch_norm)
_OP = "op"  # torch.ops.fused_bn: what torch.compile traces, and tensor subclasses and modes see
_DIRECT = "direct"  # the same op through fused_bn._C, without torch.ops' argument parsing

def _direct_call_allowed(tensors):
    """Whether the op may skip torch.ops: a torch function mode or a tensor subclass that
    overrides __torch_function__ sees torch.ops calls only. (torch's own check: exact
    tensors and Parameters do not; dispatch modes and subclasses, such as fake tensors,
    see the direct call as well.)"""
    return not _has_torch_function(tensors)


def _cuda_kernels_unverified(input, activation, residual):
    """Whether this call would run CUDA kernels not yet verified on a GPU (CUDA_KERNELS)."""
    return input.is_cuda and CUDA_KERNELS != "next" and (
        residual is not None or activation.name not in _CUDA_VERIFIED_ACTIVATIONS
    )


def _route(input, activation, residual, tensors):
    """Composite for unverified CUDA kernels and under transforms (_under_transform);
    torch.ops under torch.compile, torch function modes and tensor subclasses; else the
    direct call."""
    if input.is_cuda and _cuda_kernels_unverified(input, activation, residual):
        return _COMPOSITE
    if torch.compiler.is_compiling():
        return _OP
    if _transform_active(tensors):
        return _COMPOSITE
    return _DIRECT if _direct_call_allowed(tensors) else _OP


def _composite_batch_norm(
    input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual,
    num_batches_tracked,
):
    """The same computation in torch's own ops, which every transform knows."""
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
    if residual is not None:
        output = output + residual
    return activation.function(output)


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    activation=_IDENTITY,
    residual=None,
    num_batches_tracked=None,
):
    """The fused op for an already resolved ``activation`` (an Activation); the op checks
    everything else, and updates the running statistics in training."""
    tensors = (input, weight, bias, residual, running_mean, running_var, num_batches_tracked)
    route = _route(input, activation, residual, tensors)
    if route == _COMPOSITE:
        return _composite_batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
            residual, num_batches_tracked,
        )
    # torch.ops: the overload itself (.default), as the packet costs more host time.
    call = _C.batch_norm_act if route == _DIRECT else ops.batch_norm_act.default
    output, mean, invstd = call(
        input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum,
        eps, activation.name, activation.params, residual,
    )
    # Under memory.recompute(), later layers that save this output get a recipe instead.
    if memory.sessions_open and residual is None and route == _DIRECT:
        memory.register(output, input, weight, bias, mean, invstd, activation)
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
    *,
    residual=None,
    **activation_params,
):
    """``torch.nn.functional.batch_norm``, plus ``residual``, then ``activation``.

    In training, normalizes with the batch statistics and, when ``running_mean`` and
    ``running_var`` are given, updates them in place with ``momentum`` (the unbiased
    batch variance, as PyTorch). Otherwise normalizes with the running statistics.
    ``residual`` (the input's shape and dtype) is added before the activation.
    ``activation`` is a name (``"identity"``, ``"relu"``, ``"relu6"``, ``"hardtanh"``,
    ``"leaky_relu"``, ``"silu"``, ``"hardswish"``, ``"elu"``) with its module's
    parameters as keywords (``negative_slope=0.2``), an ``Activation``, or a PyTorch
    activation module (``nn.LeakyReLU(0.2)``).
    Accepts (N, C), (N, C, L) and (N, C, *spatial) inputs in float64, float32, float16
    and bfloat16 (float32 statistics for the last two), contiguous or channels_last.
    """
    if momentum is None:
        raise ValueError("momentum=None (cumulative average) needs a module's num_batches_tracked")
    return _batch_norm(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        activation_of(activation, **activation_params), residual,
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


# The names PyTorch's messages give the dtypes dropout rejects.
_DTYPE_NAMES = {
    torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.bool: "Bool", torch.uint8: "Byte",
    torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
}


def _check_dropout_dtype(input):
    # The errors torch.nn.functional.dropout raises in training for these dtypes.
    if input.is_floating_point():
        return
    name = _DTYPE_NAMES.get(input.dtype, str(input.dtype))
    if input.is_complex():
        raise NotImplementedError(
            f'"bernoulli_scalar_{input.device.type}_" not implemented for \'{name}\''
        )
    raise RuntimeError(f"result type Float can't be cast to the desired output type {name}")


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
    if p != p:  # NaN passes the comparisons above; torch's op then raises this (in C++)
        nan = "-nan" if math.copysign(1.0, p) < 0 else "nan"
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {nan}")
    if mask_mode not in DROPOUT_MASK_MODES:
        raise ValueError(f"mask_mode must be one of {DROPOUT_MASK_MODES}, got {mask_mode!r}")
    if not training:
        return input  # as torch: the input itself
    _check_dropout_dtype(input)
    if p == 0.0 or input.numel() == 0:
        return input
    save_mask = mask_mode == "bits"
    if inplace and not (torch.is_grad_enabled() and input.requires_grad):
        ops.dropout_.default(input, p, _dropout_seed_offset(input.device))
        return input
    if not inplace and not torch.compiler.is_compiling() and _direct_call_allowed((input,)):
        return _C.dropout_output(input, p, save_mask)
    output, _mask = ops.dropout.default(input, p, _dropout_seed_offset(input.device), save_mask)
    if inplace:
        # Writing the result into the input records the mutation with autograd
        # (version counter, leaf check, rebased history) as nn.Dropout(inplace=True).
        return input.copy_(output)
    return output
