"""Swapping one module of a model for another while keeping its state and hooks.

Shared by convert_model, revert_model and fold_batch_norm: the new module takes over the
old one's Parameter and buffer objects (so optimizers, sharing and ``state_dict`` keys
still hold), its hooks and its train/eval mode, and is put wherever the old one is
registered.
"""

from torch import nn

__all__ = ["has_hooks", "swap_modules", "take_over"]

_CALL_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOK_DICTS = tuple(f"_global{name}" for name in _CALL_HOOK_DICTS)
_STATE_HOOK_DICTS = _CALL_HOOK_DICTS + (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def has_hooks(module):
    """Whether calling ``module`` runs hooks (its own or global module hooks): fusing it
    away would skip them."""
    owner = nn.modules.module
    return any(getattr(module, hooks, None) for hooks in _CALL_HOOK_DICTS) or any(
        getattr(owner, hooks, None) for hooks in _GLOBAL_HOOK_DICTS
    )


def take_over(new, old):
    """Give ``new`` the state of ``old``: the same Parameter and buffer objects, mode, hooks."""
    new._parameters = old._parameters
    new._buffers = old._buffers
    new._non_persistent_buffers_set = old._non_persistent_buffers_set
    for hooks in _STATE_HOOK_DICTS:
        if hasattr(old, hooks):
            setattr(new, hooks, getattr(old, hooks))
    return new.train(old.training)


def swap_modules(model, replacements):
    """Put ``replacements[id(old)]`` wherever ``old`` is registered; returns the new root."""
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a child registered twice in one parent.
        for name, child in list(parent._modules.items()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    return replacements.get(id(model), model)
