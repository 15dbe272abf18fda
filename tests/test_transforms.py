"""Forward-mode AD and torch.func transforms through the BatchNorm modules.

The fused op's autograd is C++, which neither forward-mode AD nor torch.func
supports; under them the modules and fused_bn.functional compute with torch's
own ops, so results, running statistics and errors are torch's.
"""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

import fused_bn

PAIRS = [
    (fused_bn.BatchNorm2d, lambda c, **kw: nn.BatchNorm2d(c, **kw), (4, 3, 5, 6)),
    (fused_bn.BatchNormReLU2d, lambda c, **kw: nn.Sequential(nn.BatchNorm2d(c, **kw), nn.ReLU()),
     (4, 3, 5, 6)),
    (fused_bn.BatchNormReLU1d, lambda c, **kw: nn.Sequential(nn.BatchNorm1d(c, **kw), nn.ReLU()),
     (8, 5)),
    # Without a process group of several ranks, both SyncBatchNorms compute locally.
    (fused_bn.SyncBatchNorm, lambda c, **kw: nn.SyncBatchNorm(c, **kw), (4, 3, 5, 6)),
    (fused_bn.SyncBatchNormReLU,
     lambda c, **kw: nn.Sequential(nn.SyncBatchNorm(c, **kw), nn.ReLU()), (4, 3, 5, 6)),
]
IDS = ["bn2d", "bn_relu2d", "bn_relu1d", "sync_bn", "sync_bn_relu"]


def batch_norm_of(module):
    return module[0] if isinstance(module, nn.Sequential) else module


def make_pair(pair, training, **kwargs):
    """A fused_bn module and its torch equivalent with the same parameters and buffers."""
    fused_cls, torch_factory, shape = pair
    channels = shape[1]
    gen = torch.Generator().manual_seed(0)
    values = {
        "weight": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_mean": torch.linspace(-1, 1, channels, dtype=torch.float64),
        "running_var": torch.linspace(0.5, 2, channels, dtype=torch.float64),
    }
    fused = fused_cls(channels, **kwargs).double().train(training)
    reference = torch_factory(channels, **kwargs).double().train(training)
    with torch.no_grad():
        for module in (fused, batch_norm_of(reference)):
            for name, value in values.items():
                getattr(module, name).copy_(value)
    return fused, reference, shape


def assert_same_state(fused, reference):
    bn = batch_norm_of(reference)
    assert torch.equal(fused.running_mean, bn.running_mean)
    assert torch.equal(fused.running_var, bn.running_var)
    assert torch.equal(fused.num_batches_tracked, bn.num_batches_tracked)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_forward_mode_ad_matches_torch(pair, training, momentum):
    fused, reference, shape = make_pair(pair, training, momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    for step in range(2):  # twice: momentum=None averages over num_batches_tracked
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1)
        tangent = torch.randn(shape, generator=gen, dtype=torch.float64)
        with forward_ad.dual_level():
            out = forward_ad.unpack_dual(fused(forward_ad.make_dual(x, tangent)))
            expected = forward_ad.unpack_dual(reference(forward_ad.make_dual(x, tangent)))
        assert out.tangent is not None
        torch.testing.assert_close(out.primal, expected.primal, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.tangent, expected.tangent, rtol=1e-12, atol=1e-12)
    assert_same_state(fused, reference)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_func_jvp_matches_torch(pair, training):
    fused, reference, shape = make_pair(pair, training)
    # What torch.func asks of BatchNorm in training: no running statistics.
    torch.func.replace_all_batch_norm_modules_(fused)
    torch.func.replace_all_batch_norm_modules_(reference)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    tangent = torch.randn(shape, generator=gen, dtype=torch.float64)
    out, jvp = torch.func.jvp(fused, (x,), (tangent,))
    expected, expected_jvp = torch.func.jvp(reference, (x,), (tangent,))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp, expected_jvp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_per_sample_gradients_match_torch(pair):
    # vmap(grad(...)) over the samples of a batch, the torch.func recipe, in eval mode.
    fused, reference, shape = make_pair(pair, training=False)
    params = {name: p.detach() for name, p in fused.named_parameters()}
    prefix = "0." if isinstance(reference, nn.Sequential) else ""

    def loss(module, names, p, sample):
        out = torch.func.functional_call(module, {names + k: v for k, v in p.items()},
                                         (sample.unsqueeze(0),))
        return out.pow(2).sum()

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow per-sample fallback of vmap
        grads = torch.func.vmap(torch.func.grad(lambda p, s: loss(fused, "", p, s)),
                                in_dims=(None, 0))(params, x)
    expected = torch.func.vmap(torch.func.grad(lambda p, s: loss(reference, prefix, p, s)),
                               in_dims=(None, 0))(params, x)
    for name in params:
        assert grads[name].shape == (shape[0], shape[1])
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-12)


def test_vmap_in_eval_matches_torch():
    fused, reference, shape = make_pair(PAIRS[1], training=False)
    x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.func.vmap(fused)(x)
    torch.testing.assert_close(out, torch.func.vmap(reference)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pair", PAIRS, ids=IDS)
def test_transform_errors_match_torch_and_change_nothing(pair):
    # torch.func refuses to update captured running statistics in training;
    # so must the drop-in, with torch's error, and nothing may change.
    fused, reference, shape = make_pair(pair, training=True)
    x = torch.randn(shape, dtype=torch.float64)
    messages = []
    for module in (reference, fused):
        with pytest.raises(RuntimeError) as error:
            torch.func.jvp(module, (x,), (torch.ones_like(x),))
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    assert_same_state(fused, reference)
    assert fused.num_batches_tracked.item() == 0


def test_plain_calls_keep_the_fused_op():
    module = fused_bn.BatchNormReLU2d(3)
    x = torch.randn(4, 3, 5, 6, requires_grad=True)
    assert module(x).grad_fn.name() == "BatchNormActBackward"
    with forward_ad.dual_level():  # a dual level alone, no tangent: still fused
        assert module(x).grad_fn.name() == "BatchNormActBackward"


def test_forward_mode_ad_bad_input_changes_nothing():
    fused, reference, _ = make_pair(PAIRS[1], training=True)
    x = torch.randn(4, 5, 5, 6, dtype=torch.float64)  # 5 channels, the modules have 3
    errors = []
    for module in (reference, fused):
        with forward_ad.dual_level(), pytest.raises(RuntimeError) as error:
            module(forward_ad.make_dual(x, torch.ones_like(x)))
        errors.append(str(error.value))
    assert errors[0] == errors[1]
    assert fused.num_batches_tracked.item() == 0
    torch.testing.assert_close(fused.running_mean, torch.linspace(-1, 1, 3, dtype=torch.float64))
