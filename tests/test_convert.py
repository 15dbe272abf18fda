"""convert_model: fusion decisions, what carries over, and equality with the original model."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import fused_bn
from fused_bn.convert import convert_model

# ---- models -----------------------------------------------------------------


def conv3x3(inplanes, planes, stride=1):
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with one ReLU module per call site."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # residual add between bn2 and relu2: fused as bn2(out, identity)
        return self.relu2(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck written with functional ReLUs."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)).relu()
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return torch.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=((BasicBlock, 16, 1), (Bottleneck, 8, 2)), num_classes=10):
        super().__init__()
        self.inplanes = 8
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(*layers[0])
        self.layer2 = self._make_layer(*layers[1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

    def _make_layer(self, block, planes, stride):
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
        layer = nn.Sequential(
            block(self.inplanes, planes, stride, downsample),
            block(planes * block.expansion, planes),
        )
        self.inplanes = planes * block.expansion
        return layer

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# (BatchNorm, where its ReLU was, the residual it now adds): every BN->ReLU pair,
# residual tails included; only the downsample BatchNorms keep no activation.
RESNET_FUSED = {
    ("bn1", "relu", ""),
    ("layer1.0.bn1", "layer1.0.relu1", ""),
    ("layer1.0.bn2", "layer1.0.relu2", "the output of layer1.0.downsample"),
    ("layer1.1.bn1", "layer1.1.relu1", ""),
    ("layer1.1.bn2", "layer1.1.relu2", "the input 'x' of layer1.1"),
    ("layer2.0.bn1", "F.relu() in layer2.0.forward", ""),
    ("layer2.0.bn2", ".relu() in layer2.0.forward", ""),
    ("layer2.0.bn3", "torch.relu() in layer2.0.forward", "the output of layer2.0.downsample"),
    ("layer2.1.bn1", "F.relu() in layer2.1.forward", ""),
    ("layer2.1.bn2", ".relu() in layer2.1.forward", ""),
    ("layer2.1.bn3", "torch.relu() in layer2.1.forward", "the input 'x' of layer2.1"),
}


def mlp(dropout=0.0):
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(16, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 3),
    )


class SharedReLUBlock(nn.Module):
    """torchvision's BasicBlock as it is: one ReLU module used at two call sites."""

    def __init__(self, planes=6):
        super().__init__()
        self.conv1 = conv3x3(planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResidualBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(x) + x)


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.bn(x)
        return self.relu(y) + y


