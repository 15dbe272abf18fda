"""``revert_model``: back from fused_bn's modules to PyTorch's, the inverse of ``convert_model``.

What each fused module becomes
    * ``nn.BatchNormXd`` (``nn.SyncBatchNorm``) where the model then computes the same: its
      activation is identity, or the activation goes back where ``convert_model`` took it from.
      ``convert_model`` fuses a ReLU *module* by making it an ``nn.Identity``: an Identity
      that is the only user of a fused module's output becomes the activation module again
      (``nn.ReLU()``; convert_model does not record ``inplace``, so it is False). It fuses a
      *functional* ReLU by giving the container a generated subclass whose forward lacks it
      (``_fused_bn_original_class``): the container gets its own class back, whose forward
      applies the activation, and its fused children become ``nn.BatchNormXd``.
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

from torch import nn

from . import modules as fused
from ._graphs import CallSites, called_module, has_hooks, only_user, swap_modules, take_over
from .dropout import Dropout
from .plain import BatchNormAct
from .sync_batchnorm import SyncBatchNorm

__all__ = ["revert_model"]

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
    restored = _restore_original_classes(model)
    sites = CallSites(model)
    replacements = {}
    for module in model.modules():
        if isinstance(module, fused._BatchNormAct):
            _revert_batch_norm(module, sites, restored, replacements)
        elif isinstance(module, Dropout):
            replacements[id(module)] = nn.Dropout(module.p, module.inplace).train(module.training)
    return swap_modules(model, replacements)


def _restore_original_classes(model):
    """Give back their own class to the modules whose forward convert_model rewrote."""
    restored = set()
    for module in model.modules():
        original = type(module).__dict__.get("_fused_bn_original_class")
        if original is not None:
            module.__class__ = original
            restored.add(id(module))
    return restored


def _revert_batch_norm(module, sites, restored, replacements):
    activation = module.activation
    calls = sites.calls[id(module)]
    with_residual = any(len(node.args) > 1 or node.kwargs for _, node in calls)
    if activation.name == "identity" and not with_residual:
        replacements[id(module)] = torch_batch_norm(module)
    elif with_residual or not sites.known(module):
        replacements[id(module)] = _plain_batch_norm(module)
    else:
        replacements[id(module)] = _give_activation_back(module, sites, restored, replacements)


def _give_activation_back(module, sites, restored, replacements):
    """``nn.BatchNormXd`` where the activation can go back to where convert_model took it
    from; else a BatchNormAct."""
    site = sites.single_call(module)
    if site is None:
        return _plain_batch_norm(module)
    container, node = site
    user = only_user(node)
    identity = called_module(container, user, {nn.Identity})
    if (
        identity is not None and user.args == (node,) and sites.single_call(identity)
        and not has_hooks(identity)
    ):
        replacements[id(identity)] = module.activation.module().train(identity.training)
        return torch_batch_norm(module)
    if id(container) in restored:
        return torch_batch_norm(module)  # the container's own forward applies the activation
    return _plain_batch_norm(module)


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
