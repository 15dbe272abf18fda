"""fused_bn: fused BatchNorm(+activation, +residual add) and Dropout for PyTorch, CPU and CUDA.

Drop-in modules:  BatchNorm1d/2d/3d, BatchNormReLU1d/2d/3d, BatchNormAct1d/2d/3d, Dropout
Distributed:      SyncBatchNorm, SyncBatchNormReLU, convert_sync_batchnorm
Functional API:   fused_bn.functional
Whole models:     fused_bn.convert_model, fused_bn.revert_model
Deployment:       fused_bn.fold_batch_norm, fused_bn.fuse_custom_config (docs/deploy.md)
Operators:        torch.ops.fused_bn.*
"""

from . import functional
from ._ops import build_info
from .activations import Activation
from .convert import ConversionReport, convert_model
from .dropout import Dropout
from .fold import fold_batch_norm, fuse_custom_config
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
)
from .revert import revert_model
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormReLU, convert_sync_batchnorm
from .version import __version__

__all__ = [
    "Activation",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "ConversionReport",
    "Dropout",
    "SyncBatchNorm",
    "SyncBatchNormReLU",
    "build_info",
    "convert_model",
    "convert_sync_batchnorm",
    "fold_batch_norm",
    "fuse_custom_config",
    "functional",
    "revert_model",
    "__version__",
]
