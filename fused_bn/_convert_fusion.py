"""convert_model, part 2: where each BatchNorm's output goes, and what can be fused into it.

From the BN's call, the walk follows its output through the one-level graphs
(see _convert_trace): out of a module through its ``return`` into the one call
of that module, into a child module's forward through its argument, through
``nn.Identity`` calls, and at most one residual add, until it meets an
activation (fused) or anything else (the walk stops, with the reason). Every
value on the way must have exactly one user: the BN's output must not be seen
by anything that the fusion would change.
"""

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._convert_trace import Site
from ._swap import has_hooks
from .activations import Activation, call_activation, module_activation

__all__ = ["Chain", "describe", "describe_value", "qualified", "resolve_shared_adds", "walk"]

_ADD_FUNCTIONS = {operator.add: False, operator.iadd: True, torch.add: False}
_ADD_METHODS = {"add": False, "add_": True}
# Activations fused_bn does not fuse, named in the report as such.
_OTHER_ACTIVATIONS = {
    "gelu", "mish", "sigmoid", "tanh", "hardsigmoid", "selu", "celu", "softplus", "prelu",
    "rrelu", "glu", "logsigmoid", "softsign", "threshold",
}


@dataclass(eq=False)
class Chain:
    """Where one BatchNorm's output goes: what is fused into it, or why not.

    ``path``: the module boundaries crossed, in order, as ("up", call Site) when the
    value leaves a module through its return (the Site is that module's call) or
    ("down", call Site) when it enters a child module as an argument.
    """

    batch_norm: nn.Module
    name: str
    start: Site  # the BatchNorm's call
    path: list = field(default_factory=list)
    add: Optional[Site] = None  # the residual add fused into the BN
    operand: int = 0  # which operand of the add the BN's value is
    inlines: tuple = ()  # the "up" crossings before the add: those modules get inlined
    activation: Optional[Activation] = None
    act_site: Optional[Site] = None
    stop: str = ""  # why the walk ended short of a fusable activation

    def cancel(self, reason):
        self.add, self.inlines, self.activation, self.act_site = None, (), None, None
        self.stop = reason

    @property
    def fused(self):
        return self.add is not None or self.activation is not None


# ---- descriptions -----------------------------------------------------------------


def qualified(traced, target):
    return f"{traced.name}.{target}" if traced.name else target


def _function_name(function):
    name = getattr(function, "__name__", repr(function))
    module = getattr(function, "__module__", None) or ""
    if module == "torch.nn.functional":
        return f"F.{name}"
    if module.startswith("torch") or getattr(torch, name, None) is function:
        return f"torch.{name}"
    return f"operator.{name}" if module == "_operator" else name


def describe(site):
    """How the report names one call: the module called or the function and where."""
    node = site.node
    if node.op == "call_module":
        return f"{qualified(site.traced, node.target)} ({type(site.module()).__name__})"
    if node.op == "call_function":
        return f"{_function_name(node.target)}() in {site.traced}.forward"
    if node.op == "call_method":
        return f".{node.target}() in {site.traced}.forward"
    return f"{node.op} {node.name} in {site.traced}.forward"


def describe_value(site):
    """How the report names a value: a module's input, a module's output, or a variable."""
    node = site.node
    if node.op == "placeholder":
        return f"the input {node.target!r} of {site.traced}"
    if node.op == "call_module":
        return f"the output of {qualified(site.traced, node.target)}"
    return f"{node.name} in {site.traced}.forward"


def _is_other_activation(site):
    node = site.node
    if node.op == "call_module":
        cls = type(site.module())
        return cls.__module__ == "torch.nn.modules.activation" or cls.__module__.endswith(
            ".activations"
        )
    if node.op == "call_method":
        return node.target.rstrip("_") in _OTHER_ACTIVATIONS
    name = getattr(node.target, "__name__", "").rstrip("_")
    return name in _OTHER_ACTIVATIONS and node.target in (
        getattr(F, name, None), getattr(torch, name, None)
    )


# ---- the walk -----------------------------------------------------------------


def _consumer(index, chain, value):
    """``(value, user)``: the one node using ``value``'s output, following it out of modules
    through their return (``value`` then is the module's call); ``(value, None, why)``
    where there is not exactly one."""
    while True:
        users = list(value.node.users)
        if len(users) != 1:
            if not users:
                return value, None, "its output is not used"
            used_by = ", ".join(describe(Site(value.traced, u)) for u in users)
            return value, None, f"its output is used {len(users)} times ({used_by})"
        user = users[0]
        if user.op != "output":
            return value, Site(value.traced, user), None
        module = value.traced.module
        if user.args[0] is not value.node:
            return value, None, f"{value.traced} returns it inside a container"
        if module is index.model:
            return value, None, "it is the model's output"
        call, reason = index.unique_call(module)
        if call is None:
            return value, None, f"{value.traced} returns it, and is {reason}"
        if has_hooks(module):
            return value, None, f"{value.traced} returns it, and has hooks"
        chain.path.append(("up", call))
        value = call


def _single_argument(site, value_node):
    return site.node.args == (value_node,) and not site.node.kwargs


