"""torch.compile baselines that really are compiled.

torch._dynamo caches compiled code per Python code object, and every
nn.BatchNorm2d shares one `forward`: after `recompile_limit` (8) shapes or
dtypes it stops compiling that code and runs it eagerly, silently. So each
benchmark row (each model) starts from an empty dynamo cache (:func:`reset`),
:class:`CompileCheck` makes sure the first call of a compiled function traced
a graph, and :func:`check_unchanged` that nothing was traced while it was
timed: a later trace means a guard failed and the function recompiled or fell
back to eager.
"""

import torch
from torch._dynamo.utils import counters


class CompileFellBack(RuntimeError):
    """The compiled function did not run (only) compiled code."""


def reset():
    """An empty dynamo cache, dynamo's counters cleared."""
    # Compile in this process rather than in a pool of workers: as fast for these
    # graphs, and the workers' CPU time would pass for other processes' load.
    torch._inductor.config.compile_threads = 1
    torch._dynamo.reset()
    counters.clear()


def snapshot():
    """dynamo's counters now: they change whenever dynamo traces (not on a cache hit)."""
    return {group: dict(values) for group, values in counters.items() if values}


def _total(state, group):
    return sum(state.get(group, {}).values())


class CompileCheck:
    """Made before the first call of a compiled function; :meth:`compiled` after it."""

    def __init__(self):
        self.before = snapshot()

    def compiled(self, allow_graph_breaks=False):
        """Raises CompileFellBack unless the first call traced a graph without giving up
        (or breaking the graph, unless allowed); returns the graph breaks."""
        after = snapshot()
        graphs = after.get("stats", {}).get("unique_graphs", 0) - self.before.get(
            "stats", {}).get("unique_graphs", 0)
        if graphs < 1:
            raise CompileFellBack(f"no graph was compiled (dynamo counters: {after})")
        new = set(after.get("unimplemented", {})) - set(self.before.get("unimplemented", {}))
        if new:
            raise CompileFellBack(f"dynamo gave up: {min(new).splitlines()[0]}")
        breaks = _total(after, "graph_break") - _total(self.before, "graph_break")
        if breaks and not allow_graph_breaks:
            raise CompileFellBack(f"graph breaks: {after['graph_break']}")
        return breaks


def check_unchanged(state):
    """Raises CompileFellBack if dynamo traced anything since `state` (a snapshot())."""
    now = snapshot()
    if now != state:
        changed = sorted(g for g in set(now) | set(state) if now.get(g) != state.get(g))
        raise CompileFellBack(
            "dynamo traced again after the first call (recompiled or fell back to eager; "
            f"changed counters: {', '.join(changed)})")
