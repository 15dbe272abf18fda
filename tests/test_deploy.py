"""Deploying a fused model (docs/deploy.md): revert, ONNX, torch.export, fx, folding, TorchScript.

Each path runs on a small MLP and on hand-built blocks (always), and on torchvision's
resnet18 and mobilenet_v2 where torchvision is installed; ONNX where onnx, onnxscript and
onnxruntime are (the ``deploy`` extra). Models are trained a few steps, then used in eval.
"""

import copy
import pickle
import warnings

import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fused_bn
from benchmarks.zoo import import_torchvision
from fused_bn.plain import BatchNormAct, ResidualAct

# ---- models -----------------------------------------------------------------


def mlp():
    """The examples' MLP: Linear -> BatchNorm1d -> ReLU blocks, and a Dropout."""
    return nn.Sequential(
        nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(inplace=True),
        nn.Linear(8, 3),
    )


class FunctionalBlock(nn.Module):
    """BatchNorm followed by functional ReLUs: convert_model rewrites this forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)).relu()
        return self.head(out.mean(dim=(2, 3)))


class HandBuilt(nn.Module):
    """fused_bn's modules used directly: activations, a residual call, a fused Dropout."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = fused_bn.BatchNormAct2d(6, activation="silu")
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = fused_bn.BatchNormReLU2d(6)
        self.bn3 = fused_bn.BatchNorm2d(6)
        self.drop = fused_bn.Dropout(0.2)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out), out)  # act(bn(x) + residual)
        out = self.bn3(out)
        return self.head(self.drop(out.mean(dim=(2, 3))))


def torchvision_model(name):
    torchvision = import_torchvision()
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


def build(name):
    """(original PyTorch model or None, fused model, example input), trained a few steps."""
    torch.manual_seed(0)
    if name == "mlp":
        original, x = mlp(), torch.randn(6, 12)
    elif name == "functional_block":
        original, x = FunctionalBlock(), torch.randn(3, 3, 8, 8)
    elif name == "hand_built":
        original, x = None, torch.randn(3, 3, 8, 8)
    else:
        original, x = torchvision_model(name), torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = HandBuilt() if original is None else fused_bn.convert_model(original)
    with torch.no_grad():
        for step in range(3):
            fused(torch.randn_like(x) * (step + 1) + step)
    fused.eval()
    if original is not None:
        original.load_state_dict(fused.state_dict())
        original.eval()
    return original, fused, x


ALWAYS = ["mlp", "functional_block", "hand_built"]
TORCHVISION = ["resnet18", "mobilenet_v2"]
MODELS = ALWAYS + TORCHVISION
_BUILT = {}


@pytest.fixture(params=MODELS)
def model(request):
    """A fresh copy of a built model, for each test (building resnet18 once is enough)."""
    if request.param not in _BUILT:
        _BUILT[request.param] = build(request.param)
    return copy.deepcopy(_BUILT[request.param])


def fused_modules(model):
    return [m for m in model.modules()
            if isinstance(m, (fused_bn.modules._BatchNormAct, fused_bn.Dropout))]


def assert_same_outputs(actual, expected, x, **tolerance):
    with torch.no_grad():
        torch.testing.assert_close(actual(x), expected(x), **tolerance)


# ---- revert_model -----------------------------------------------------------


