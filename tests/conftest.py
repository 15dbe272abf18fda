import copy
import inspect
import os

import pytest
import torch
from torch import nn

import fused_bn

TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# BatchNorm's constructor option `bias` (bias=False: a weight but no bias) is
# newer than some torch releases the modules run on; it is tested where torch has it.
BIAS_FALSE = pytest.param(
    dict(bias=False),
    id="{'bias': False}",
    marks=pytest.mark.skipif(
        "bias" not in inspect.signature(nn.BatchNorm2d.__init__).parameters,
        reason="this torch's BatchNorm has no bias argument",
    ),
)
# Hypothesis profiles of the property-based tests (tests/test_properties.py):
#   ci    the default: derandomized (the same examples on every run), a bounded number of
#         examples so that the file takes a few minutes on 2 cores, the reproducing blob
#         printed on failure;
#   long  many random examples, for local runs: HYPOTHESIS_PROFILE=long python -m pytest ...
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as hypothesis_settings
except ImportError:  # test_properties.py skips without hypothesis
    hypothesis_settings = None
if hypothesis_settings is not None:
    _slow_examples_are_fine = [HealthCheck.too_slow, HealthCheck.data_too_large]
    hypothesis_settings.register_profile(
        "ci", derandomize=True, database=None, max_examples=500, deadline=None, print_blob=True,
        suppress_health_check=_slow_examples_are_fine,
    )
    hypothesis_settings.register_profile(
        "long", max_examples=5000, deadline=None, print_blob=True,
        suppress_health_check=_slow_examples_are_fine,
    )
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FUSED_BN = {1: fused_bn.BatchNorm1d, 2: fused_bn.BatchNorm2d, 3: fused_bn.BatchNorm3d}
FUSED_BN_RELU = {
    1: fused_bn.BatchNormReLU1d, 2: fused_bn.BatchNormReLU2d, 3: fused_bn.BatchNormReLU3d
}

# Absolute/relative tolerances against a float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


def bn_kind(shape):
    """1, 2 or 3 for the BatchNormXd that accepts an input of this shape."""
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


def fused_class(kind, activation):
    """fused_bn.BatchNormXd or BatchNormReLUXd for BatchNorm kind 1, 2 or 3."""
    return (FUSED_BN_RELU if activation == "relu" else FUSED_BN)[kind]


def make_pair(shape, activation, dtype=torch.float64, seed=0, **options):
    """A torch reference (BatchNormXd [+ ReLU]) and the fused module, with equal random
    parameters and running statistics."""
    kind, channels = bn_kind(shape), shape[1]
    torch.manual_seed(seed)
    reference_bn = TORCH_BN[kind](channels, **options)
    if reference_bn.weight is not None:
        with torch.no_grad():
            reference_bn.weight.uniform_(0.5, 1.5)
            if reference_bn.bias is not None:
                reference_bn.bias.uniform_(-0.5, 0.5)
    if reference_bn.running_mean is not None:
        reference_bn.running_mean.uniform_(-0.2, 0.2)
        reference_bn.running_var.uniform_(0.5, 1.5)
    reference = nn.Sequential(reference_bn, nn.ReLU()) if activation == "relu" else reference_bn
    fused = fused_class(kind, activation)(channels, **options)
    fused.load_state_dict(reference_bn.state_dict())
    return reference.to(dtype), fused.to(dtype)


def reference_bn_module(reference):
    return reference[0] if isinstance(reference, nn.Sequential) else reference


def layout_input(shape, layout, dtype, seed=1, offset=0.0):
    """A random input of `shape` in the given layout: 'contiguous', 'channels_last'
    (4-D/5-D) or 'strided' (a non-contiguous view)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided":
        # Every other element along the last dim of a wider tensor.
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)
        return (wide[..., ::2] * 1.5 + 0.3 + offset).to(dtype)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3 + offset).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


@pytest.fixture
def clone_module():
    return copy.deepcopy
