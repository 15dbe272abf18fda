"""Where each module of a model is called: one-level torch.fx graphs of its containers.

Each module with children is traced with its children as leaves, so a graph shows which
children a forward calls, with what, and who uses their outputs. A container that does not
trace leaves the call sites of its children unknown.
"""

from collections import defaultdict

from torch import fx


class _ChildrenAsLeaves(fx.Tracer):
    def is_leaf_module(self, module, qualified_name):
        return True


def _trace(container):
    try:
        return _ChildrenAsLeaves().trace(container)
    except Exception:  # fx raises many kinds of errors on untraceable code
        return None


class CallSites:
    """The call sites of every module of ``model`` (as traced in its current mode)."""

    def __init__(self, model):
        self.parents = defaultdict(list)  # id(child) -> a container per registration
        self.calls = defaultdict(list)  # id(child) -> [(container, node), ...]
        self.untraced = set()  # ids of containers without a graph
        graphs = []
        called = {id(model)}  # containers whose own forward runs
        for container in model.modules():
            if not container._modules:
                continue
            for child in container._modules.values():
                if child is not None:
                    self.parents[id(child)].append(container)
            graph = _trace(container)
            if graph is None:
                self.untraced.add(id(container))
                # Its children may be called: assume so.
                called.update(id(child) for child in container.children())
                continue
            graphs.append((container, graph))
            called.update(id(container.get_submodule(node.target))
                          for node in graph.nodes if node.op == "call_module")
        for container, graph in graphs:
            # A container nobody calls, e.g. a Sequential whose parent's forward
            # (rewritten by convert_model) calls its children itself, calls nothing.
            if id(container) not in called:
                continue
            for node in graph.nodes:
                if node.op == "call_module":
                    self.calls[id(container.get_submodule(node.target))].append((container, node))

    def known(self, module):
        """Whether every container that holds ``module`` traced, so all its calls are known."""
        return not any(id(parent) in self.untraced for parent in self.parents[id(module)])

    def single_call(self, module):
        """The (container, node) of ``module`` when it is registered once and called once."""
        calls = self.calls[id(module)]
        if len(self.parents[id(module)]) == 1 and len(calls) == 1 and self.known(module):
            return calls[0]
        return None


def only_user(node):
    """The one node that uses ``node``'s value, or None."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def called_module(container, node, types):
    """The child a ``call_module`` node calls, when of exactly one of ``types``."""
    if node is None or node.op != "call_module":
        return None
    module = container.get_submodule(node.target)
    return module if type(module) in types else None
