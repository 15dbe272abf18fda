"""``revert_model``: back from fused_bn's modules to PyTorch's, the inverse of ``convert_model``.

What each fused module becomes
    * ``nn.BatchNormXd`` (``nn.SyncBatchNorm``) where the model then computes the same: its
      activation is identity, or the activation goes back where ``convert_model`` took it from.
      ``convert_model`` fuses a ReLU *module* by making it an ``nn.Identity``: the Identity
      where the fused module's output leads (as convert_model follows it: through one
      residual add, out of a Sequential, along Identities) becomes the activation module
      again (``nn.ReLU()``; convert_model does not record ``inplace``, so it is False). It
      fuses a *functional* ReLU by giving the container a generated subclass whose forward
      lacks it (``_fused_bn_original_class``): the container gets its own class back, whose
      forward applies the activation, and its fused children become ``nn.BatchNormXd``.
    * :class:`fused_bn.plain.BatchNormAct` otherwise: a hand-built fused module with an
      activation, or one called with a residual, or whose container does not trace with
      torch.fx. It computes ``act(F.batch_norm(x) [+ residual])`` with torch's ops and
      PyTorch's modules only, and keeps the ``state_dict`` keys, which
      ``nn.Sequential(nn.BatchNormXd, act)`` would not.
    * ``fused_bn.Dropout`` becomes ``nn.Dropout``.

Parameters and buffers are the same tensors (taken over, as ``convert_model`` does), so the
``state_dict`` (keys and values), outputs, hooks and train/eval mode stay the same.
"""

import copy
import operator

import torch
from torch import nn

from . import modules as fused
from ._graphs import CallSites, called_module, only_user
from ._swap import has_hooks, swap_modules, take_over
from .activations import call_activation, module_activation
from .dropout import Dropout
from .plain import BatchNormAct
from .sync_batchnorm import SyncBatchNorm

__all__ = ["revert_model"]

# How a residual add before an activation is written (`out += identity` included).
_ADDS = (operator.add, operator.iadd, torch.add)

_TORCH_BATCH_NORM = (
    (fused.BatchNormAct1d, nn.BatchNorm1d),
    (fused.BatchNormAct2d, nn.BatchNorm2d),
    (fused.BatchNormAct3d, nn.BatchNorm3d),
)


def revert_model(model, *, inplace=False):
    """Return ``model`` with PyTorch's modules in place of fused_bn's (see the module doc).

    Args:
        model: an ``nn.Module``, converted by ``fused_bn.convert_model`` or built with
            fused_bn's modules.
        inplace: revert ``model`` itself instead of a deep copy.
    """
    if not inplace:
        model = copy.deepcopy(model)
    _restore_original_classes(model)
    sites = CallSites(model)
    replacements = {}
    for module in model.modules():
        if isinstance(module, fused._BatchNormAct):
            _revert_batch_norm(module, sites, replacements)
        elif isinstance(module, Dropout):
            replacements[id(module)] = nn.Dropout(module.p, module.inplace).train(module.training)
    return swap_modules(model, replacements)


def _restore_original_classes(model):
    """Give back their own class to the modules whose forward convert_model rewrote."""
    for module in model.modules():
        original = type(module).__dict__.get("_fused_bn_original_class")
        if original is not None:
            module.__class__ = original


def _revert_batch_norm(module, sites, replacements):
    activation = module.activation
    calls = sites.calls[id(module)]
    with_residual = any(len(node.args) > 1 or node.kwargs for _, node in calls)
    if activation.name == "identity" and not with_residual:
        replacements[id(module)] = torch_batch_norm(module)
    elif with_residual or not sites.known(module):
        replacements[id(module)] = _plain_batch_norm(module)
    else:
        replacements[id(module)] = _give_activation_back(module, sites, replacements)


def _give_activation_back(module, sites, replacements):
    """``nn.BatchNormXd`` where the activation can go back to where convert_model took it
    from; else a BatchNormAct."""
    site = sites.single_call(module)
    where = None if site is None else _where_the_activation_was(sites, *site, module.activation)
    if where is None:
        return _plain_batch_norm(module)
    if where is not _APPLIED:
        replacements[id(where)] = module.activation.module().train(where.training)
    return torch_batch_norm(module)


# The model's code after the BatchNorm still applies the activation (a restored forward).
_APPLIED = object()


def _where_the_activation_was(sites, container, node, activation):
    """Following the BatchNorm's output as convert_model did (single users, one residual
    add, out of containers whose output it is, along Identities): ``_APPLIED`` when it
    reaches the activation itself, else the ``nn.Identity`` convert_model left in its place
    (the last of a row: timm's drop_block comes before the activation), or None."""
    found, added = None, False
    while True:
        user = only_user(node)
        if user is None:
            return found
        if user.op == "output":
            site = sites.single_call(container)
            if site is None:
                return found
            container, node = site
            continue
        if _computes(container, user, activation):
            return found or _APPLIED
        if not added and found is None and user.op == "call_function" and user.target in _ADDS:
            added, node = True, user
            continue
        identity = called_module(container, user, {nn.Identity})
        if (
            identity is None or user.args != (node,) or user.kwargs
            or not sites.single_call(identity) or has_hooks(identity)
        ):
            return found
        found, node = identity, user


def _computes(container, node, activation):
    if node.op == "call_module":
        return module_activation(container.get_submodule(node.target)) == activation
    return call_activation(node.op, node.target, node.args, node.kwargs) == activation


def torch_batch_norm(module):
    if isinstance(module, SyncBatchNorm):
        new = nn.SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, module.process_group, device="meta",
        )
        return take_over(new, module)
    for fused_class, torch_class in _TORCH_BATCH_NORM:
        if isinstance(module, fused_class):
            new = torch_class(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, device="meta",
            )
            return take_over(new, module)
    raise TypeError(f"revert_model: no PyTorch BatchNorm for {type(module).__name__}")


def _plain_batch_norm(module):
    if isinstance(module, SyncBatchNorm):
        raise ValueError(
            f"revert_model: {type(module).__name__} with {module.activation} (or a residual) "
            "has no PyTorch counterpart that synchronizes its statistics"
        )
    new = BatchNormAct(
        module.num_features, module.eps, module.momentum, module.affine,
        module.track_running_stats, device="meta", act=module.activation.module(),
    )
    return take_over(new, module)
