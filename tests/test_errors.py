"""Bad input raises PyTorch's error, and a call that raises changes nothing."""

import copy

import pytest
import torch
from conftest import FUSED_BN, FUSED_BN_RELU, TORCH_BN
from torch import nn

import fused_bn


def state_of(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a call that raised"


def raises_like_torch(kind, input, fused_family=FUSED_BN_RELU, train=True, **options):
    """Both torch's BatchNormXd and the fused module raise the same type and message;
    the fused module's state and the input are untouched."""
    torch_module = TORCH_BN[kind](3, **options).train(train)
    fused = fused_family[kind](3, **options).train(train)
    before, input_before = state_of(fused), input.clone()
    with pytest.raises(Exception) as torch_error:
        torch_module(input)
    with pytest.raises(type(torch_error.value)) as fused_error:
        fused(input)
    assert str(fused_error.value) == str(torch_error.value)
    assert_unchanged(fused, before)
    assert torch.equal(input, input_before)


@pytest.mark.parametrize(
    "kind,shape",
    [(1, (4, 3, 2, 2)), (1, (3,)), (2, (4, 3, 5)), (2, (2, 3, 4, 4, 4)), (3, (4, 3, 5, 5))],
)
@pytest.mark.parametrize("family", [FUSED_BN, FUSED_BN_RELU])
def test_wrong_ndim(kind, shape, family):
    raises_like_torch(kind, torch.randn(shape), family)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind,shape", [(1, (4, 5)), (2, (4, 5, 3, 3)), (3, (2, 2, 3, 3, 3))])
def test_wrong_channel_count(kind, shape, train):
    raises_like_torch(kind, torch.randn(shape), train=train)


@pytest.mark.parametrize(
    "kind,shape", [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))]
)
def test_one_value_per_channel_in_training(kind, shape):
    raises_like_torch(kind, torch.randn(shape))


def test_one_value_per_channel_is_fine_in_eval():
    fused = fused_bn.BatchNormReLU1d(3).eval()
    reference = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()).eval()
    x = torch.randn(1, 3)
    torch.testing.assert_close(fused(x), reference(x))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_input(dtype):
    fused = fused_bn.BatchNormReLU2d(3)
    before = state_of(fused)
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    with pytest.raises(NotImplementedError, match="not implemented for"):
        fused(x)
    assert_unchanged(fused, before)


def test_parameter_dtype_mismatch():
    fused = fused_bn.BatchNormReLU2d(3)  # float32 parameters
    before = state_of(fused)
    with pytest.raises(RuntimeError, match="all inputs must share same datatype"):
        fused(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert_unchanged(fused, before)
    # float32 parameters with bfloat16/float16 input are mixed precision, as in torch.
    fused(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))
    fused.to(torch.float16)
    with pytest.raises(RuntimeError, match="expect parameter to have scalar type of Float"):
        fused(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))


def test_parameter_on_another_device():
    fused = fused_bn.BatchNormReLU2d(3)
    fused.weight = nn.Parameter(torch.ones(3, device="meta"))
    before = {k: v.clone() for k, v in fused.state_dict().items() if v.device.type == "cpu"}
    message = "Tensor on device meta is not on the expected device cpu!"
    with pytest.raises(RuntimeError, match=message):
        fused(torch.randn(2, 3, 4, 4))
    for key, value in before.items():
        assert torch.equal(fused.state_dict()[key], value)


def test_unknown_activation():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_bn.functional.batch_norm(x, None, None, training=True, activation="gelu")
    with pytest.raises(RuntimeError, match="unknown activation 'gelu'"):
        torch.ops.fused_bn.batch_norm_act(x, None, None, None, None, None, True, 0.1, 1e-5, "gelu")


def test_eval_without_running_stats_in_functional():
    # F.batch_norm's error; an empty batch is returned as it is, as there.
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        fused_bn.functional.batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(RuntimeError, match="running_var must be defined in evaluation mode"):
        fused_bn.functional.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=False)
    empty = torch.randn(0, 3)
    assert fused_bn.functional.batch_norm(empty, None, None, training=False).shape == (0, 3)


def test_backward_op_checks_statistics():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="mean should contain 3 elements not 2"):
        torch.ops.fused_bn.batch_norm_act_backward(
            x, x, None, None, torch.zeros(2), torch.ones(3), True, "relu"
        )
    with pytest.raises(RuntimeError, match="expected invstd of dtype Float"):
        torch.ops.fused_bn.batch_norm_act_backward(
            x, x, None, None, torch.zeros(3), torch.ones(3, dtype=torch.float64), True, "relu"
        )
    with pytest.raises(RuntimeError, match="does not match input of shape"):
        torch.ops.fused_bn.batch_norm_act_backward(
            x[:2], x, None, None, torch.zeros(3), torch.ones(3), True, "relu"
        )


def test_functional_raise_leaves_running_stats_untouched():
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    weight = torch.ones(5)
    with pytest.raises(RuntimeError, match="weight should contain 4 elements not 5"):
        fused_bn.functional.batch_norm_relu(
            torch.randn(8, 4), running_mean, running_var, weight, training=True
        )
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))


def test_deepcopy_after_failed_call_is_usable():
    fused = fused_bn.BatchNormReLU2d(3)
    with pytest.raises(ValueError):
        fused(torch.randn(1, 3, 1, 1))
    copy.deepcopy(fused)(torch.randn(2, 3, 2, 2))
