"""Real model zoos (torchvision, timm) for the model-level benchmarks and tests.

torchvision's wheels are built against the CUDA build of torch. Beside the CPU
build its native library does not load, and ``import torchvision`` then fails
while registering fake kernels for two detection ops that were never defined.
The model builders need none of its native ops, so where the library does not
register them, :func:`import_torchvision` defines those two schemas (without
kernels) first. Where the library loads, nothing is stubbed.
"""

import glob
import importlib.util
import os

import torch

__all__ = ["import_timm", "import_torchvision"]

# The ops torchvision registers fake kernels for at import (torchvision/_meta_registrations.py).
_FAKE_REGISTERED_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_stub_library = None


def _native_ops_load(package_dir):
    for path in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(path)
        except OSError:
            return False
    return hasattr(torch.ops.torchvision, "nms")


def import_torchvision():
    """``torchvision``, importable beside a CPU build of torch; None when not installed."""
    global _stub_library
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return None
    if _stub_library is None and not _native_ops_load(os.path.dirname(spec.origin)):
        _stub_library = torch.library.Library("torchvision", "DEF")
        for schema in _FAKE_REGISTERED_SCHEMAS:
            _stub_library.define(schema)
    import torchvision

    return torchvision


def import_timm():
    """``timm`` (it imports torchvision), or None when either is not installed."""
    if import_torchvision() is None or importlib.util.find_spec("timm") is None:
        return None
    import timm

    return timm
