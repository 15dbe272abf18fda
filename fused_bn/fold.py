"""BatchNorm folded into the Conv/Linear layer before it, for inference.

In eval mode a BatchNorm is a per-channel affine map with fixed coefficients, so
``act(bn(conv(x)) [+ residual])`` equals ``act(conv'(x) [+ residual])`` where ``conv'`` has
the scaled weight and shifted bias (``torch.nn.utils.fuse_conv_bn_weights``).

* :func:`fold_batch_norm` folds every such pair of a model, fused_bn's modules and
  torch's ``nn.BatchNormXd`` alike, keeping the activation (and the residual add).
* :func:`fuse_custom_config` gives ``torch.ao.quantization.fuse_modules`` fuser methods for
  fused_bn's modules: PyTorch's own fused modules where PyTorch has them (``ConvReLU2d``, ...),
  ``nn.Sequential(folded layer, activation)`` otherwise.
"""

import copy

from torch import nn
from torch.ao.quantization.fuser_method_mappings import get_fuser_method
from torch.nn.utils import fuse_conv_bn_weights

from . import modules as fused
from ._graphs import CallSites, called_module
from ._swap import has_hooks, swap_modules
from .plain import ResidualAct
from .revert import torch_batch_norm

__all__ = ["fold_batch_norm", "fuse_custom_config"]

_CONVOLUTIONS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_FUSED_FAMILIES = {
    1: (fused.BatchNorm1d, fused.BatchNormReLU1d, fused.BatchNormAct1d),
    2: (fused.BatchNorm2d, fused.BatchNormReLU2d, fused.BatchNormAct2d),
    3: (fused.BatchNorm3d, fused.BatchNormReLU3d, fused.BatchNormAct3d),
}
_LAYERS = {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear}
_TORCH_BATCH_NORMS = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d}


def fold_batch_norm(model, *, inplace=False):
    """Return ``model`` (in eval mode) with each BatchNorm that directly follows a Conv/Linear
    folded into it; a fused module leaves its activation module (``nn.ReLU()``, ...) or, when
    called with a residual, a :class:`fused_bn.plain.ResidualAct`.

    A pair is folded when the layer is exactly ``nn.Conv1d/2d/3d`` or ``nn.Linear`` and its
    output goes to the BatchNorm only, the BatchNorm has running statistics, each is
    registered and called once, neither has hooks, and the containers trace with torch.fx
    (their children as leaves). ``state_dict`` keys of the folded BatchNorms go away.
    As with ``torch.nn.utils.fuse_linear_bn_eval``, Linear + BatchNorm1d assumes (N, C) input.
    """
    if any(module.training for module in model.modules()):
        raise ValueError("fold_batch_norm is for inference: call model.eval() first")
    if not inplace:
        model = copy.deepcopy(model)
    sites = CallSites(model)
    replacements = {}
    for batch_norm in model.modules():
        found = _layer_before(batch_norm, sites)
        if found is not None:
            layer, with_residual = found
            replacements[id(layer)] = _folded(layer, batch_norm)
            replacements[id(batch_norm)] = _what_remains(batch_norm, with_residual)
    return swap_modules(model, replacements)


def _is_foldable_batch_norm(module):
    return (
        type(module) in _TORCH_BATCH_NORMS or isinstance(module, fused._BatchNormAct)
    ) and module.running_mean is not None and module.running_var is not None


def _layer_before(batch_norm, sites):
    """(layer, called with a residual) for a BatchNorm whose input is a foldable layer's output."""
    if not _is_foldable_batch_norm(batch_norm) or has_hooks(batch_norm):
        return None
    site = sites.single_call(batch_norm)
    if site is None:
        return None
    container, node = site
    producer = node.args[0]
    layer = called_module(container, producer, _LAYERS)
    if layer is None or len(producer.users) != 1 or not sites.single_call(layer):
        return None
    channels = layer.out_features if type(layer) is nn.Linear else layer.out_channels
    if has_hooks(layer) or channels != batch_norm.num_features:
        return None
    return layer, len(node.args) > 1 or bool(node.kwargs)


def _folded(layer, batch_norm):
    folded = copy.deepcopy(layer)
    # A Linear weight (out, in) scales per output row as a convolution weight does.
    folded.weight, folded.bias = fuse_conv_bn_weights(
        layer.weight, layer.bias, batch_norm.running_mean, batch_norm.running_var,
        batch_norm.eps, batch_norm.weight, batch_norm.bias,
    )
    return folded


def _activation_module(batch_norm):
    activation = getattr(batch_norm, "activation", None)
    return nn.Identity() if activation is None else activation.module()


def _what_remains(batch_norm, with_residual):
    act = _activation_module(batch_norm)
    return ResidualAct(act) if with_residual else act


# ---- torch.ao.quantization.fuse_modules --------------------------------------


def fuse_custom_config():
    """``fuse_custom_config_dict`` for ``torch.ao.quantization.fuse_modules``, to fuse
    ``[conv, bn]`` / ``[linear, bn]`` where ``bn`` is a fused_bn module (exact classes)::

        fuse_modules(model.eval(), [["conv1", "bn1"]], fuse_custom_config_dict=fuse_custom_config())
    """
    mapping = {}
    for dim, family in _FUSED_FAMILIES.items():
        for batch_norm_class in family:
            mapping[(_CONVOLUTIONS[dim], batch_norm_class)] = _fuse_layer_batch_norm
            if dim == 1:
                mapping[(nn.Linear, batch_norm_class)] = _fuse_layer_batch_norm
    return {"additional_fuser_method_mapping": mapping}


def _fuse_layer_batch_norm(is_qat, layer, batch_norm):
    """A fuser method: PyTorch's for (layer, nn.BatchNormXd[, nn.ReLU]) on the same tensors."""
    torch_bn = torch_batch_norm(batch_norm)
    act = _activation_module(batch_norm).train(batch_norm.training)
    if type(act) is nn.Identity:
        return get_fuser_method((type(layer), type(torch_bn)))(is_qat, layer, torch_bn)
    if type(act) is nn.ReLU and type(layer) is not nn.Linear:
        fuser = get_fuser_method((type(layer), type(torch_bn), nn.ReLU))
        return fuser(is_qat, layer, torch_bn, act)
    if is_qat:
        raise NotImplementedError(
            f"fused_bn: PyTorch has no quantization-aware fused module for {type(layer).__name__}"
            f" + BatchNorm + {type(act).__name__}"
        )
    return nn.Sequential(_folded(layer, torch_bn), act)
