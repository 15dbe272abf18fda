"""BatchNorm(+ReLU) with statistics synchronized over ``torch.distributed``.

``SyncBatchNorm`` replaces ``nn.SyncBatchNorm``; ``SyncBatchNormReLU`` replaces
``nn.Sequential(nn.SyncBatchNorm, nn.ReLU())``. Unlike ``nn.SyncBatchNorm`` they
run on CPU (gloo) as well as GPU (NCCL), and fuse the activation.

Per training step and layer, each rank exchanges O(C) numbers:
  * forward: one all-gather of a packed float64 buffer [count, mean(C), M2(C)],
    merged with Chan et al.'s parallel Welford formula, so ranks may hold
    different batch sizes, zero included;
  * backward: one all_reduce of the packed per-channel gradient sums
    [sum_dy(C), sum_dy_xmu(C)].
The weight/bias gradients stay local, as in ``nn.SyncBatchNorm``:
DistributedDataParallel averages them like every other parameter gradient.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import _C
from ._ops import accumulate_dtype, ops
from .functional import _cuda_kernels_unverified, _under_transform
from .modules import _BatchNormAct

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "communicated_bytes", "convert_sync_batchnorm"]


def _all_gather_flat(output, input, group):
    # all_gather_single is the newer name of all_gather_into_tensor; gloo and
    # NCCL both implement it, which keeps the forward at one collective.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


# Dtypes a synchronized step may take, by their code in the header.
_HEADER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HEADER_FIELDS = 3  # verdict, channels, dtype code


def communicated_bytes(num_features, world_size, dtype):
    """Sizes in bytes of the buffers one synchronized layer hands to the collectives
    in a training step, per rank: (the forward's two all-gather outputs, header and
    statistics, together; the backward's all_reduce)."""
    header = world_size * _HEADER_FIELDS * torch.int64.itemsize
    gathered = header + world_size * (1 + 2 * num_features) * torch.float64.itemsize
    reduced = 2 * num_features * accumulate_dtype(dtype).itemsize
    return gathered, reduced


def _agree_on_the_step(module, input, running_mean, running_var, group, world_size):
    """Checks the call on this rank, then exchanges a small header with every rank (this
    rank's verdict, channel count and dtype), so that a call that is wrong on any rank,
    or ranks that disagree, raise on every rank before any statistic is exchanged or
    written: all ranks commit a step or none does, and the collectives that follow
    agree on their sizes and dtypes."""
    error = None
    try:
        if _cuda_kernels_unverified(input, module.activation, None):
            raise NotImplementedError(
                f"{type(module).__name__}: activation {module.activation} on CUDA needs "
                "FUSED_BN_CUDA_KERNELS=next in a synchronized step (its kernels have not "
                "been verified on a GPU)"
            )
        _C.check_batch_norm_call(
            input, module.weight, module.bias, running_mean, running_var,
            module.num_batches_tracked if running_mean is not None else None, True,
            module.momentum, module.eps, module.activation.name, list(module.activation.params),
            local_values_per_channel=False,  # the global batch's count is checked later
        )
    except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
        error = e
    dtype_code = _HEADER_DTYPES.index(input.dtype) if input.dtype in _HEADER_DTYPES else -1
    header = torch.tensor([error is None, input.size(1), dtype_code], device=input.device)
    gathered = header.new_empty(world_size * header.numel())
    _all_gather_flat(gathered, header, group)
    ranks = gathered.view(world_size, -1).tolist()
    if error is not None:
        raise error
    failed = [rank for rank, (ok, _, _) in enumerate(ranks) if not ok]
    if failed:
        raise RuntimeError(
            f"{type(module).__name__}: the synchronized step raised on rank(s) {failed} (see "
            "the error there); no rank updated its statistics"
        )
    if len({(channels, dtype) for _, channels, dtype in ranks}) > 1:
        channels = [c for _, c, _ in ranks]
        dtypes = [str(_HEADER_DTYPES[d]) if d >= 0 else "other" for _, _, d in ranks]
        raise RuntimeError(
            f"{type(module).__name__}: the ranks of the process group disagree on the input: "
            f"channels {channels}, dtypes {dtypes} (by rank); no rank updated its statistics"
        )


def _gather_batch_stats(input, process_group, world_size):
    """Every rank's (count, mean, M2) per channel: a (world_size, 1 + 2C) float64 tensor.

    The count travels in the buffer because ranks may hold different batch
    sizes; float64 keeps it exact and the merge below precise for any dtype.
    """
    mean, m2 = ops.batch_norm_stats(input)
    count = input.numel() // input.size(1)
    local = torch.cat([mean.new_full((1,), count, dtype=torch.float64), mean.double(), m2.double()])
    gathered = local.new_empty(world_size * local.numel())
    _all_gather_flat(gathered, local, process_group)
    return gathered.view(world_size, -1)


def _merge_batch_stats(gathered, channels):
    """Chan et al.'s merge of per-rank (count, mean, M2): global (count, mean, biased var).

    Ranks without samples carry count = mean = M2 = 0 and drop out of every sum.
    """
    counts, means, m2s = gathered.split([1, channels, channels], dim=1)
    total = counts.sum()
    divisor = total.clamp_min(1)
    mean = (counts * means).sum(0) / divisor
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    # The one host synchronization: update_running_stats_ takes the count as an int.
    return int(total.item()), mean, m2 / divisor


class _SyncBatchNormActFunction(torch.autograd.Function):
    """Training-mode forward/backward of a synchronized BatchNorm + activation.

    Saves only the input and O(C) tensors for backward; the activation mask is
    recomputed from them.
    """

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        activation,
        process_group,
        world_size,
    ):
        gathered = _gather_batch_stats(input, process_group, world_size)
        count, mean64, var64 = _merge_batch_stats(gathered, input.size(1))
        if count == 1:  # every rank sees the same count, so all of them raise
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} on this rank and 1 value per channel over the process group"
            )
        invstd64 = (var64 + eps).rsqrt()
        mean = mean64.to(accumulate_dtype(input.dtype))
        invstd = invstd64.to(accumulate_dtype(input.dtype))
        # The output first: if it raises (bad weight/bias), nothing was written.
        output = ops.batch_norm_act_elemt(
            input, weight, bias, mean, invstd, activation.name, activation.params
        )
        if running_mean is not None and running_var is not None:
            ops.update_running_stats_(
                running_mean,
                running_var,
                num_batches_tracked,
                mean64,
                invstd64,
                momentum,
                eps,
                count,
            )
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.count = count
        ctx.activation = activation
        ctx.process_group = process_group
        return output

    @staticmethod
    @once_differentiable  # second derivatives: a clear error, not silently missing terms
    def backward(ctx, grad_output):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        activation = ctx.activation
        sum_dy, sum_dy_xmu = ops.batch_norm_act_backward_reduce(
            grad_output, input, weight, bias, mean, invstd, activation.name, activation.params
        )
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            global_sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(global_sums, group=ctx.process_group)
            mean_dy, mean_dy_xmu = (global_sums / max(ctx.count, 1)).chunk(2)
            grad_input = ops.batch_norm_act_backward_elemt(
                grad_output, input, weight, bias, mean, invstd, mean_dy, mean_dy_xmu,
                activation.name, activation.params,
            )
        # Local parameter gradients: DDP reduces them with the other parameters.
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(bias.dtype)
        return grad_input, grad_weight, grad_bias, *([None] * 8)


