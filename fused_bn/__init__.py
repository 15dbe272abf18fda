"""fused_bn: fused BatchNorm(+ReLU) and Dropout for PyTorch, CPU and CUDA.

Drop-in modules:  BatchNorm1d/2d/3d, BatchNormReLU1d/2d/3d, Dropout
Functional API:   fused_bn.functional
Operators:        torch.ops.fused_bn.*
"""

from . import functional
from ._ops import build_info
from .dropout import Dropout
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
)
from .version import __version__

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "Dropout",
    "build_info",
    "functional",
    "__version__",
]
