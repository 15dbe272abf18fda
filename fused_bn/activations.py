"""The activations fused_bn fuses after BatchNorm, and the PyTorch modules they stand for.

An :class:`Activation` is a name and its parameters, as the ops take them
(``activation``, ``activation_params``; see csrc/ops.cpp). Each one computes
exactly what its PyTorch module computes, in value and gradient
(include/fused_bn/activation.h).
"""

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS", "Activation", "activation_of", "call_activation", "module_activation",
]


@dataclasses.dataclass(frozen=True)
class _Kind:
    module: type  # the PyTorch module
    function: object  # its torch.nn.functional form (composite paths)
    params: tuple = ()  # names of the module's parameters the activation takes
    defaults: tuple = ()


_KINDS = {
    "identity": _Kind(nn.Identity, lambda x: x),
    "relu": _Kind(nn.ReLU, F.relu),
    "relu6": _Kind(nn.ReLU6, F.relu6),
    "hardtanh": _Kind(nn.Hardtanh, F.hardtanh, ("min_val", "max_val"), (-1.0, 1.0)),
    "leaky_relu": _Kind(nn.LeakyReLU, F.leaky_relu, ("negative_slope",), (0.01,)),
    "silu": _Kind(nn.SiLU, F.silu),
    "hardswish": _Kind(nn.Hardswish, F.hardswish),
    "elu": _Kind(nn.ELU, F.elu, ("alpha",), (1.0,)),
}
ACTIVATIONS = tuple(_KINDS)


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation by name, with its parameters in the order of its module's arguments
    (``hardtanh``: min_val, max_val; ``leaky_relu``: negative_slope; ``elu``: alpha)."""

    name: str = "identity"
    params: tuple = ()

    def __post_init__(self):
        kind = _KINDS.get(self.name)
        if kind is None:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.name!r}")
        params = tuple(float(p) for p in self.params)
        if len(params) != len(kind.params):
            raise ValueError(
                f"activation {self.name!r} takes the parameters {kind.params}, got {self.params}"
            )
        if not all(math.isfinite(p) for p in params):
            raise ValueError(f"activation parameters must be finite, got {self.params}")
        if self.name == "hardtanh" and not params[1] > params[0]:
            raise ValueError("max_val must be greater than min_val")  # nn.Hardtanh's check
        object.__setattr__(self, "params", params)

    @classmethod
    def of(cls, name, **params):
        """``Activation(name, ...)`` from keyword parameters, defaults filled in."""
        kind = _KINDS.get(name)
        if kind is None:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
        unknown = set(params) - set(kind.params)
        if unknown:
            raise TypeError(f"activation {name!r} has no parameter(s) {sorted(unknown)}")
        values = dict(zip(kind.params, kind.defaults))
        values.update(params)
        return cls(name, tuple(values[p] for p in kind.params))

    def module(self):
        """A new PyTorch module computing this activation."""
        kind = _KINDS[self.name]
        return kind.module(**dict(zip(kind.params, self.params)))

    def function(self, input):
        """This activation applied with ``torch.nn.functional``."""
        kind = _KINDS[self.name]
        return kind.function(input, *self.params)

    def __str__(self):
        names = _KINDS[self.name].params
        args = ", ".join(f"{n}={v}" for n, v in zip(names, self.params))
        return f"{self.name}({args})" if args else self.name


def _from_module(module):
    for name, kind in _KINDS.items():
        if type(module) is kind.module:
            return Activation(name, tuple(getattr(module, p) for p in kind.params))
    return None


def activation_of(activation, **params):
    """The :class:`Activation` for an ``activation`` argument: a name (with keyword
    parameters), an :class:`Activation`, or a PyTorch activation module instance
    (``nn.ReLU()``, ``nn.LeakyReLU(0.2)``, ...; exact types only, since a subclass may
    compute something else)."""
    if isinstance(activation, Activation):
        if params:
            raise TypeError("parameters go into the Activation itself")
        return activation
    if isinstance(activation, str):
        return Activation.of(activation, **params)
    if isinstance(activation, nn.Module):
        if params:
            raise TypeError("parameters of a module activation come from the module")
        found = _from_module(activation)
        if found is None:
            raise ValueError(
                f"{type(activation).__name__} cannot be fused; supported modules: "
                + ", ".join(k.module.__name__ for k in _KINDS.values())
            )
        return found
    raise TypeError(f"activation must be a name, an Activation or a module, got {activation!r}")


def module_activation(module):
    """The :class:`Activation` a PyTorch module instance computes, or None when it is not
    one fused_bn can fuse (exact types only)."""
    return _from_module(module)


# The functions and Tensor methods that compute an activation (as torch.fx records them in
# call_function / call_method nodes): the activation's name and the names of the arguments
# that follow the input, in the function's order.
_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),  # also F.relu_
    F.relu6: ("relu6", ("inplace",)),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace")),
    F.hardtanh_: ("hardtanh", ("min_val", "max_val")),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.silu: ("silu", ("inplace",)),
    F.hardswish: ("hardswish", ("inplace",)),
    F.elu: ("elu", ("alpha", "inplace")),
    F.elu_: ("elu", ("alpha",)),
}
_METHODS = {"relu": ("relu", ()), "relu_": ("relu", ())}


def call_activation(op, target, args, kwargs):
    """The :class:`Activation` a call computes from its first argument: ``op`` is
    ``"call_function"`` (``target`` the function) or ``"call_method"`` (``target`` the
    Tensor method's name), ``args``/``kwargs`` as called. None when the call is not one
    fused_bn fuses, or its parameters are not plain numbers (e.g. computed in the graph)."""
    table = _FUNCTIONS if op == "call_function" else _METHODS if op == "call_method" else {}
    try:
        name, argument_names = table.get(target, (None, ()))
    except TypeError:  # an unhashable target
        return None
    if name is None or not args or len(args) - 1 > len(argument_names):
        return None
    values = dict(zip(argument_names, args[1:]))
    if set(kwargs) - set(argument_names) or set(kwargs) & set(values):
        return None
    values.update(kwargs)
    inplace = values.pop("inplace", False)
    if not isinstance(inplace, bool):
        return None
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values.values()):
        return None
    try:
        return Activation.of(name, **values)
    except ValueError:  # e.g. hardtanh with max_val <= min_val: the call itself fails
        return None
