"""convert_model on real architectures (torchvision, timm; skipped without them).

Counts are exact: every BatchNorm followed by a fusable activation is fused, and
the residual add before an activation too. The BatchNorms left without one are
followed by no activation (MobileNet/EfficientNet projections, ResNet downsample
branches added to the other branch, which takes the add). tests/test_convert.py
keeps plain-code copies of these patterns for the core suite.
"""

import copy

import pytest
import torch

import fused_bn
from benchmarks.zoo import import_timm, import_torchvision

# (source, name): (BatchNorms, fused with an activation, fused with a residual add)
ZOO = {
    ("torchvision", "resnet18"): (20, 17, 8),
    ("torchvision", "resnet50"): (53, 49, 16),
    ("torchvision", "densenet121"): (121, 121, 0),
    ("torchvision", "mobilenet_v2"): (52, 35, 10),
    ("torchvision", "mobilenet_v3_small"): (34, 23, 6),
    ("torchvision", "efficientnet_b0"): (49, 33, 0),
    ("torchvision", "regnet_x_400mf"): (71, 67, 22),
    ("torchvision", "vgg11_bn"): (8, 8, 0),
    ("timm", "resnet26d"): (31, 27, 8),
    ("timm", "cspdarknet53"): (67, 67, 0),
    ("timm", "efficientnet_b0"): (49, 33, 9),
}


def build(source, name):
    if source == "torchvision":
        torchvision = import_torchvision()
        if torchvision is None:
            pytest.skip("needs torchvision")
        return getattr(torchvision.models, name)()
    timm = import_timm()
    if timm is None:
        pytest.skip("needs timm")
    return timm.create_model(name)


def randomize_statistics(model):
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, expected):
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


@pytest.fixture(scope="module", params=list(ZOO), ids=lambda key: f"{key[0]}-{key[1]}")
def converted(request):
    source, name = request.param
    torch.manual_seed(0)
    original = randomize_statistics(build(source, name)).double()
    before = snapshot(original)
    model, report = fused_bn.convert_model(original, dropout=False, return_report=True)
    return request.param, original, before, model, report


def test_every_fusable_pair_is_fused(converted):
    key, _, _, _, report = converted
    batch_norms, activations, residuals = ZOO[key]
    assert len(report.batch_norms) == batch_norms
    assert all(b.converted for b in report.batch_norms)
    assert (report.activations_fused, report.residuals_fused) == (activations, residuals)
    assert report.warnings == []
    for outcome in report.batch_norms:  # each one left alone says why
        if outcome.fusion is None:
            assert outcome.note


def test_conversion_changes_no_buffer(converted):
    _, original, before, model, _ = converted
    assert_state_equal(original, before)  # nothing ran for real
    assert_state_equal(model, before)


def test_state_dicts_interchange(converted):
    _, original, before, model, _ = converted
    model.load_state_dict(original.state_dict(), strict=True)
    copy.deepcopy(original).load_state_dict(model.state_dict(), strict=True)
    assert_state_equal(model, before)


@pytest.mark.parametrize("training", [False, True])
def test_outputs_and_gradients_match_float64(converted, training):
    _, original, before, model, _ = converted
    reference, fused = copy.deepcopy(original).train(training), copy.deepcopy(model).train(training)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    outputs = []
    for net in (reference, fused):
        torch.manual_seed(4)  # the same nn.Dropout masks (dropout=False kept them)
        y = net(x)
        y.square().mean().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-9)
    grads = dict(reference.named_parameters())
    for name, parameter in fused.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, rtol=1e-7, atol=1e-9,
                                   msg=name)
    for (name, a), b in zip(fused.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def test_float32_eval_matches(converted):
    _, original, _, model, _ = converted
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    reference, fused = copy.deepcopy(original).float().eval(), copy.deepcopy(model).float().eval()
    with torch.no_grad():
        expected = reference(x)
        # Rounding differences of float32 grow over 50 layers: relative to the output's scale.
        scale = expected.abs().max().item()
        torch.testing.assert_close(fused(x), expected, rtol=1e-3, atol=1e-4 * scale)


def test_revert_model_gives_the_same_outputs(converted):
    _, original, _, model, _ = converted
    reverted = fused_bn.revert_model(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = copy.deepcopy(original).eval()(x)
        torch.testing.assert_close(reverted.eval()(x), expected, rtol=1e-9, atol=1e-9)
    assert list(reverted.state_dict()) == list(original.state_dict())
