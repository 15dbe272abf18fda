"""``convert_model``: put fused_bn modules into an existing model in one call.

Every ``nn.BatchNorm1d/2d/3d`` that is immediately followed by a ReLU becomes a
``BatchNormReLUXd``, every other one a ``fused_bn.BatchNormXd``, and (optionally)
every ``nn.Dropout`` a ``fused_bn.Dropout``.

How BN -> ReLU pairs are found
    Each module that has children is traced with ``torch.fx`` one level deep (its
    children are leaves), so a pair is found where one ``forward`` calls the BN
    child and applies a ReLU to its output: ``self.relu(self.bn(x))``,
    ``F.relu(self.bn(x))``, ``torch.relu(...)``, ``.relu()``, and adjacent
    ``nn.Sequential`` children. A pair is fused only when the graph allows it: the
    BN output has no other user, nothing runs in between (e.g. a residual add),
    the BN and ReLU modules are each called once and registered once, and neither
    has hooks. A module that does not trace (data-dependent control flow), whose
    forward takes optional arguments, or whose trace differs between train and
    eval mode is not fused: its layers are replaced one for one, with a warning.

How the model is rewritten (why it stays a drop-in)
    The model keeps its classes, attributes and ``state_dict`` keys: modules are
    swapped in place, the new BN modules take over the old ``Parameter`` objects
    and buffers (so an optimizer built on an ``inplace=True`` model still works),
    and a fused ``nn.ReLU`` child becomes ``nn.Identity`` (stateless, so indices of
    an ``nn.Sequential`` and all keys stay the same). Only where a *functional*
    ReLU was fused does a module's ``forward`` change: that one module gets a
    subclass of its own class whose ``forward`` is the traced graph without the
    ReLU (``isinstance`` still holds; pickling and ``copy.deepcopy`` re-derive it).
    Returning a ``torch.fx.GraphModule`` instead would change the model's class and
    drop its methods and attributes.
"""

import copy
import inspect
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import modules as fused
from .dropout import Dropout as FusedDropout

__all__ = ["ConversionReport", "convert_model"]

# Exact types only: a user subclass of nn.BatchNorm2d may have its own forward.
_BATCH_NORM = {
    nn.BatchNorm1d: (fused.BatchNorm1d, fused.BatchNormReLU1d),
    nn.BatchNorm2d: (fused.BatchNorm2d, fused.BatchNormReLU2d),
    nn.BatchNorm3d: (fused.BatchNorm3d, fused.BatchNormReLU3d),
}
_FUSED_BATCH_NORM_RELU = tuple(fused_relu for _, fused_relu in _BATCH_NORM.values())
_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclass
class Replacement:
    name: str  # qualified name in the model ("" for the model itself)
    old_type: str
    new_type: str