class ReLUFlavours(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3, self.bn4, self.bn5 = (nn.BatchNorm2d(6) for _ in range(5))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = F.relu(self.bn1(x))
        x = self.relu(self.bn2(x))
        x = torch.relu(self.bn3(x))
        x = F.relu(self.bn4(x), inplace=True)
        return self.bn5(x).relu_()


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; a traceable child inside."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.child = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU())

    def forward(self, x):
        x = self.relu(self.bn(x))
        if x.sum() > 0:
            x = x * 2
        return self.child(x)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.bn(x)
        if self.training:
            x = x - 0.5
        return self.relu(x)


# ---- helpers ----------------------------------------------------------------


def randomize_statistics(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                with torch.no_grad():
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                    module.bias.uniform_(-0.5, 0.5, generator=generator)
            if module.track_running_stats:
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model


def converted(model, **kwargs):
    return convert_model(model, return_report=True, **kwargs)


def train_steps(model, inputs, steps=3):
    """Outputs and gradients of each step of SGD with momentum on a fixed loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = []
    for step in range(steps):
        optimizer.zero_grad()
        output = model(inputs[step])
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        history.append((output.detach().clone(), grads))
        optimizer.step()
    return history


def assert_trains_like(original, model, inputs, steps=3, **tolerance):
    reference = train_steps(original, inputs, steps)
    for (out, grads), (out_ref, grads_ref) in zip(train_steps(model, inputs, steps), reference):
        torch.testing.assert_close(out, out_ref, **tolerance)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], **tolerance, msg=name)
    state, state_ref = model.state_dict(), original.state_dict()
    assert list(state) == list(state_ref)
    for key in state:  # parameters after the steps, running stats, num_batches_tracked
        torch.testing.assert_close(state[key], state_ref[key], **tolerance, msg=key)


def assert_evaluates_like(original, model, x, **tolerance):
    original.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), **tolerance)


class CountReLUCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        self.count += name in ("relu", "relu_")
        return func(*args, **(kwargs or {}))


def relu_calls(module, x):
    with CountReLUCalls() as counter, torch.no_grad():
        module(x)
    return counter.count


def fused_pairs(report):
    """{(BatchNorm, activation site)} of the fusions with an activation."""
    return {(f.batch_norm, f.site) for f in report.fused if f.activation != "identity"}


def fusions(report):
    return {(f.batch_norm, f.site, f.residual) for f in report.fused}


# ---- ResNet -------------------------------------------------------------------


def test_resnet_fuses_what_the_graph_allows():
    torch.manual_seed(0)
    original = ResNet()
    model, report = converted(original)
    assert fusions(report) == RESNET_FUSED
    assert all(f.activation == "relu" for f in report.fused)
    assert report.warnings == []
    assert type(model.bn1) is fused_bn.BatchNormReLU2d and type(model.relu) is nn.Identity
    block, bottleneck = model.layer1[0], model.layer2[0]
    assert type(block.bn1) is fused_bn.BatchNormReLU2d and type(block.relu1) is nn.Identity
    assert type(block.bn2) is fused_bn.BatchNormReLU2d and type(block.relu2) is nn.Identity
    assert type(block.downsample[1]) is fused_bn.BatchNorm2d
    assert type(bottleneck.bn3) is fused_bn.BatchNormReLU2d
    assert isinstance(bottleneck, Bottleneck) and bottleneck.expansion == 4
    # Unchanged classes; a rewritten forward is a generated subclass of the same name.
    assert type(model) is ResNet and isinstance(block, BasicBlock)
    assert type(block).__qualname__ == "BasicBlock" and type(block).__module__ == __name__
    assert list(model.state_dict()) == list(original.state_dict())
    replaced = {(r.name, r.old_type, r.new_type) for r in report.replaced}
    assert ("layer1.0.relu1", "ReLU", "Identity") in replaced
    assert ("layer2.0.downsample.1", "BatchNorm2d", "BatchNorm2d") in replaced
    assert ("layer2.0.bn1", "BatchNorm2d", "BatchNormReLU2d") in replaced
    batch_norms = [n for n, m in original.named_modules() if type(m) is nn.BatchNorm2d]
    assert {r.name for r in report.replaced if r.old_type == "BatchNorm2d"} == set(batch_norms)
    assert "11 fused with an activation, 4 with a residual add" in str(report)
    assert "layer1.0.downsample.1: BatchNorm2d -> fused_bn.BatchNorm2d; followed by" in str(report)


def test_resnet_functional_relus_are_removed_from_forward():
    torch.manual_seed(0)
    original = ResNet().eval()
    model = convert_model(original)
    # Bottleneck had three functional ReLUs, the last after the residual add: all fused.
    assert relu_calls(original.layer2[1], torch.randn(2, 32, 3, 3)) == 3
    assert relu_calls(model.layer2[1], torch.randn(2, 32, 3, 3)) == 0
    # BasicBlock: relu1 and relu2 (after the residual add) became nn.Identity.
    assert relu_calls(model.layer1[1], torch.randn(2, 16, 6, 6)) == 0


def test_resnet_eval_matches():
    torch.manual_seed(0)
    original = randomize_statistics(ResNet()).eval()
    model = convert_model(original)
    assert not model.training and not model.layer2[0].bn1.training
    assert_evaluates_like(original, model, torch.randn(4, 3, 8, 8), rtol=1e-5, atol=1e-5)


def test_resnet_training_matches_float64():
    torch.manual_seed(0)
    original = randomize_statistics(ResNet()).double()
    model = convert_model(original)
    assert model.fc.weight.dtype == torch.float64 and model.bn1.running_mean.dtype == torch.float64
    inputs = torch.randn(3, 4, 3, 8, 8, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert int(model.layer2[1].bn2.num_batches_tracked) == 3


def test_converted_model_pickles_and_deep_copies():
    torch.manual_seed(0)
    model = convert_model(randomize_statistics(ResNet()).eval())
    x = torch.randn(2, 3, 8, 8)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (loaded, copy.deepcopy(model)):
        assert isinstance(clone.layer2[0], Bottleneck)
        assert relu_calls(clone.layer2[1], torch.randn(2, 32, 3, 3)) == 0
        assert_evaluates_like(model, clone, x, rtol=0, atol=0)


# ---- MLP in nn.Sequential -----------------------------------------------------


def test_mlp_sequential_fuses_adjacent_children():
    torch.manual_seed(0)
    original = mlp(dropout=0.3)
    model, report = converted(original)
    assert fused_pairs(report) == {("1", "2"), ("5", "6")}
    assert model[3].p == 0.3
    assert [type(m) for m in model] == [
        nn.Linear,
        fused_bn.BatchNormReLU1d,
        nn.Identity,
        fused_bn.Dropout,
        nn.Linear,
        fused_bn.BatchNormReLU1d,
        nn.Identity,
        nn.Linear,
    ]
    assert list(model.state_dict()) == list(original.state_dict())
    assert_evaluates_like(original, model, torch.randn(5, 12), rtol=1e-5, atol=1e-5)


def test_mlp_training_matches_float64():
    # p=0: fused_bn.Dropout draws its masks from its own Philox stream, so with p > 0
    # no seed makes them equal to nn.Dropout's; train-mode dropout is checked on its
    # own (test_converted_dropout_drops_as_fused_bn_dropout, ..._train_statistics).
    torch.manual_seed(0)
    original = randomize_statistics(mlp(dropout=0.0)).double()
    model = convert_model(original)
    assert type(model[3]) is fused_bn.Dropout and model[3].training
    inputs = torch.randn(4, 16, 12, dtype=torch.float64)
    assert_trains_like(original, model, inputs, steps=4, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=None),
        dict(momentum=0.3, eps=1e-3),
        dict(affine=False),
        dict(track_running_stats=False),
    ],
    ids=str,
)
def test_constructor_options_carry_over(options):
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, **options), nn.ReLU()).double()
    randomize_statistics(original)
    model = convert_model(original)
    bn = model[1]
    assert type(bn) is fused_bn.BatchNormReLU1d
    for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(bn, attribute) == getattr(original[1], attribute)
    assert list(model.state_dict()) == list(original.state_dict())
    inputs = torch.randn(4, 6, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, steps=4, rtol=1e-9, atol=1e-10)


def test_requires_grad_and_bias_presence_carry_over():
    original = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    original[0].weight.requires_grad_(False)
    original[1].bias = None
    model = convert_model(original)
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[1].bias is None and "1.bias" not in model.state_dict()
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(model(x), original(x))


# ---- cases that must not fuse ---------------------------------------------------


def test_not_fused_where_the_output_is_used_twice():
    torch.manual_seed(0)
    original = randomize_statistics(UsedTwice()).double()
    with pytest.warns(UserWarning, match="none of the model's 1 BatchNorm layers could be fused"):
        model, report = converted(original)
    assert report.fused == []
    assert "its output is used 2 times" in report.batch_norms[0].note
    assert type(model.bn) is fused_bn.BatchNorm2d and type(model.relu) is nn.ReLU
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(original, model, inputs[0], rtol=1e-9, atol=1e-10)


def test_shared_relu_module_is_fused_at_each_call_site():
    # torchvision's BasicBlock: one ReLU module after bn1 and after the residual add.
    torch.manual_seed(0)
    original = randomize_statistics(SharedReLUBlock()).double()
    model, report = converted(original)
    assert fusions(report) == {
        ("bn1", "relu (call 1 of 2)", ""),
        ("bn2", "relu (call 2 of 2)", "the input 'x' of the model"),
    }
    assert type(model.bn1) is type(model.bn2) is fused_bn.BatchNormReLU2d
    assert isinstance(model, SharedReLUBlock)
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(original, model, inputs[0], rtol=1e-9, atol=1e-10)
    assert relu_calls(model, inputs[0]) == 0


def test_residual_add_between_batch_norm_and_relu_is_fused():
    torch.manual_seed(0)
    original = randomize_statistics(ResidualBetween()).double()
    model, report = converted(original)
    assert fusions(report) == {("bn", "relu", "the input 'x' of the model")}
    assert type(model.bn) is fused_bn.BatchNormReLU2d and type(model.relu) is nn.Identity
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(original, model, inputs[0], rtol=1e-9, atol=1e-10)


def test_module_and_functional_relus_are_all_fused():
    torch.manual_seed(0)
    original = randomize_statistics(ReLUFlavours()).double()
    model, report = converted(original)
    assert fused_pairs(report) == {
        ("bn1", "F.relu() in the model.forward"),
        ("bn2", "relu"),
        ("bn3", "torch.relu() in the model.forward"),
        ("bn4", "F.relu() in the model.forward"),
        ("bn5", ".relu_() in the model.forward"),
    }
    assert all(type(getattr(model, f"bn{i}")) is fused_bn.BatchNormReLU2d for i in range(1, 6))
    assert type(model.relu) is nn.Identity and isinstance(model, ReLUFlavours)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    assert relu_calls(original, x) == 5 and relu_calls(model, x) == 0
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)


def test_shared_batch_norm_or_hooks_block_fusion():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    shared = nn.Sequential(bn, nn.ReLU(), nn.Sequential(bn, nn.ReLU()))
    model, report = converted(shared)
    assert report.fused == []
    assert model[0] is model[2][0] and type(model[0]) is fused_bn.BatchNorm1d
    model = convert_model(nn.Sequential(bn, nn.Linear(4, 4), bn))  # twice in one parent
    assert model[0] is model[2] and type(model[0]) is fused_bn.BatchNorm1d

    hooked = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    seen = []
    hooked[0].register_forward_hook(lambda module, args, output: seen.append(output.min()))
    model, report = converted(hooked)
    assert report.fused == [] and type(model[0]) is fused_bn.BatchNorm1d
    model(torch.randn(8, 4))
    assert len(seen) == 1 and seen[0] < 0  # the hook still fires, on the un-ReLU'd output


@pytest.mark.parametrize("cls", [Untraceable, ModeDependent])
def test_untraceable_warns_and_replaces_one_for_one(cls):
    torch.manual_seed(0)
    original = randomize_statistics(cls()).double()
    with pytest.warns(UserWarning, match="could not be traced because"):
        model, report = converted(original)
    assert len(report.warnings) == 1 and "the model" in report.warnings[0]
    assert type(model.bn) is fused_bn.BatchNorm2d and type(model.relu) is nn.ReLU
    if cls is Untraceable:  # its traceable child is still fused
        assert fused_pairs(report) == {("child.0", "child.1")}
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)


def test_leaves_other_batch_norms_alone():
    class MyBatchNorm(nn.BatchNorm1d):
        pass

    original = nn.Sequential(nn.SyncBatchNorm(4), nn.ReLU(), MyBatchNorm(4), nn.ReLU())
    with pytest.warns(UserWarning, match="none of the model's 2 BatchNorm layers could be conv"):
        model, report = converted(original)
    assert report.replaced == [] and report.fused == []
    assert type(model[0]) is nn.SyncBatchNorm and type(model[2]) is MyBatchNorm


def test_batch_norm_as_the_whole_model():
    original = nn.BatchNorm3d(3, momentum=0.2).eval()
    model, report = converted(original)
    assert type(model) is fused_bn.BatchNorm3d and not model.training and model.momentum == 0.2
    assert [(r.name, r.new_type) for r in report.replaced] == [("", "BatchNorm3d")]


# ---- repeated conversion, inplace ------------------------------------------------


def test_converting_twice_changes_nothing():
    torch.manual_seed(0)
    once = convert_model(randomize_statistics(ResNet()).eval())
    twice, report = converted(once)
    assert report.replaced == [] and report.fused == [] and report.warnings == []
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    assert_evaluates_like(once, twice, torch.randn(2, 3, 8, 8), rtol=0, atol=0)


def test_copy_by_default_leaves_the_original_untouched():
    torch.manual_seed(0)
    original = ResNet()
    types = [type(m) for m in original.modules()]
    state = copy.deepcopy(original.state_dict())
    model = convert_model(original)
    assert model is not original
    assert [type(m) for m in original.modules()] == types
    assert type(original.layer2[0]).forward is Bottleneck.forward
    assert model.bn1.weight is not original.bn1.weight
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    for key, value in original.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_inplace_keeps_parameter_objects_for_an_existing_optimizer():
    torch.manual_seed(0)
    model = mlp(dropout=0.3)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    converted_model = convert_model(model, inplace=True)
    assert converted_model is model and type(model[1]) is fused_bn.BatchNormReLU1d
    assert type(model[3]) is fused_bn.Dropout
    assert list(model.parameters()) == parameters
    before = model[1].weight.detach().clone()
    model(torch.randn(8, 12)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)


# ---- Dropout ----------------------------------------------------------------------


class DropoutFlavours(nn.Module):
    """Every dropout class; only the plain nn.Dropout ones are replaced."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Dropout(0.3)
        self.inplace = nn.Dropout(0.7, inplace=True)
        self.alpha = nn.AlphaDropout(0.2)
        self.feature_alpha = nn.FeatureAlphaDropout(0.2)
        self.channels = nn.Dropout2d(0.2)
        self.own = OwnDropout(0.2)
        self.fused = fused_bn.Dropout(0.4, mask_mode="recompute")

    def forward(self, x):
        x = self.inplace(self.plain(x))
        x = self.alpha(x) + self.feature_alpha(x) + self.channels(x)
        return self.fused(self.own(x))


class OwnDropout(nn.Dropout):
    pass


def test_only_plain_dropout_is_replaced_and_reported():
    original = DropoutFlavours().eval()
    model, report = converted(original)
    assert [(r.name, r.old_type, r.new_type) for r in report.replaced] == [
        ("plain", "Dropout", "Dropout"),
        ("inplace", "Dropout", "Dropout"),
    ]
    assert "  plain: Dropout -> Dropout\n  inplace: Dropout -> Dropout" in str(report)
    assert type(model.plain) is fused_bn.Dropout and type(model.inplace) is fused_bn.Dropout
    for name in ("alpha", "feature_alpha", "channels", "own"):
        assert type(getattr(model, name)) is type(getattr(original, name))
    assert model.fused.mask_mode == "recompute" and model.fused.p == 0.4


@pytest.mark.parametrize("training", [True, False])
def test_dropout_options_and_mode_carry_over(training):
    original = DropoutFlavours().train(training)
    model = convert_model(original)
    for name in ("plain", "inplace"):
        old, new = getattr(original, name), getattr(model, name)
        assert (new.p, new.inplace, new.training) == (old.p, old.inplace, training)
        assert new.mask_mode == "bits"


def test_dropout_false_leaves_dropout_alone():
    original = mlp(dropout=0.3)
    model, report = converted(original, dropout=False)
    assert type(model[3]) is nn.Dropout and model[3].p == 0.3
    assert "Dropout" not in {r.old_type for r in report.replaced}


def test_dropout_hooks_and_sharing_carry_over():
    shared = nn.Dropout(0.5)
    seen = []
    shared.register_forward_hook(lambda module, args, output: seen.append(type(module)))
    model = convert_model(nn.Sequential(shared, nn.Linear(4, 4), shared))
    assert model[0] is model[2] and type(model[0]) is fused_bn.Dropout
    model(torch.randn(3, 4))
    assert seen == [fused_bn.Dropout, fused_bn.Dropout]


def test_eval_outputs_with_dropout_are_equal():
    original = DropoutFlavours().eval()
    model = convert_model(original)
    assert_evaluates_like(original, model, torch.randn(4, 6, 5, 5), rtol=0, atol=0)


def test_converted_dropout_drops_as_fused_bn_dropout():
    model = convert_model(nn.Sequential(nn.Dropout(0.3)))
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    output = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(output, fused_bn.functional.dropout(x, 0.3), rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_converted_dropout_train_statistics(p):
    model = convert_model(nn.Sequential(nn.Dropout(p)))
    n = 1 << 18
    x = torch.randn(n, dtype=torch.float64, requires_grad=True)
    output = model(x)
    kept = output != 0
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) < 5 * sigma
    torch.testing.assert_close(output[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)
    output.backward(torch.ones_like(output))
    torch.testing.assert_close(x.grad, kept.double() / (1 - p), rtol=1e-15, atol=0)


# ---- patterns of torchvision and timm models, in plain code ------------------------


class DenseNetTail(nn.Module):
    """torchvision's DenseNet: the features end in norm5; F.relu is one level up."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(6))
        self.classifier = nn.Linear(6, 2)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class DropBlockBlock(nn.Module):
    """timm's ResNet block: bn2 -> drop_block (nn.Identity when off) -> act2, then the add."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv3x3(6, 6)
        self.bn1 = nn.BatchNorm2d(6)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(6, 6)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(x))
        x += shortcut
        return self.act2(x)


class ActivationFlavours(nn.Module):
    """Functional activations other than ReLU (MobileNet, EfficientNet, CSPDarknet)."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3, self.bn4, self.bn5, self.bn6 = (
            nn.BatchNorm2d(6) for _ in range(6))

    def forward(self, x):
        x = F.relu6(self.bn1(x))
        x = F.silu(self.bn2(x), inplace=True)
        x = F.hardswish(self.bn3(x))
        x = F.leaky_relu(self.bn4(x), 0.2)
        x = F.elu(self.bn5(x))
        return F.hardtanh(self.bn6(x), -1.0, 2.0)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d, reduced: act(drop(batch_norm(x))), and its
    forward counts num_batches_tracked as timm's does."""

    def __init__(self, num_features, momentum=0.1, act_layer=nn.LeakyReLU):
        super().__init__(num_features, momentum=momentum)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True)

    def forward(self, x):
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, momentum, self.eps)
        return self.act(self.drop(x))


