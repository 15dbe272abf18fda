"""convert_model, part 1: one-level torch.fx graphs of a model's modules, without side effects.

Each module with children is traced with its children as leaves, so a graph
shows the calls one ``forward`` makes. Tracing runs Python code of the model,
so it is fenced in: buffers are proxied (their updates are recorded, not run),
any operation on a real tensor is refused before it runs, and a forward that
changes the module's attributes, grad mode or autocast is rejected (and the
attributes are restored). Such a module is reported as untraceable.
"""

import inspect
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ModelIndex", "Site", "Traced", "original_class", "trace"]

def original_class(module):
    """The class ``module`` had before convert_model rewrote its forward."""
    return getattr(type(module), "_fused_bn_original_class", type(module))


class _TracedForwardError(Exception):
    pass


class _InplaceProxy(fx.Proxy):
    """Records ``a += b`` as ``operator.iadd`` (plain fx records ``a + b``), so a rewritten
    forward keeps the in-place update and the fusion can tell which operand is updated."""


def _record_inplace(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
              "iand", "ior", "ixor", "ilshift", "irshift"):
    setattr(_InplaceProxy, f"__{_name}__", _record_inplace(getattr(operator, _name)))


class _OneLevelTracer(fx.Tracer):
    """Children are leaves; buffers become graph values; grad mode and autocast must not
    change during the trace (fx would drop those context managers from the graph)."""

    proxy_buffer_attributes = True

    def __init__(self):
        super().__init__()
        self._modes = _grad_and_autocast()

    def is_leaf_module(self, module, qualified_name):
        return True

    def proxy(self, node):
        return _InplaceProxy(node, self)

    def create_node(self, *args, **kwargs):
        if _grad_and_autocast() != self._modes:
            raise _TracedForwardError("its forward changes grad mode or autocast")
        return super().create_node(*args, **kwargs)


def _grad_and_autocast():
    return torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled(
        "cuda"
    )


class _NoRealOps(TorchDispatchMode):
    """Refuses every operation on real tensors: a traced forward must only record."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise _TracedForwardError(f"its forward computes on real tensors while traced ({func})")


def _attributes(module):
    # The dicts (_parameters, _buffers, _modules, hooks) by content, the rest by identity.
    return {k: dict(v) if isinstance(v, dict) else v for k, v in vars(module).items()}


def _same(old, new):
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(old[k] is new[k] for k in old)
    return old is new


def _restore(module, snapshot):
    """Put back the attributes a traced forward assigned (it saw proxies, not tensors)."""
    changed = False
    for key in set(vars(module)) - set(snapshot):
        object.__delattr__(module, key)
        changed = True
    for key, value in snapshot.items():
        current = vars(module).get(key)
        if _same(value, current):
            continue
        changed = True
        if isinstance(value, dict) and isinstance(current, dict):
            current.clear()
            current.update(value)
        else:
            object.__setattr__(module, key, value)
    return changed


def _trace_once(module):
    snapshot = _attributes(module)
    try:
        with _NoRealOps():
            graph = _OneLevelTracer().trace(module)
    finally:
        changed = _restore(module, snapshot)
    if changed:
        raise _TracedForwardError("its forward changes the module's attributes")
    return graph


def _signature_reason(cls):
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    if any(p.default is not p.empty or p.kind != p.POSITIONAL_OR_KEYWORD for p in parameters):
        return "its forward takes optional or variadic arguments"
    return None


def trace(module, *, original=False):
    """The one-level fx graph of ``module``'s forward, or the reason there is none.

    ``original``: trace the forward of the class convert_model started from (a
    rewritten forward's plan is replayed on that graph).
    """
    if "forward" in vars(module):
        return None, "its forward is set on the instance"
    cls = original_class(module) if original else type(module)
    reason = _signature_reason(cls)
    if reason:
        return None, reason
    current_class, was_training = module.__class__, module.training
    codes = []
    try:
        module.__class__ = cls
        for mode in (True, False):
            module.training = mode
            graph = _trace_once(module)
            codes.append(graph.python_code("self").src)
    except _TracedForwardError as error:
        return None, str(error)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        return None, f"it does not trace with torch.fx ({type(error).__name__}: {error})"
    finally:
        module.__class__, module.training = current_class, was_training
    if codes[0] != codes[1]:
        return None, "its forward depends on train/eval mode"
    return graph, None


# ---- the model's index ---------------------------------------------------------


@dataclass(eq=False)
class Traced:
    """One traced module: its qualified name and one-level graph."""

    module: nn.Module
    name: str
    graph: fx.Graph

    def __str__(self):
        return self.name or "the model"

    def submodule(self, node):
        return self.module.get_submodule(node.target)


@dataclass(frozen=True, eq=False)
class Site:
    """A node of a traced graph: a value or a call in one module's forward."""

    traced: Traced
    node: fx.Node

    def module(self):
        """The module this node calls, if it is a call_module node."""
        return self.traced.submodule(self.node) if self.node.op == "call_module" else None


def _callable(module):
    return type(module).forward is not nn.Module.forward


class ModelIndex:
    """Who registers and who calls each module of a model, from the one-level graphs."""

    def __init__(self, model, is_leaf):
        self.model = model
        self.names = {}
        self.registrations = Counter()
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
            self.registrations[id(module)] += 1
        self.parents = defaultdict(list)
        for module in model.modules():
            for child in module._modules.values():  # a child registered twice counts twice
                if child is not None:
                    self.parents[id(child)].append(module)
        self.traced, self.untraced = {}, {}
        self.call_sites = defaultdict(list)
        for module in model.modules():
            if is_leaf(module) or not _callable(module) or next(module.children(), None) is None:
                continue
            graph, reason = trace(module)
            if graph is None:
                self.untraced[id(module)] = reason
                continue
            traced = Traced(module, self.names[id(module)], graph)
            self.traced[id(module)] = traced
            for node in graph.nodes:
                if node.op == "call_module":
                    self.call_sites[id(traced.submodule(node))].append(Site(traced, node))

    def name(self, module):
        return self.names[id(module)] or "the model"

    def callers(self, module):
        """The modules whose forward may call ``module``: its parents, looking through
        containers that have no forward (ModuleList, ModuleDict)."""
        found = []
        for parent in self.parents[id(module)]:
            found += [parent] if _callable(parent) else self.callers(parent)
        return found

    def unique_call(self, module):
        """``(Site, None)`` of the one call of ``module`` in the model, or ``(None, why not)``."""
        if self.registrations[id(module)] > 1:
            return None, f"registered {self.registrations[id(module)]} times in the model"
        for caller in self.callers(module):
            if id(caller) in self.untraced:
                return None, f"called by {self.name(caller)}, which could not be traced"
        sites = self.call_sites[id(module)]
        if len(sites) != 1:
            return None, f"called {len(sites)} times" if sites else "never called by its parent"
        return sites[0], None