@dataclass
class ConversionReport:
    """What ``convert_model`` did.

    ``replaced``: one ``Replacement`` per module swapped (BN, fused-away ReLU, Dropout).
    ``fused``: ``(batch_norm_name, relu)`` pairs, ``relu`` being the ReLU module's
    name or a description of the functional call. ``warnings``: modules where
    nothing could be fused, and why (also issued with ``warnings.warn``).
    """

    replaced: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def __str__(self):
        lines = [f"{len(self.replaced)} modules replaced, {len(self.fused)} BN->ReLU pairs fused"]
        lines += [f"  {r.name or '<model>'}: {r.old_type} -> {r.new_type}" for r in self.replaced]
        lines += [f"  fused {bn} + {relu}" for bn, relu in self.fused]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def convert_model(model, *, inplace=False, dropout=True, return_report=False):
    """Return ``model`` with fused_bn modules in place of PyTorch's.

    Args:
        model: any ``nn.Module`` (a ``torch.jit.ScriptModule`` is not supported).
        inplace: convert ``model`` itself instead of a deep copy.
        dropout: also replace every ``nn.Dropout`` by ``fused_bn.Dropout`` (exactly
            that class: ``AlphaDropout``, ``Dropout1d/2d/3d`` and subclasses differ).
        return_report: return ``(model, ConversionReport)`` instead of the model.

    Parameters, buffers, train/eval mode, device, dtype and ``requires_grad``
    carry over; ``state_dict`` keys are unchanged. Modules that already are
    fused_bn modules, ``SyncBatchNorm`` and subclasses of ``nn.BatchNormXd`` are
    left alone.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert_model does not support TorchScript modules")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    graphs = _trace_containers(model, report)
    relus_to_drop = _find_fusions(model, graphs, report)
    replacements = _new_modules(model, relus_to_drop, report, dropout)
    model = _swap_modules(model, replacements)
    containers = {id(c): c for c, node in relus_to_drop.values() if node.op != "call_module"}
    for container in containers.values():
        _install_forward_without_redundant_relus(container)
    return (model, report) if return_report else model


# ---- tracing ----------------------------------------------------------------


class _OneLevelTracer(fx.Tracer):
    """Records calls to submodules instead of tracing into them."""

    def is_leaf_module(self, module, qualified_name):
        return True


def _trace(module):
    """The one-level fx graph of ``module``'s forward, or the reason there is none."""
    if "forward" in vars(module):
        return None, "its forward is set on the instance"
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.default is not p.empty or p.kind != p.POSITIONAL_OR_KEYWORD for p in parameters):
        return None, "its forward takes optional or variadic arguments"
    was_training = module.training
    try:
        codes = []
        for mode in (True, False):
            module.training = mode
            graph = _OneLevelTracer().trace(module)
            codes.append(graph.python_code("self").src)
    except Exception as error:  # fx raises many kinds of errors on untraceable code
        return None, f"it does not trace with torch.fx ({type(error).__name__}: {error})"
    finally:
        module.training = was_training
    if codes[0] != codes[1]:
        return None, "its forward depends on train/eval mode"
    return graph, None


def _trace_containers(model, report):
    """fx graphs of all modules with children; a warning where BN goes unfused."""
    graphs = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            continue
        graph, reason = _trace(module)
        if graph is not None:
            graphs[name] = (module, graph)
        elif any(type(child) in _BATCH_NORM for child in module.children()):
            message = (
                f"convert_model: {name or 'the model'} ({type(module).__name__}) was not fused "
                f"because {reason}; its BatchNorm layers are replaced one for one"
            )
            report.warnings.append(message)
            warnings.warn(message, stacklevel=3)
    return graphs


# ---- finding BN -> ReLU pairs -----------------------------------------------