# convert_model recognises timm's class by module and name, without importing timm.
BatchNormAct2d.__module__ = "timm.layers.norm_act"


def test_functional_relu_one_level_up_is_fused():
    torch.manual_seed(0)
    original = randomize_statistics(DenseNetTail()).double()
    model, report = converted(original)
    assert report.activations_fused == 1 and report.fused[0].batch_norm == "features.1"
    assert type(model.features[1]) is fused_bn.BatchNormReLU2d
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    assert relu_calls(original, x) == 1 and relu_calls(model, x) == 0
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(original, model, inputs[0], rtol=1e-9, atol=1e-10)


def test_identity_between_and_inplace_residual_add_are_fused():
    torch.manual_seed(0)
    original = randomize_statistics(DropBlockBlock()).double()
    model, report = converted(original)
    assert fused_pairs(report) == {("bn1", "act1"), ("bn2", "act2")}
    assert report.residuals_fused == 1
    assert type(model.bn1) is type(model.bn2) is fused_bn.BatchNormReLU2d
    assert type(model.drop_block) is nn.Identity and isinstance(model, DropBlockBlock)
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(original, model, inputs[0], rtol=1e-9, atol=1e-10)


def test_functional_activations_other_than_relu_are_fused():
    torch.manual_seed(0)
    original = randomize_statistics(ActivationFlavours()).double()
    model, report = converted(original)
    activations = {f.batch_norm: f.activation for f in report.fused}
    assert list(activations) == [f"bn{i}" for i in range(1, 7)]
    assert all(type(getattr(model, f"bn{i}")) is fused_bn.BatchNormAct2d for i in range(1, 7))
    assert "0.2" in activations["bn4"] and "2.0" in activations["bn6"]
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(original, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(original, model, inputs[0], rtol=1e-9, atol=1e-10)


def test_timm_batch_norm_act_is_converted_without_running_it():
    torch.manual_seed(0)
    original = randomize_statistics(
        nn.Sequential(conv3x3(6, 6), BatchNormAct2d(6, momentum=None))).double()
    reference = copy.deepcopy(original)
    keys = list(original.state_dict())
    model, report = converted(original, inplace=True)  # the user's own model
    assert model is original and int(model[1].num_batches_tracked) == 0
    assert type(model[1]) is fused_bn.BatchNormAct2d and list(model.state_dict()) == keys
    assert report.fused[0].batch_norm == "1" and "leaky_relu" in report.fused[0].activation
    inputs = torch.randn(3, 4, 6, 5, 5, dtype=torch.float64)
    assert_trains_like(reference, model, inputs, rtol=1e-9, atol=1e-10)
    assert_evaluates_like(reference, model, inputs[0], rtol=1e-9, atol=1e-10)


def test_timm_batch_norm_act_with_active_drop_is_left_alone():
    layer = BatchNormAct2d(6)
    layer.drop = nn.Dropout2d(0.1)
    with pytest.warns(UserWarning, match="none of the model's 1 BatchNorm layers could be conv"):
        model, report = converted(nn.Sequential(layer))
    assert type(model[0]) is BatchNormAct2d and report.batch_norms[0].note


def test_report_says_why_an_activation_was_not_fused():
    original = nn.Sequential(nn.BatchNorm2d(6), nn.GELU(), nn.BatchNorm2d(6), nn.ReLU())
    _, report = converted(original)
    assert [b.fusion is not None for b in report.batch_norms] == [False, True]
    assert "GELU" in report.batch_norms[0].note
    assert "GELU" in str(report)