def test_revert_gives_pytorch_modules_same_state_and_outputs(model):
    original, fused, x = model
    reverted = fused_bn.revert_model(fused)
    if original is not None:
        assert not fused_modules(reverted)
        # The original modules (convert_model does not record ReLU's inplace).
        assert repr(reverted).replace("inplace=True", "") == repr(original).replace(
            "inplace=True", "")
        assert type(reverted) is type(original)
    assert list(reverted.state_dict()) == list(fused.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(reverted.state_dict()[key], value), key
    assert_same_outputs(reverted, fused, x, rtol=0, atol=0)
    assert fused_modules(fused)  # not inplace: the fused model is as it was


def test_revert_matches_in_training(model):
    # float64 and batch 4 (at most 16 px, for time): the last BatchNorms of resnet18 and
    # mobilenet_v2 see one value per sample and channel, so few samples are ill-conditioned.
    _, fused, x = model
    fused.double().train()
    reverted = fused_bn.revert_model(fused)
    for m in (*fused.modules(), *reverted.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # both would draw masks, from different generators
    gen = torch.Generator().manual_seed(5)
    shape = (4, x.shape[1], *(min(size, 16) for size in x.shape[2:]))
    for _ in range(2):
        batch = torch.randn(shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(reverted(batch), fused(batch))
    for (name, a), b in zip(fused.named_buffers(), reverted.buffers()):
        torch.testing.assert_close(b, a, msg=name)


def test_revert_hand_built_keeps_keys_with_plain_modules():
    _, fused, x = build("hand_built")
    reverted = fused_bn.revert_model(fused)
    assert type(reverted.bn1) is BatchNormAct and type(reverted.bn1.act) is nn.SiLU
    assert type(reverted.bn2) is BatchNormAct  # called with a residual
    assert type(reverted.bn3) is nn.BatchNorm2d and type(reverted.drop) is nn.Dropout
    assert not fused_modules(reverted)
    assert_same_outputs(reverted, fused, x, rtol=0, atol=0)
    pickle.loads(pickle.dumps(reverted))


def test_revert_restores_rewritten_forward_and_relu_modules():
    original, fused, _ = build("functional_block")
    assert type(fused) is not FunctionalBlock  # convert_model's generated subclass
    reverted = fused_bn.revert_model(fused, inplace=True)
    assert reverted is fused and type(fused) is FunctionalBlock
    assert type(fused.bn1) is nn.BatchNorm2d and type(fused.bn2) is nn.BatchNorm2d
    _, mlp_fused, _ = build("mlp")
    assert [type(m) for m in fused_bn.revert_model(mlp_fused)] == [type(m) for m in mlp()]


def test_revert_keeps_parameters_shared():
    _, fused, _ = build("mlp")
    weight = fused[1].weight
    reverted = fused_bn.revert_model(fused, inplace=True)
    assert reverted[1].weight is weight


# ---- ONNX ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnxruntime():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason="ONNX export needs the deploy extra")
    return pytest.importorskip("onnxruntime", reason="ONNX export needs the deploy extra")


def run_onnx(onnxruntime, path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def onnx_ops(path):
    import onnx

    graph = onnx.load(str(path)).graph
    return {(node.domain or "ai.onnx", node.op_type) for node in graph.node}


def assert_standard_onnx(path):
    domains = {domain for domain, _ in onnx_ops(path)}
    assert domains <= {"ai.onnx"}, domains


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch(model, onnxruntime, tmp_path, dynamo):
    _, fused, x = model
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        if dynamo:
            batch = torch.export.Dim("batch", min=2)
            torch.onnx.export(fused, (x,), path, dynamo=True, verbose=False,
                              dynamic_shapes=({0: batch},))
        else:
            torch.onnx.export(fused, (x,), path, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    assert_standard_onnx(path)
    for batch_size in (x.shape[0], 5):
        bigger = torch.randn(batch_size, *x.shape[1:], generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = fused(bigger)
        torch.testing.assert_close(run_onnx(onnxruntime, path, bigger), expected,
                                   rtol=1e-4, atol=1e-5)


def test_onnx_lowers_to_batch_normalization_and_activation(onnxruntime, tmp_path):
    model = nn.Sequential(
        nn.Flatten(), fused_bn.BatchNormAct1d(12, activation="leaky_relu", negative_slope=0.2),
    ).eval()
    path = tmp_path / "bn.onnx"
    torch.onnx.export(model, (torch.randn(4, 3, 4),), path, dynamo=True, verbose=False,
                      optimize=False)
    op_types = {op for _, op in onnx_ops(path)}
    assert {"BatchNormalization", "LeakyRelu"} <= op_types


def test_onnx_export_the_fused_model_left_in_training_mode_fails(onnxruntime, tmp_path):
    _, fused, x = build("mlp")
    with pytest.raises(Exception):  # noqa: B017 (the exporter's own error)
        torch.onnx.export(fused.train(), (x,), tmp_path / "m.onnx", dynamo=True, verbose=False)


# ---- torch.export -------------------------------------------------------------


def test_exported_program_holds_only_aten_ops(model):
    _, fused, x = model
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(fused, (x,), dynamic_shapes=({0: batch},))
    namespaces = {
        node.target.namespace for node in exported.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
    }
    assert namespaces == {"aten"}
    bigger = torch.randn(7, *x.shape[1:])
    assert_same_outputs(exported.module(), fused, bigger, rtol=1e-5, atol=1e-6)


# ---- torch.fx -------------------------------------------------------------------


def test_fx_symbolic_trace_keeps_fused_modules_as_leaves(model):
    _, fused, x = model
    traced = torch.fx.symbolic_trace(fused)
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    fused_names = {name for name, m in fused.named_modules() if m in fused_modules(fused)}
    assert fused_names <= called
    assert_same_outputs(traced, fused, x, rtol=0, atol=0)


def test_fx_fuse_keeps_the_activation(model):
    _, fused, x = model
    assert_same_outputs(fx_optimization.fuse(fused), fused, x, rtol=1e-5, atol=1e-6)


def test_fx_trace_of_a_lone_fused_module_says_why():
    with pytest.raises(torch.fx.proxy.TraceError, match="leaf"):
        torch.fx.symbolic_trace(fused_bn.BatchNormReLU2d(3))


@pytest.mark.parametrize("name", TORCHVISION)
def test_create_feature_extractor_names_match_the_original(name):
    original, fused, x = copy.deepcopy(_BUILT.get(name) or build(name))  # skips without torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    # Block outputs: a fused BatchNorm's own output includes what was fused into it.
    nodes = {"resnet18": ["maxpool", "layer1.0", "layer2", "layer4"],
             "mobilenet_v2": ["features.1", "features.3", "features.18"]}[name]
    extracted = create_feature_extractor(fused, return_nodes=nodes)(x)
    expected = create_feature_extractor(original, return_nodes=nodes)(x)
    for node in nodes:
        torch.testing.assert_close(extracted[node], expected[node], rtol=1e-5, atol=1e-5)


# ---- folding ------------------------------------------------------------------


def test_fold_batch_norm_removes_batch_norm_and_keeps_outputs(model):
    _, fused, x = model
    folded = fused_bn.fold_batch_norm(fused)
    remaining = [m for m in folded.modules() if isinstance(m, _BatchNorm)]
    # HandBuilt's bn3 follows a BatchNorm, not a layer.
    assert len(remaining) == (1 if isinstance(fused, HandBuilt) else 0)
    assert_same_outputs(folded, fused, x, rtol=1e-4, atol=1e-5)


def test_fold_batch_norm_leaves_activation_and_residual():
    _, fused, _ = build("hand_built")
    folded = fused_bn.fold_batch_norm(fused)
    assert type(folded.bn1) is nn.SiLU
    assert type(folded.bn2) is ResidualAct and type(folded.bn2.act) is nn.ReLU
    with pytest.raises(ValueError, match="eval"):
        fused_bn.fold_batch_norm(fused.train())


def conv_bn_model(batch_norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batch_norm, nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          fused_bn.BatchNormReLU1d(5))
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 8, 8))
    return model.eval()


@pytest.mark.parametrize("activation", ["identity", "relu", "hardswish"])
def test_fuse_modules_with_fused_bn_fuser_methods(activation):
    model = conv_bn_model(fused_bn.BatchNormAct2d(4, activation=activation))
    fused = torch.ao.quantization.fuse_modules(
        model, [["0", "1"], ["3", "4"]], fuse_custom_config_dict=fused_bn.fuse_custom_config())
    assert not [m for m in fused.modules() if isinstance(m, _BatchNorm)]
    assert_same_outputs(fused, model, torch.randn(3, 3, 8, 8), rtol=1e-5, atol=1e-6)


def test_fuse_modules_qat_gives_torchs_modules():
    import torch.ao.nn.intrinsic as nni

    model = conv_bn_model(fused_bn.BatchNormReLU2d(4)).train()
    weight = model[1].weight
    fused = torch.ao.quantization.fuse_modules_qat(
        model, [["0", "1"]], inplace=True, fuse_custom_config_dict=fused_bn.fuse_custom_config())
    assert type(fused[0]) is nni.ConvBnReLU2d
    assert fused[0][1].weight is weight
    silu = conv_bn_model(fused_bn.BatchNormAct2d(4, activation="silu")).train()
    with pytest.raises(NotImplementedError, match="SiLU"):
        torch.ao.quantization.fuse_modules_qat(
            silu, [["0", "1"]], fuse_custom_config_dict=fused_bn.fuse_custom_config())


@pytest.mark.parametrize("module", [fused_bn.BatchNormReLU2d(4),
                                    BatchNormAct(4, act=nn.ReLU())], ids=["fused", "plain"])
def test_torch_folding_refuses_to_drop_the_activation(module):
    conv = nn.Conv2d(3, 4, 1).eval()
    module.eval()
    with pytest.raises(RuntimeError, match="would drop"):
        torch.nn.utils.fuse_conv_bn_eval(conv, module)
    with pytest.raises(RuntimeError, match="would drop"):
        torch.nn.utils.fuse_linear_bn_eval(nn.Linear(3, 4).eval(), module)
    assert module.eps == 1e-5  # any other reader gets the value


def test_torch_sync_batch_norm_conversion_refuses_to_drop_the_activation():
    with pytest.raises(RuntimeError, match="would drop"):
        nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(fused_bn.BatchNormReLU2d(4)))
    plain = nn.Sequential(BatchNormAct(4, act=nn.ReLU()))  # not a _BatchNorm: left as it is
    assert nn.SyncBatchNorm.convert_sync_batchnorm(plain) is plain


def test_torch_folding_of_a_plain_fused_batch_norm_still_works():
    model = conv_bn_model(fused_bn.BatchNorm2d(4))
    folded = torch.nn.utils.fuse_conv_bn_eval(model[0], model[1])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model[1](model[0](x)), rtol=1e-5, atol=1e-6)


# ---- TorchScript ----------------------------------------------------------------


def test_jit_script_raises_one_clear_error(model):
    _, fused, _ = model
    with pytest.raises(RuntimeError) as error:
        torch.jit.script(fused)
    for alternative in ("fused_bn.revert_model", "torch.export.export", "torch.jit.trace"):
        assert alternative in str(error.value)


def test_jit_script_of_the_reverted_model(model):
    _, fused, x = model
    scripted = torch.jit.script(fused_bn.revert_model(fused))
    assert_same_outputs(scripted, fused, x, rtol=0, atol=0)


def test_jit_trace_in_eval(model):
    _, fused, x = model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        traced = torch.jit.trace(fused, (x,))
    assert_same_outputs(traced, fused, torch.randn(5, *x.shape[1:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_jit_trace_in_training_follows_the_batch_size(momentum):
    model = nn.Sequential(nn.Linear(4, 6), fused_bn.BatchNormReLU1d(6, momentum=momentum))
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.randn(32, 4),), check_trace=False)
    eager.load_state_dict(model.state_dict())  # tracing ran one step
    x = torch.randn(4, 4)
    torch.testing.assert_close(traced(x), eager(x))
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)
    assert model[1].num_batches_tracked == eager[1].num_batches_tracked == 2
    with pytest.raises((RuntimeError, ValueError)):
        eager(torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        traced(torch.randn(1, 4))


# ---- what keeps working -------------------------------------------------------------


@pytest.mark.parametrize("name", [*ALWAYS, "resnet18"])
def test_compile_fullgraph_and_pickle_of_a_converted_model(name):
    _, fused, x = copy.deepcopy(_BUILT.get(name) or build(name))
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    assert_same_outputs(compiled, fused, x, rtol=1e-6, atol=1e-6)
    assert_same_outputs(pickle.loads(pickle.dumps(fused)), fused, x, rtol=0, atol=0)
