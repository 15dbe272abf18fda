"""Modules in torch's own ops only, for what has no exact PyTorch counterpart.

:func:`fused_bn.revert_model` turns a fused module into ``nn.BatchNormXd`` (and gives its
activation back to the PyTorch module or forward it was taken from) wherever it can. A
hand-built fused module with an activation, or one called with a residual, has no such
counterpart that keeps the ``state_dict`` keys (``nn.Sequential(bn, act)`` would rename
``weight`` to ``0.weight``); it becomes a :class:`BatchNormAct`.

These modules are deliberately not ``_BatchNorm`` subclasses: torch's tools that take any
``_BatchNorm`` for a plain BatchNorm (``nn.SyncBatchNorm.convert_sync_batchnorm``) would drop
the activation. They script (``torch.jit.script``), trace (``torch.fx``, ``torch.jit.trace``)
and export (``torch.export``, ONNX) as any PyTorch module.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .deploy import GuardedEps

__all__ = ["BatchNormAct", "ResidualAct"]


class BatchNormAct(_NormBase):
    """``act(batch_norm(input) [+ residual])`` with ``F.batch_norm`` and the activation module
    ``act``: ``nn.BatchNormXd``'s arguments, parameters, buffers, ``state_dict`` keys and
    train/eval behavior, on (N, C, *) input. ``act`` is a child without state (``nn.ReLU()``,
    ``nn.SiLU()``, ``nn.Identity()``, ...), so it adds no ``state_dict`` key."""

    # torch.nn.utils.fusion must not drop the activation (deploy.py).
    eps = GuardedEps(lambda m: type(m.act) is not nn.Identity and type(m.act).__name__)

    def __init__(
        self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
        device=None, dtype=None, *, act=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.act = nn.Identity() if act is None else act

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        # The decisions of torch's _BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_buffers = not self.training or self.track_running_stats
        output = F.batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            self.training or (self.running_mean is None and self.running_var is None),
            factor,
            self.eps,
        )
        if residual is not None:
            output = output + residual
        return self.act(output)


class ResidualAct(nn.Module):
    """``act(input + residual)``: what :func:`fused_bn.fold_batch_norm` leaves of a fused
    module called with a residual once its BatchNorm is folded into the preceding layer."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if residual is not None:
            input = input + residual
        return self.act(input)