def _is_relu(node, container):
    if node.op == "call_module":
        return type(container.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _has_hooks(module):
    return any(getattr(module, hooks, None) for hooks in _HOOK_DICTS)


def _find_fusions(model, graphs, report):
    """Map id(BN module) -> (container, ReLU node) for every BN that may be fused."""
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    call_sites = Counter(
        id(container.get_submodule(node.target))
        for container, graph in graphs.values()
        for node in graph.nodes
        if node.op == "call_module"
    )

    def called_once(module):
        return registrations[id(module)] == 1 and call_sites[id(module)] == 1

    fusions = {}
    for container_name, (container, graph) in graphs.items():
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            batch_norm = container.get_submodule(node.target)
            if type(batch_norm) not in _BATCH_NORM or len(node.users) != 1:
                continue
            (relu,) = node.users
            if not _is_relu(relu, container) or relu.args[:1] != (node,) or len(relu.args) > 2:
                continue
            relu_module = container.get_submodule(relu.target) if relu.op == "call_module" else None
            if not called_once(batch_norm) or _has_hooks(batch_norm):
                continue
            if relu_module is not None and (
                not called_once(relu_module) or _has_hooks(relu_module)
            ):
                continue
            fusions[id(batch_norm)] = (container, relu)
            prefix = f"{container_name}." if container_name else ""
            relu_name = (
                prefix + relu.target
                if relu_module is not None
                else f"{relu.target if relu.op == 'call_method' else relu.target.__name__}() "
                f"in {container_name or 'the model'}.forward"
            )
            report.fused.append((prefix + node.target, relu_name))
    return fusions


# ---- building and swapping modules ------------------------------------------


def _take_over(new, old):
    """Give ``new`` the state of ``old``: the same Parameter and buffer objects, mode, hooks."""
    new._parameters = old._parameters
    new._buffers = old._buffers
    new._non_persistent_buffers_set = old._non_persistent_buffers_set
    for hooks in _HOOK_DICTS:
        if hasattr(old, hooks):
            setattr(new, hooks, getattr(old, hooks))
    new.train(old.training)
    return new


def _fused_batch_norm(old, with_relu):
    plain, relu = _BATCH_NORM[type(old)]
    new = (relu if with_relu else plain)(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device="meta",  # placeholders only: the old tensors are taken over
    )
    return _take_over(new, old)


def _fused_dropout(old):
    return _take_over(FusedDropout(p=old.p, inplace=old.inplace), old)


def _new_modules(model, fusions, report, dropout):
    """Map id(old module) -> replacement, recording each in the report."""
    relu_modules = {
        id(container.get_submodule(relu.target))
        for container, relu in fusions.values()
        if relu.op == "call_module"
    }
    replacements = {}
    for name, module in model.named_modules():
        if type(module) in _BATCH_NORM:
            new = _fused_batch_norm(module, with_relu=id(module) in fusions)
        elif id(module) in relu_modules:
            new = nn.Identity().train(module.training)
        elif dropout and type(module) is nn.Dropout:
            new = _fused_dropout(module)
        else:
            continue
        replacements[id(module)] = new
        report.replaced.append(Replacement(name, type(module).__name__, type(new).__name__))
    return replacements


def _swap_modules(model, replacements):
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a child registered twice in one parent.
        for name, child in list(parent._modules.items()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])
    return replacements.get(id(model), model)


# ---- rewriting forward where a functional ReLU was fused ---------------------


def _drop_relus_after_fused_batch_norm(module, graph):
    """Erase ReLU calls whose only input is a BatchNormReLU output used nowhere else.

    relu(relu(x)) == relu(x) in value and gradient, so erasing them is always exact.
    """
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.users) != 1:
            continue
        if not isinstance(module.get_submodule(node.target), _FUSED_BATCH_NORM_RELU):
            continue
        (relu,) = node.users
        if relu.op != "call_module" and _is_relu(relu, module) and relu.args[:1] == (node,):
            relu.replace_all_uses_with(node)
            graph.erase_node(relu)


# (original class, forward source) -> generated subclass, so that copies share one class.
_REWRITTEN_CLASSES = {}


def _install_forward_without_redundant_relus(module):
    graph, _ = _trace(module)
    _drop_relus_after_fused_batch_norm(module, graph)
    code = graph.python_code("self")
    original = getattr(module, "_fused_bn_original_class", type(module))
    key = (original, code.src)
    if key not in _REWRITTEN_CLASSES:
        namespace = dict(code.globals)
        exec(compile(code.src, f"<fused_bn forward of {original.__qualname__}>", "exec"), namespace)
        _REWRITTEN_CLASSES[key] = type(
            original.__name__,
            (original,),
            {
                "forward": namespace["forward"],
                "_fused_bn_original_class": original,
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
                "__reduce_ex__": _reduce_rewritten_module,
            },
        )
    module.__class__ = _REWRITTEN_CLASSES[key]


def _reduce_rewritten_module(module, protocol):
    # The generated class cannot be pickled by name: rebuild the original class
    # from the module's state and derive the forward again.
    return _rebuild_rewritten_module, (module._fused_bn_original_class, module.__getstate__())


def _rebuild_rewritten_module(original_class, state):
    module = original_class.__new__(original_class)
    module.__setstate__(state)
    _install_forward_without_redundant_relus(module)
    return module
