"""Drop-in BatchNorm modules.

``BatchNormXd`` replaces ``nn.BatchNormXd``; ``BatchNormReLUXd`` replaces
``nn.Sequential(nn.BatchNormXd, nn.ReLU())``. They subclass
``torch.nn.modules.batchnorm._BatchNorm``, so constructor arguments,
parameters, buffers, ``state_dict`` keys, ``reset_parameters`` and ``.to()``
are PyTorch's own.
"""

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _batch_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
]


class _BatchNormAct(_BatchNorm):
    """_BatchNorm whose forward runs the fused op, followed by ``activation``."""

    activation = "identity"

    def forward(self, input):
        self._check_input_dim(input)
        # Same decisions as torch's _BatchNorm.forward; the difference is that
        # num_batches_tracked and the running statistics are only written once
        # the forward op has succeeded, so a call that raises changes nothing.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats
        use_buffers = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            self.momentum,
            self.eps,
            self.activation,
            num_batches_tracked=self.num_batches_tracked if track else None,
        )

    def extra_repr(self):
        return super().extra_repr() + (
            f", activation={self.activation}" if self.activation != "identity" else ""
        )


class BatchNorm1d(_BatchNormAct):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on (N, C) or (N, C, L) input."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchNorm2d(_BatchNormAct):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on (N, C, H, W) input."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchNorm3d(_BatchNormAct):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on (N, C, D, H, W) input."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim


class BatchNormReLU1d(BatchNorm1d):
    """``nn.Sequential(nn.BatchNorm1d(...), nn.ReLU())`` as one fused module."""

    activation = "relu"


class BatchNormReLU2d(BatchNorm2d):
    """``nn.Sequential(nn.BatchNorm2d(...), nn.ReLU())`` as one fused module."""

    activation = "relu"


class BatchNormReLU3d(BatchNorm3d):
    """``nn.Sequential(nn.BatchNorm3d(...), nn.ReLU())`` as one fused module."""

    activation = "relu"
