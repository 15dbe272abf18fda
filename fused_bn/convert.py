"""``convert_model``: put fused_bn modules into an existing model in one call.

Every BatchNorm becomes a fused_bn module, with the activation that follows it
and the residual add before that activation fused in where the model's code
allows it; ``nn.Dropout`` becomes ``fused_bn.Dropout``. docs/convert.md explains
how; in short:

1. Each module with children is traced with ``torch.fx`` one level deep (its
   children are leaves), without running anything for real (_convert_trace).
2. From each BatchNorm's call its output is followed through the graphs: up
   into the caller's forward, into a child's forward, through ``nn.Identity``,
   to an activation module, function or method, and through one residual add
   (_convert_fusion). Every value on the way must have a single user, and the
   modules involved must be called once and have no hooks.
3. The BatchNorm becomes ``BatchNormXd``, ``BatchNormReLUXd`` or
   ``BatchNormActXd(activation=...)`` (taking over its Parameters and buffers);
   a fused activation module called only there becomes ``nn.Identity``; a
   forward that must change (a functional or shared activation, a residual add)
   gets a generated subclass of its class with the edited graph as forward
   (_convert_rewrite). Classes, names and ``state_dict`` keys stay as they were.

The :class:`ConversionReport` says, for every BatchNorm, what it became and
why what follows it was not fused.
"""

import copy
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import modules as fused
from ._convert_fusion import (
    Chain,
    describe,
    describe_value,
    qualified,
    resolve_shared_adds,
    walk,
)
from ._convert_rewrite import (
    drop_node,
    fuse_residual,
    inline,
    install,
)
from ._convert_trace import ModelIndex, Site, trace
from ._swap import has_hooks, swap_modules, take_over
from .activations import Activation, module_activation
from .dropout import Dropout as FusedDropout

__all__ = ["BatchNormOutcome", "ConversionReport", "Fusion", "Replacement", "convert_model"]

# Exact types only: a user subclass of nn.BatchNorm2d may have its own forward.
_PLAIN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
# BatchNorm subclasses known to compute act(drop(batch_norm(x))) with `drop` and `act`
# children, by (module, class name): never imported, never traced.
_BATCH_NORM_ACT = {("timm.layers.norm_act", "BatchNormAct2d"): 2}
_FUSED = {
    1: (fused.BatchNorm1d, fused.BatchNormReLU1d, fused.BatchNormAct1d),
    2: (fused.BatchNorm2d, fused.BatchNormReLU2d, fused.BatchNormAct2d),
    3: (fused.BatchNorm3d, fused.BatchNormReLU3d, fused.BatchNormAct3d),
}
_IDENTITY = Activation()


# ---- the report -------------------------------------------------------------------


@dataclass
class Replacement:
    name: str  # qualified name in the model ("" for the model itself)
    old_type: str
    new_type: str


@dataclass(frozen=True)
class Fusion:
    """What was fused into one BatchNorm.

    ``activation``: the activation it now applies (``"identity"`` when only an add was
    fused); ``site``: where that activation was (a module, a function call in a forward,
    or the layer's own ``act``); ``residual``: the other operand of the residual add it
    now takes (``bn(x, residual)``), ``""`` when none.
    """

    batch_norm: str
    activation: str
    site: str = ""
    residual: str = ""

    def __str__(self):
        parts = [f"add of {self.residual}"] if self.residual else []
        if self.activation != "identity":
            parts.append(f"{self.activation} from {self.site}")
        return ", ".join(parts)


@dataclass
class BatchNormOutcome:
    """One BatchNorm of the model: its type before and after, what was fused into it, and
    ``note``: why what follows it was not fused (or why it was left as it was)."""

    name: str
    old_type: str
    new_type: str
    converted: bool
    fusion: Optional[Fusion] = None
    note: str = ""

    def __str__(self):
        new = f"fused_bn.{self.new_type}" if self.converted else "left as it is"
        text = f"{self.name or '<model>'}: {self.old_type} -> {new}"
        if self.fusion is not None:
            text += f", {self.fusion}"
        return f"{text}; {self.note}" if self.note else text


