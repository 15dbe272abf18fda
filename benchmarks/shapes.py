"""Named shape sets: the BatchNorm inputs of real torchvision models.

``--shapes resnet50`` benchmarks every distinct BatchNorm input shape of a
torchvision resnet50 training step at batch 16 and 112 px. Each entry counts
the layers of that shape whose output goes straight into a ReLU (a
BatchNorm+ReLU layer) and the others (plain BatchNorm: before a residual add,
or before ReLU6 as in mobilenet_v2), so that the benchmark can add its rows up,
weighted by layers, into the BatchNorm time of one step of the model. (The
counts follow the model's graph; ``convert_model`` may fuse fewer pairs.)

The lists are static, so that no model zoo is needed; :func:`derive` recomputes
one with forward hooks where torchvision is installed (the tests compare them):

    python -m benchmarks.shapes resnet50 16 112
"""

import dataclasses
import sys

import torch


@dataclasses.dataclass(frozen=True)
class LayerShape:
    shape: tuple
    relu_layers: int  # BatchNorm layers of this input shape followed by a ReLU
    plain_layers: int  # the others


@dataclasses.dataclass(frozen=True)
class ShapeSet:
    model: str
    batch: int
    size: int  # input height and width, px
    layers: tuple  # LayerShape, in the order the model first runs them

    def describe(self):
        count = sum(s.relu_layers + s.plain_layers for s in self.layers)
        return (f"torchvision {self.model}, batch {self.batch}, {self.size} px: "
                f"{count} BatchNorm layers, {len(self.layers)} distinct shapes")


def _set(model, batch, size, entries):
    return ShapeSet(model, batch, size, tuple(
        LayerShape((batch, *chw), relu, plain) for chw, relu, plain in entries))


# (C, H, W), layers followed by a ReLU, other layers: from derive(model, batch, size).
SHAPE_SETS = {
    "resnet50": _set("resnet50", 16, 112, [
        ((64, 56, 56), 1, 0), ((64, 28, 28), 6, 0), ((256, 28, 28), 0, 4),
        ((128, 28, 28), 1, 0), ((128, 14, 14), 7, 0), ((512, 14, 14), 0, 5),
        ((256, 14, 14), 1, 0), ((256, 7, 7), 11, 0), ((1024, 7, 7), 0, 7),
        ((512, 7, 7), 1, 0), ((512, 4, 4), 5, 0), ((2048, 4, 4), 0, 4),
    ]),
    "resnet50_224": _set("resnet50", 32, 224, [
        ((64, 112, 112), 1, 0), ((64, 56, 56), 6, 0), ((256, 56, 56), 0, 4),
        ((128, 56, 56), 1, 0), ((128, 28, 28), 7, 0), ((512, 28, 28), 0, 5),
        ((256, 28, 28), 1, 0), ((256, 14, 14), 11, 0), ((1024, 14, 14), 0, 7),
        ((512, 14, 14), 1, 0), ((512, 7, 7), 5, 0), ((2048, 7, 7), 0, 4),
    ]),
    "mobilenet_v2": _set("mobilenet_v2", 16, 112, [
        ((32, 56, 56), 0, 2), ((16, 56, 56), 0, 1), ((96, 56, 56), 0, 1),
        ((96, 28, 28), 0, 1), ((24, 28, 28), 0, 2), ((144, 28, 28), 0, 3),
        ((144, 14, 14), 0, 1), ((32, 14, 14), 0, 3), ((192, 14, 14), 0, 5),
        ((192, 7, 7), 0, 1), ((64, 7, 7), 0, 4), ((384, 7, 7), 0, 8),
        ((96, 7, 7), 0, 3), ((576, 7, 7), 0, 5), ((576, 4, 4), 0, 1),
        ((160, 4, 4), 0, 3), ((960, 4, 4), 0, 6), ((320, 4, 4), 0, 1),
        ((1280, 4, 4), 0, 1),
    ]),
    "mobilenet_v2_224": _set("mobilenet_v2", 32, 224, [
        ((32, 112, 112), 0, 2), ((16, 112, 112), 0, 1), ((96, 112, 112), 0, 1),
        ((96, 56, 56), 0, 1), ((24, 56, 56), 0, 2), ((144, 56, 56), 0, 3),
        ((144, 28, 28), 0, 1), ((32, 28, 28), 0, 3), ((192, 28, 28), 0, 5),
        ((192, 14, 14), 0, 1), ((64, 14, 14), 0, 4), ((384, 14, 14), 0, 8),
        ((96, 14, 14), 0, 3), ((576, 14, 14), 0, 5), ((576, 7, 7), 0, 1),
        ((160, 7, 7), 0, 3), ((960, 7, 7), 0, 6), ((320, 7, 7), 0, 1),
        ((1280, 7, 7), 0, 1),
    ]),
}


def layer_counts(shape_set, op):
    """{shape: layers} of the layers in `shape_set` that benchmark op `op` stands for."""
    field = {"bn_relu_fwd_bwd": "relu_layers", "bn_fwd_bwd": "plain_layers"}.get(op)
    if field is None:
        return {}
    return {s.shape: getattr(s, field) for s in shape_set.layers if getattr(s, field)}


def _is_relu(node, model):
    if node.op == "call_module":
        return type(model.get_submodule(node.target)) is torch.nn.ReLU
    return node.target in (torch.relu, torch.relu_, torch.nn.functional.relu, "relu", "relu_")


def derive(model_name, batch, size):
    """The ShapeSet of torchvision `model_name`, from its traced graph and one forward."""
    from torch.fx.passes.shape_prop import ShapeProp

    from .zoo import import_torchvision

    torchvision = import_torchvision()
    if torchvision is None:
        raise RuntimeError("torchvision is not installed")
    traced = torch.fx.symbolic_trace(getattr(torchvision.models, model_name)().eval())
    with torch.no_grad():
        ShapeProp(traced).propagate(torch.zeros(1, 3, size, size))  # the shapes scale with batch
    counts = {}  # (C, H, W) -> [followed by a ReLU, other], in the order of first use
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(
                traced.get_submodule(node.target), torch.nn.modules.batchnorm._BatchNorm):
            continue
        users = list(node.users)
        followed_by_relu = len(users) == 1 and _is_relu(users[0], traced)
        chw = tuple(node.args[0].meta["tensor_meta"].shape[1:])
        counts.setdefault(chw, [0, 0])[0 if followed_by_relu else 1] += 1
    return _set(model_name, batch, size,
                [(chw, relu, plain) for chw, (relu, plain) in counts.items()])


if __name__ == "__main__":
    derived = derive(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(derived.describe())
    for layer in derived.layers:
        print(f"(({', '.join(map(str, layer.shape[1:]))}), {layer.relu_layers}, "
              f"{layer.plain_layers}),")
