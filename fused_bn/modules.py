"""Drop-in BatchNorm modules, with a fused activation and residual add.

``BatchNormXd`` replaces ``nn.BatchNormXd``; ``BatchNormReLUXd`` replaces
``nn.Sequential(nn.BatchNormXd, nn.ReLU())``; ``BatchNormActXd(..., activation=)``
any BatchNorm followed by a supported activation (see fused_bn.activations).
Every one takes an optional residual: ``module(x, residual)`` computes
``act(bn(x) + residual)``, the tail of a ResNet block, in one pass.

They subclass ``torch.nn.modules.batchnorm._BatchNorm``, so constructor
arguments, parameters, buffers, ``state_dict`` keys, ``reset_parameters`` and
``.to()`` are PyTorch's own.
"""

from typing import Optional

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import deploy
from .activations import activation_of
from .functional import _batch_norm, _composite_batch_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
]


class _BatchNormAct(_BatchNorm):
    """_BatchNorm whose forward runs the fused op: ``activation(bn(input) [+ residual])``.

    ``activation``: a name (``"relu"``, ``"relu6"``, ``"hardtanh"``, ``"leaky_relu"``,
    ``"silu"``, ``"hardswish"``, ``"elu"``, ``"identity"``) with its module's parameters as
    keywords (``negative_slope=0.2``), an ``Activation``, or a PyTorch activation module
    instance (``nn.LeakyReLU(0.2)``); ``default_activation`` when not given.
    """

    default_activation = "relu"
    # Deployment tools: see fused_bn/deploy.py.
    eps = deploy.GuardedEps(lambda m: m.activation.name != "identity" and m.activation)
    __prepare_scriptable__ = deploy.refuse_scripting

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        device=None,
        dtype=None,
        *,
        bias=True,
        activation=None,
        **activation_params,
    ):
        # `bias` is passed on only when False, so that torch releases without
        # the argument accept the default.
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            **({} if bias else {"bias": False}),
        )
        self.activation = activation_of(
            self.default_activation if activation is None else activation, **activation_params
        )

    def forward(self, input, residual=None):
        if isinstance(input, fx.Proxy):
            return deploy.fx_leaf_call(self, input, residual)
        self._check_input_dim(input)
        # Same decisions as torch's _BatchNorm.forward; the fused op updates
        # num_batches_tracked and the running statistics itself, once every
        # argument has been checked, so a call that raises changes nothing.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = self.training and self.track_running_stats
        use_buffers = not self.training or self.track_running_stats
        # Exported programs get torch's own ops (fused_bn/deploy.py).
        exported = not self.training and deploy.exporting()
        return (_composite_batch_norm if exported else _batch_norm)(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            self.momentum,
            self.__dict__["eps"],  # the value itself, without GuardedEps's check of the caller
            self.activation,
            residual,
            self.num_batches_tracked if track else None,
        )

    def extra_repr(self):
        if self.activation.name == "identity":
            return super().extra_repr()
        return super().extra_repr() + f", activation={self.activation}"


class BatchNormAct1d(_BatchNormAct):
    """``nn.BatchNorm1d`` followed by ``activation`` (default ReLU), fused; (N, C) or
    (N, C, L) input."""

    _check_input_dim = nn.BatchNorm1d._check_input_dim


class BatchNormAct2d(_BatchNormAct):
    """``nn.BatchNorm2d`` followed by ``activation`` (default ReLU), fused; (N, C, H, W) input."""

    _check_input_dim = nn.BatchNorm2d._check_input_dim


class BatchNormAct3d(_BatchNormAct):
    """``nn.BatchNorm3d`` followed by ``activation`` (default ReLU), fused; (N, C, D, H, W)
    input."""

    _check_input_dim = nn.BatchNorm3d._check_input_dim


class _FixedActivation:
    """A fused module whose activation is its class's ``default_activation``, with the
    constructor of ``nn.BatchNormXd`` (no activation arguments)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )


class BatchNorm1d(_FixedActivation, BatchNormAct1d):
    """Drop-in for :class:`torch.nn.BatchNorm1d` on (N, C) or (N, C, L) input."""

    default_activation = "identity"


class BatchNorm2d(_FixedActivation, BatchNormAct2d):
    """Drop-in for :class:`torch.nn.BatchNorm2d` on (N, C, H, W) input."""

    default_activation = "identity"


class BatchNorm3d(_FixedActivation, BatchNormAct3d):
    """Drop-in for :class:`torch.nn.BatchNorm3d` on (N, C, D, H, W) input."""

    default_activation = "identity"


class BatchNormReLU1d(_FixedActivation, BatchNormAct1d):
    """``nn.Sequential(nn.BatchNorm1d(...), nn.ReLU())`` as one fused module."""


class BatchNormReLU2d(_FixedActivation, BatchNormAct2d):
    """``nn.Sequential(nn.BatchNorm2d(...), nn.ReLU())`` as one fused module."""


class BatchNormReLU3d(_FixedActivation, BatchNormAct3d):
    """``nn.Sequential(nn.BatchNorm3d(...), nn.ReLU())`` as one fused module."""