@dataclass
class ConversionReport:
    """What ``convert_model`` did.

    ``batch_norms``: one :class:`BatchNormOutcome` per BatchNorm of the model, in
    ``named_modules`` order. ``fused``: one :class:`Fusion` per BatchNorm that took an
    activation or a residual add. ``replaced``: one :class:`Replacement` per module swapped
    (BatchNorms, activation modules that became ``nn.Identity``, Dropout). ``rewritten``:
    the modules whose forward was rewritten, as ``"name (Class)"``. ``warnings``: also
    issued with ``warnings.warn``.
    """

    replaced: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    batch_norms: list = field(default_factory=list)
    rewritten: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def activations_fused(self):
        return sum(f.activation != "identity" for f in self.fused)

    @property
    def residuals_fused(self):
        return sum(bool(f.residual) for f in self.fused)

    def __str__(self):
        converted = sum(b.converted for b in self.batch_norms)
        lines = [
            f"convert_model: {len(self.batch_norms)} BatchNorm layers, {converted} converted; "
            f"{self.activations_fused} fused with an activation, {self.residuals_fused} with "
            f"a residual add; {len(self.rewritten)} forwards rewritten"
        ]
        lines += [f"  {b}" for b in self.batch_norms]
        batch_norms = {b.name for b in self.batch_norms}
        others = [r for r in self.replaced if r.name not in batch_norms]
        lines += [f"  {r.name or '<model>'}: {r.old_type} -> {r.new_type}" for r in others]
        if self.rewritten:
            lines.append(f"  forward rewritten: {', '.join(self.rewritten)}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ---- the BatchNorm layers ------------------------------------------------------------


@dataclass(eq=False)
class _Layer:
    """One BatchNorm during conversion. ``dims`` 0: left as it is (``note`` says why);
    ``own``: the activation inside it (timm's BatchNormAct2d), None for a plain one."""

    name: str
    module: nn.Module
    dims: int = 0
    own: Optional[Activation] = None
    note: str = ""
    chain: Optional[Chain] = None

    def activation(self):
        if self.own is not None and self.own != _IDENTITY:
            return self.own
        if self.chain is not None and self.chain.activation is not None:
            return self.chain.activation
        return _IDENTITY


def _batch_norm_act_parts(module):
    """The activation of a known BatchNorm+activation module, or the reason it is kept."""
    if set(module._modules) != {"drop", "act"}:
        return None, "it has other submodules than drop and act"
    drop, act = module.drop, module.act
    if type(drop) is not nn.Identity:
        return None, f"its drop ({type(drop).__name__}) runs between BatchNorm and activation"
    if has_hooks(drop) or has_hooks(act):
        return None, "its drop or act module has hooks"
    own = _IDENTITY if type(act) is nn.Identity else module_activation(act)
    if own is None:
        return None, f"its activation {type(act).__name__} is not one fused_bn fuses"
    return own, ""


def _layer(name, module):
    cls = type(module)
    if cls in _PLAIN:
        return _Layer(name, module, _PLAIN[cls])
    if isinstance(module, fused._BatchNormAct):
        return _Layer(name, module, note="already a fused_bn module")
    dims = _BATCH_NORM_ACT.get((cls.__module__, cls.__name__))
    if dims is not None:
        own, reason = _batch_norm_act_parts(module)
        return _Layer(name, module, dims if own else 0, own, reason)
    if isinstance(module, nn.SyncBatchNorm):
        return _Layer(name, module, note="SyncBatchNorm is left as it is")
    return _Layer(name, module, note=f"a subclass of {cls.__mro__[1].__name__} (its own code): "
                  "left as it is")


def _follow(index, layer):
    """Find what can be fused after ``layer`` (sets ``layer.chain`` or ``layer.note``)."""
    if not layer.dims or layer.activation() != _IDENTITY:
        return
    if has_hooks(layer.module):
        layer.note = "it has hooks: nothing fused into it"
        return
    call, reason = index.unique_call(layer.module)
    if call is None:
        layer.note = f"nothing fused into it: it is {reason}"
        return
    layer.chain = Chain(layer.module, layer.name, call)
    walk(index, layer.chain)


# ---- which graphs change ------------------------------------------------------------


@dataclass
class _Edits:
    """The edits of one traced module's graph. Its inlined children's own edits are
    replayed where they are inlined."""

    inlines: list = field(default_factory=list)  # (call Site, child Traced)
    residuals: list = field(default_factory=list)  # chains
    drops: list = field(default_factory=list)  # activation Sites
    summary: list = field(default_factory=list)


def _same_call(index, module, site):
    call, _ = index.unique_call(module)
    return call is not None and call.node is site.node


def _plan_edits(index, layers):
    """{Traced: _Edits} and the ids of activation modules that become nn.Identity."""
    edits, identities = {}, set()
    for layer in layers:
        chain = layer.chain
        if chain is None or not chain.fused:
            continue
        act_module = chain.act_site.module() if chain.act_site is not None else None
        drop = chain.act_site is not None and not (
            act_module is not None and _same_call(index, act_module, chain.act_site))
        owners = ([chain.add.traced] if chain.add is not None else []) + (
            [chain.act_site.traced] if drop else [])
        rewritten = [o for o in owners if hasattr(o.module, "_fused_bn_rewrite")]
        if rewritten:
            chain.cancel(f"fusing it would change {rewritten[0]}, whose forward convert_model "
                         "already rewrote")
            continue
        if chain.add is not None:
            mine = edits.setdefault(chain.add.traced, _Edits())
            mine.inlines += [(call, index.traced[id(call.module())]) for call in
                             reversed(chain.inlines)]
            mine.residuals.append(chain)
            mine.summary.append(f"{_relative(chain.add.traced, layer.name)} takes the residual add")
        if drop:
            mine = edits.setdefault(chain.act_site.traced, _Edits())
            mine.drops.append(chain.act_site)
            mine.summary.append(f"{_site_text(index, chain.act_site, short=True)} -> "
                                f"{_relative(chain.act_site.traced, layer.name)}")
        elif act_module is not None:
            identities.add(id(act_module))
    return edits, identities


def _relative(traced, name):
    prefix = f"{traced.name}." if traced.name else ""
    return name[len(prefix):] if name.startswith(prefix) else name


def _site_text(index, site, short=False):
    module = site.module()
    if module is None:
        return describe(site).split(" in ")[0] if short else describe(site)
    name = _relative(site.traced, qualified(site.traced, site.node.target)) if short else (
        qualified(site.traced, site.node.target))
    calls = index.call_sites[id(module)]
    if len(calls) > 1:
        number = next(i for i, c in enumerate(calls, 1) if c.node is site.node)
        name += f" (call {number} of {len(calls)})"
    return name


# ---- building the new forwards --------------------------------------------------------


def _replay(traced, graph, mapping, edits, steps):
    """Apply ``traced``'s edits (and those of the children it inlines) to ``graph``, whose
    nodes ``mapping`` gives for the analysed nodes; records each edit in ``steps``."""
    mine = edits.get(traced)
    if mine is None:
        return
    for call, child in mine.inlines:
        node = mapping[call.node]
        steps.append(("inline", node.name))
        new = inline(graph, node, child.module)
        mapping.update({n: new[n.name] for n in child.graph.nodes if n.name in new})
        _replay(child, graph, mapping, edits, steps)
    for chain in mine.residuals:
        batch_norm, add = mapping[chain.start.node], mapping[chain.add.node]
        steps.append(("residual", batch_norm.name, add.name, chain.operand))
        fuse_residual(graph, batch_norm, add, chain.operand)
    for site in mine.drops:
        node = mapping[site.node]
        steps.append(("drop", node.name))
        drop_node(graph, node)


def _rewrite(traced, edits):
    graph, reason = trace(traced.module, original=True)
    if graph is None:  # traced a moment ago: only a forward that changes in between fails
        raise RuntimeError(f"convert_model: {traced} no longer traces: {reason}")
    by_name = {node.name: node for node in graph.nodes}
    mapping = {node: by_name[node.name] for node in traced.graph.nodes}
    steps = []
    _replay(traced, graph, mapping, edits, steps)
    graph.lint()
    install(traced.module, graph, steps, "; ".join(edits[traced].summary))


# ---- convert_model ---------------------------------------------------------------------


def _new_batch_norm(layer):
    old, activation = layer.module, layer.activation()
    plain, relu, general = _FUSED[layer.dims]
    kwargs = dict(eps=old.eps, momentum=old.momentum, affine=old.affine,
                  track_running_stats=old.track_running_stats,
                  device="meta")  # placeholders only: the old tensors are taken over
    if activation == _IDENTITY:
        new = plain(old.num_features, **kwargs)
    elif activation.name == "relu":
        new = relu(old.num_features, **kwargs)
    else:
        new = general(old.num_features, **kwargs, activation=activation)
    return take_over(new, old)


def _outcome(index, layer, new):
    chain = layer.chain
    fusion = None
    if layer.own is not None and layer.own != _IDENTITY:
        fusion = Fusion(layer.name, str(layer.own), f"{layer.name}.act")
    elif chain is not None and chain.fused:
        site = _site_text(index, chain.act_site) if chain.act_site is not None else ""
        residual = ""
        if chain.add is not None:
            other = chain.add.node.args[1 - chain.operand]
            residual = describe_value(Site(chain.add.traced, other))
        fusion = Fusion(layer.name, str(layer.activation()), site, residual)
    note = layer.note if chain is None or chain.activation is not None else chain.stop
    new_type = type(new).__name__ if new is not None else type(layer.module).__name__
    return BatchNormOutcome(layer.name, type(layer.module).__name__, new_type, new is not None,
                            fusion, note)


def _warn(report, message):
    report.warnings.append(message)
    # Attributed to the caller of convert_model (_warn <- _warnings <- convert_model).
    warnings.warn(message, stacklevel=4)


def _warnings(index, layers, report):
    blocked = {}
    for layer in layers:
        for caller in index.callers(layer.module) if layer.dims else ():
            if id(caller) in index.untraced:
                blocked[id(caller)] = caller
    for caller in blocked.values():
        _warn(report, f"convert_model: {index.name(caller)} ({type(caller).__name__}) could "
              f"not be traced because {index.untraced[id(caller)]}; the BatchNorm layers it "
              "calls were converted without fusion")
    convertible = [layer for layer in layers if layer.dims]
    # BatchNorms of its own that convert_model cannot touch (subclasses, SyncBatchNorm, ...);
    # fused_bn modules from an earlier conversion are not a reason to warn.
    kept = [layer for layer in layers
            if not layer.dims and not isinstance(layer.module, fused._BatchNormAct)]
    if kept and not convertible:
        _warn(report, f"convert_model: none of the model's {len(kept)} BatchNorm layers could "
              "be converted (see the report, return_report=True)")
    if convertible and not report.fused and not blocked:  # else the warnings above say why
        _warn(report, f"convert_model: none of the model's {len(convertible)} BatchNorm layers "
              "could be fused with what follows it (see the report, return_report=True)")


def convert_model(model, *, inplace=False, dropout=True, return_report=False):
    """Return ``model`` with fused_bn modules in place of PyTorch's.

    Args:
        model: any ``nn.Module`` (a ``torch.jit.ScriptModule`` is not supported).
        inplace: convert ``model`` itself instead of a deep copy.
        dropout: also replace every ``nn.Dropout`` by ``fused_bn.Dropout`` (exactly
            that class: ``AlphaDropout``, ``Dropout1d/2d/3d`` and subclasses differ).
        return_report: return ``(model, ConversionReport)`` instead of the model.

    Parameters, buffers, train/eval mode, device, dtype and ``requires_grad``
    carry over; ``state_dict`` keys are unchanged; nothing of the model runs for real
    (no buffer changes). Modules that already are fused_bn modules, ``SyncBatchNorm``
    and unknown subclasses of ``nn.BatchNormXd`` are left alone.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert_model does not support TorchScript modules")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    layers = [_layer(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    index = ModelIndex(model, is_leaf=lambda m: isinstance(m, _BatchNorm))
    for layer in layers:
        _follow(index, layer)
    resolve_shared_adds([layer.chain for layer in layers if layer.chain is not None])
    edits, identities = _plan_edits(index, layers)

    replacements = {}
    for layer in layers:
        new = _new_batch_norm(layer) if layer.dims else None
        if new is not None:
            replacements[id(layer.module)] = new
        outcome = _outcome(index, layer, new)
        report.batch_norms.append(outcome)
        if outcome.fusion is not None:
            report.fused.append(outcome.fusion)
    for name, module in model.named_modules():
        if id(module) in identities:
            replacements[id(module)] = nn.Identity().train(module.training)
        elif dropout and type(module) is nn.Dropout:
            replacements[id(module)] = take_over(FusedDropout(p=module.p,
                                                              inplace=module.inplace), module)
        if id(module) in replacements:
            new_type = type(replacements[id(module)]).__name__
            report.replaced.append(Replacement(name, type(module).__name__, new_type))
    model = swap_modules(model, replacements)
    for traced in edits:
        _rewrite(traced, edits)
        report.rewritten.append(f"{traced} ({type(traced.module).__name__})")
    _warnings(index, layers, report)
    return (model, report) if return_report else model
