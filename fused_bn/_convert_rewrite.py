"""convert_model, part 3: the rewritten model.

Modules are swapped in place: a new module takes over the old one's Parameter and
buffer objects and hooks. Where a fusion needs a forward to change (a functional
or shared activation dropped, a residual add moved into the BatchNorm call), that
module's class becomes a generated subclass of its own class whose ``forward`` is
the edited one-level graph (see _convert_trace), in readable fx-generated code.
The edits are recorded as ``steps`` on the module (``_fused_bn_rewrite``), so that
pickling and ``copy.deepcopy`` rebuild the same forward from the original class.
"""

import itertools
import linecache
from dataclasses import dataclass

from torch.fx.node import map_arg

from ._convert_trace import original_class, trace

__all__ = ["Rewrite", "apply_steps", "drop_node", "fuse_residual", "inline", "install"]

# ---- graph edits ----------------------------------------------------------------------


def inline(graph, call, child):
    """Replace the call node ``call`` of module ``child`` by the nodes of its forward's
    one-level graph (its original class's); returns {child node name: new node}."""
    child_graph, reason = trace(child, original=True)
    if child_graph is None:
        raise RuntimeError(f"cannot inline {call.target}: {reason}")
    values = {}
    arguments = iter(call.args)
    with graph.inserting_before(call):
        for node in child_graph.nodes:
            if node.op == "placeholder":
                values[node] = next(arguments)
            elif node.op == "output":
                result = node.args[0]
            else:
                # Named after the call (block_0, block_1, ...), so the code reads as the layers.
                target = node.target
                if node.op in ("call_module", "get_attr"):
                    target = f"{call.target}.{target}"
                values[node] = graph.create_node(
                    node.op, target, map_arg(node.args, values.__getitem__),
                    map_arg(node.kwargs, values.__getitem__),
                    name=f"{call.name}_{node.name.lstrip('_')}", type_expr=node.type)
    call.replace_all_uses_with(values[result])
    graph.erase_node(call)
    return {node.name: new for node, new in values.items() if node.op != "placeholder"}


def fuse_residual(graph, batch_norm, add, operand):
    """``add(bn(x) -> ..., other)`` becomes ``bn(x, other) -> ...``: the BN call (and the
    no-op calls after it) move down to the add when ``other`` is computed after it."""
    value, other = add.args[operand], add.args[1 - operand]
    moved = [value]
    while moved[-1] is not batch_norm:
        moved.append(moved[-1].args[0])
    position = {node: i for i, node in enumerate(graph.nodes)}
    if position[other] > position[batch_norm]:
        for node in reversed(moved):
            add.prepend(node)
    batch_norm.args = (batch_norm.args[0], other)
    add.replace_all_uses_with(value)
    graph.erase_node(add)


def drop_node(graph, node):
    """Remove a call whose work the fused BatchNorm now does: its users get its input."""
    node.replace_all_uses_with(node.args[0])
    graph.erase_node(node)


def apply_steps(module, steps):
    """``module``'s original one-level graph with the recorded ``steps`` applied."""
    graph, reason = trace(module, original=True)
    if graph is None:
        raise RuntimeError(f"cannot rebuild the forward of {type(module).__name__}: {reason}")
    for step in steps:
        nodes = {node.name: node for node in graph.nodes}
        kind, name = step[0], step[1]
        if kind == "inline":
            inline(graph, nodes[name], module.get_submodule(nodes[name].target))
        elif kind == "residual":
            fuse_residual(graph, nodes[name], nodes[step[2]], step[3])
        else:
            drop_node(graph, nodes[name])
    graph.lint()
    return graph


# ---- generated classes ------------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """What convert_model did to one module's forward (kept on the module as
    ``_fused_bn_rewrite``): the graph edits, the resulting source, a summary."""

    steps: tuple
    source: str
    summary: str


# (original class, forward source) -> generated subclass, shared by modules and their copies.
_CLASSES = {}
_serial = itertools.count()


def _generated_class(original, code):
    key = (original, code.src)
    if key not in _CLASSES:
        # A file name of its own in linecache: inspect.getsource and tracebacks show the code.
        qualified = f"{original.__module__}.{original.__qualname__}"
        filename = f"<fused_bn: {qualified}.forward #{next(_serial)}>"
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)
        _CLASSES[key] = type(original.__name__, (original,), {
            "forward": namespace["forward"],
            "extra_repr": _extra_repr,
            "__reduce_ex__": _reduce_rewritten,
            "_fused_bn_original_class": original,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__doc__": original.__doc__,
        })
    return _CLASSES[key]


def _extra_repr(self):
    base = original_class(self).extra_repr(self)
    note = f"forward fused by fused_bn: {self._fused_bn_rewrite.summary}"
    return f"{base}\n{note}" if base else note


def install(module, graph, steps, summary):
    """Make ``graph`` the forward of ``module`` (whose original graph ``steps`` edit)."""
    code = graph.python_code("self")
    module.__class__ = _generated_class(original_class(module), code)
    module._fused_bn_rewrite = Rewrite(tuple(steps), code.src, summary)


def _reduce_rewritten(module, protocol):
    # The generated class cannot be pickled by name: rebuild the original class from
    # the module's state, then the forward from the recorded steps.
    return _rebuild_rewritten, (original_class(module), module.__getstate__())


def _rebuild_rewritten(original, state):
    module = original.__new__(original)
    module.__setstate__(state)
    rewrite = module._fused_bn_rewrite
    cls = _CLASSES.get((original, rewrite.source))
    if cls is None:
        code = apply_steps(module, rewrite.steps).python_code("self")
        if code.src != rewrite.source:
            raise RuntimeError(
                f"the forward of {original.__qualname__} differs from the one convert_model "
                "rewrote (was its code changed since?); convert the original model again"
            )
        cls = _generated_class(original, code)
    module.__class__ = cls
    return module