def _activation(site, value_node):
    node = site.node
    if node.op == "call_module":
        return module_activation(site.module()) if _single_argument(site, value_node) else None
    if node.op in ("call_function", "call_method") and node.args[:1] == (value_node,):
        return call_activation(node.op, node.target, node.args, node.kwargs)
    return None


def _entered(index, site, value_node):
    """The placeholder of a traced child module that ``value_node`` is passed to, if the
    child is called only here and takes its arguments positionally."""
    child = index.traced.get(id(site.module()))
    if child is None or site.node.kwargs or list(site.node.args).count(value_node) != 1:
        return None
    call, _ = index.unique_call(child.module)
    if call is None or call.node is not site.node:
        return None
    placeholders = [n for n in child.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(site.node.args):
        return None
    return Site(child, placeholders[site.node.args.index(value_node)])


def _add_operands(node):
    """``(operands, in_place)`` of a Tensor add with ``alpha`` 1, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        in_place = _ADD_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        in_place = _ADD_METHODS[node.target]
    else:
        return None
    if len(node.args) != 2 or node.kwargs not in ({}, {"alpha": 1}):
        return None
    return node.args, in_place


def walk(index, chain):
    """Follow ``chain.start``'s output to what can be fused into the BatchNorm."""
    value = chain.start
    while True:
        value, site, reason = _consumer(index, chain, value)
        if site is None:
            chain.stop = reason
            return
        module = site.module()
        if module is not None and has_hooks(module):
            chain.stop = f"followed by {describe(site)}, which has hooks"
            return
        if type(module) is nn.Identity and _single_argument(site, value.node):
            value = site
            continue
        activation = _activation(site, value.node)
        if activation is not None:
            chain.activation, chain.act_site = activation, site
            return
        entered = _entered(index, site, value.node) if module is not None else None
        if entered is not None:
            chain.path.append(("down", site))
            value = entered
            continue
        operands = _add_operands(site.node)
        if operands is not None and value.node in operands[0]:
            reason = _residual_reason(index, chain, site, value, operands)
            if reason:
                chain.stop = reason
                return
            chain.add, chain.operand = site, operands[0].index(value.node)
            chain.inlines = tuple(call for _, call in chain.path)
            value = site
            continue
        chain.stop = f"followed by {describe(site)}" + (
            ", an activation fused_bn does not fuse" if _is_other_activation(site) else "")
        return


def _residual_reason(index, chain, site, value, operands):
    """Why the add at ``site`` cannot become the BN's residual (None when it can)."""
    (left, right), in_place = operands
    add = describe(site)
    if chain.add is not None:
        return f"followed by a second add, {add}"
    if any(direction == "down" for direction, _ in chain.path):
        return f"followed by {add}, inside a module its output was passed to"
    if left is right:
        return f"followed by {add}, adding it to itself"
    other = left if right is value.node else right
    if in_place and right is value.node:
        target = describe_value(Site(site.traced, other))
        return f"followed by {add}, which adds it in place to {target}"
    if not isinstance(other, fx.Node) or other.op == "get_attr":
        return f"followed by {add}, adding a constant or an attribute"
    bn_call = chain.start.node
    if len(bn_call.args) != 1 or bn_call.kwargs:
        return f"followed by {add}, but the BatchNorm is called with more than its input"
    for _, call in chain.path:
        reason = _inline_reason(index, call)
        if reason:
            return f"followed by {add}; {reason}"
    return _order_reason(chain, site, other, add)


def _inline_reason(index, call):
    """Why the module ``call`` calls cannot be inlined into its caller (None if it can)."""
    child = index.traced[id(call.module())]
    placeholders = [n for n in child.graph.nodes if n.op == "placeholder"]
    if call.node.kwargs or len(call.node.args) != len(placeholders):
        return f"{child} would have to be inlined, and is called with keyword arguments"
    if hasattr(child.module, "_fused_bn_rewrite"):
        return f"{child} would have to be inlined, and its forward was already rewritten"
    return None


def _order_reason(chain, site, other, add):
    """The fused BN call reads the input and the other operand where both are known: it
    moves down to the add, or stays where it is; either way nothing in between may
    touch what it reads (None when it is safe)."""
    graph_nodes = list(site.node.graph.nodes)
    position = {node: i for i, node in enumerate(graph_nodes)}
    bn_here = chain.path[-1][1].node if chain.path else chain.start.node
    if position[other] > position[bn_here]:  # the BN call moves down to the add
        if len(chain.start.node.args[0].users) != 1:
            return (f"followed by {add}, whose other operand is computed after the BatchNorm, "
                    "and the BatchNorm's input is used elsewhere")
        return None
    between = [u for u in other.users if position[bn_here] < position.get(u, -1) < position[
        site.node]]
    if between:
        return f"followed by {add}, whose other operand is used in between"
    return None


def resolve_shared_adds(chains):
    """Two BatchNorms added together (``bn3(x) + downsample(x)``): one takes the add, the
    one called in the add's own forward (fewest modules to inline), else the left operand."""
    by_add = {}
    for chain in chains:
        if chain.add is not None:
            by_add.setdefault(chain.add.node, []).append(chain)
    for contenders in by_add.values():
        contenders.sort(key=lambda c: (len(c.inlines), c.operand))
        winner = contenders[0]
        for loser in contenders[1:]:
            loser.cancel(f"added to the output of {winner.name}, which takes the add")
