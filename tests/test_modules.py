"""Drop-in behaviour of the modules: constructor, state_dict, .to(), repr."""

import inspect

import pytest
import torch
from conftest import BIAS_FALSE, FUSED_BN, FUSED_BN_RELU, TORCH_BN
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fused_bn

KINDS = [1, 2, 3]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", [FUSED_BN, FUSED_BN_RELU])
def test_constructor_signature_is_torchs(kind, family):
    assert inspect.signature(family[kind].__init__) == inspect.signature(TORCH_BN[kind].__init__)
    assert issubclass(family[kind], _BatchNorm)


@pytest.mark.parametrize("kind", KINDS)
def test_relu_variant_is_not_a_plain_batchnorm(kind):
    # Tools that fold BatchNormXd into a preceding conv must not drop the ReLU.
    assert not issubclass(FUSED_BN_RELU[kind], TORCH_BN[kind])


@pytest.mark.parametrize(
    "options", [{}, dict(affine=False), dict(track_running_stats=False), BIAS_FALSE]
)
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trips_with_torch(kind, options):
    torch.manual_seed(0)
    ref = TORCH_BN[kind](5, **options)
    if ref.weight is not None:
        nn.init.uniform_(ref.weight)
    if ref.running_mean is not None:
        ref.running_mean.uniform_()
        ref.num_batches_tracked.fill_(7)
    fused = FUSED_BN_RELU[kind](5, **options)
    assert list(fused.state_dict().keys()) == list(ref.state_dict().keys())
    fused.load_state_dict(ref.state_dict())
    back = TORCH_BN[kind](5, **options)
    back.load_state_dict(fused.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)


def test_old_state_dict_without_num_batches_tracked_loads():
    ref = nn.BatchNorm2d(3)
    state = ref.state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    fused = fused_bn.BatchNormReLU2d(3)
    fused.load_state_dict(state)
    assert fused.num_batches_tracked.item() == 0


def test_to_dtype_reset_and_repr():
    m = fused_bn.BatchNormReLU2d(4, momentum=None, eps=1e-3).to(torch.float64)
    assert m.weight.dtype == m.running_mean.dtype == torch.float64
    assert m.num_batches_tracked.dtype == torch.long
    m(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    m.reset_parameters()
    assert m.num_batches_tracked.item() == 0 and torch.all(m.running_var == 1)
    assert "activation=relu" in repr(m) and "eps=0.001" in repr(m)
    assert "activation" not in repr(fused_bn.BatchNorm2d(4))


def test_device_and_dtype_factory_kwargs():
    m = fused_bn.BatchNorm1d(3, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.running_var.dtype == torch.float64


def test_cumulative_moving_average_matches_torch():
    torch.manual_seed(0)
    ref, fused = nn.BatchNorm1d(4, momentum=None), fused_bn.BatchNorm1d(4, momentum=None)
    for _ in range(4):
        x = torch.randn(8, 4) * 3 + 1
        ref(x)
        fused(x)
    torch.testing.assert_close(fused.running_mean, ref.running_mean)
    torch.testing.assert_close(fused.running_var, ref.running_var)


def test_build_info():
    info = fused_bn.build_info()
    assert info["version"] == fused_bn.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    assert info["cuda"] == bool(info["cuda_archs"])