class SyncBatchNorm(_BatchNormAct):
    """Drop-in for :class:`torch.nn.SyncBatchNorm` on (N, C, *) input, CPU or GPU.
    ``convert_sync_batchnorm`` gives it the activation of the fused_bn layer it replaces
    (the ``activation`` attribute, as in :class:`fused_bn.BatchNormAct2d`).

    In training, normalizes with the statistics of the global batch: the
    concatenation of every rank's batch in ``process_group`` (default: the
    whole world). With no initialized process group, a group of one rank, or
    in eval mode, it runs the local fused op without communication.
    """

    default_activation = "identity"

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias=True,
    ):
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self.process_group = process_group

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def _sync_group(self):
        """The process group to combine statistics over, or None for the local op."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._sync_group()
        if group is None:
            return super().forward(input, residual)
        if residual is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: a synchronized training step takes no residual"
            )
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        if _under_transform((input, self.weight, self.bias, running_mean, running_var)):
            # Else the step would run (statistics updated) before autograd
            # found that the synchronized Function has no forward-mode formula.
            raise RuntimeError(
                f"{type(self).__name__}: a synchronized training step supports neither "
                "forward-mode AD nor torch.func transforms (nor does nn.SyncBatchNorm's); "
                "in eval mode, or without a process group of several ranks, both work"
            )
        world_size = dist.get_world_size(group)
        _agree_on_the_step(self, input, running_mean, running_var, group, world_size)
        return _SyncBatchNormActFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.num_batches_tracked if track else None,
            self.momentum,
            self.eps,
            self.activation,
            group,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every BatchNorm layer in ``module`` by its synchronized fused version.

        torch's ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` and fused_bn's
        ``BatchNormXd`` become :class:`SyncBatchNorm`; fused_bn's
        ``BatchNormReLUXd`` become :class:`SyncBatchNormReLU`. Parameters and
        buffers are carried over as the same tensors (so ``requires_grad``,
        optimizer state and sharing are kept), as is the train/eval mode.
        Returns ``module`` itself, or the new layer when ``module`` is a
        BatchNorm layer, like ``nn.SyncBatchNorm.convert_sync_batchnorm``.
        """
        converted = module
        if isinstance(module, _BatchNorm):
            converted = _synchronized_copy(module, process_group)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


class SyncBatchNormReLU(SyncBatchNorm):
    """``nn.Sequential(nn.SyncBatchNorm(...), nn.ReLU())`` as one fused module."""

    default_activation = "relu"


def _synchronized_copy(module, process_group):
    # fused_bn's layers keep their activation; torch's have none.
    activation = getattr(module, "activation", None)
    relu = activation is not None and activation.name == "relu"
    sync = (SyncBatchNormReLU if relu else SyncBatchNorm)(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
        bias=module.bias is not None or not module.affine,
    )
    if activation is not None:
        sync.activation = activation
    if module.affine:
        sync.weight = module.weight
        sync.bias = module.bias
    sync.running_mean = module.running_mean
    sync.running_var = module.running_var
    sync.num_batches_tracked = module.num_batches_tracked
    sync.training = module.training
    if hasattr(module, "qconfig"):
        sync.qconfig = module.qconfig
    return sync


convert_sync_batchnorm = SyncBatchNorm.convert_sync_batchnorm
