"""Recompute fused BatchNorm(+activation) outputs in backward instead of keeping them.

The layer after a fused BatchNorm+activation (a convolution, linear, pooling)
keeps the activation's output for its own backward. The fused op keeps its
input and per-channel statistics anyway, and its output is one elementwise
pass of them (``fused_bn::batch_norm_act_elemt``, the same vector code as the
forward, so bit-identical). Under :func:`recompute` such outputs are not kept:

* the fused modules register each output they produce (``_batch_norm``
  calls :func:`register`) with the tensors that rebuild it;
* a ``saved_tensors_hooks`` pack hook stores, for a registered output (or a
  view of it) that a later layer saves, a recipe instead of the tensor;
* in backward the first consumer to unpack it recomputes the output; the
  others get the same tensor; it is dropped once every consumer still in the
  graph has unpacked it.

Every other saved tensor goes to the enclosing saved-tensor hooks
(``save_on_cpu``, a checkpoint, a user's), or is kept as autograd keeps it.
Tensors changed in place after they were saved raise autograd's "modified by an
inplace operation" error, as they would without hooks. See docs/memory.md.
"""

import contextlib
import functools
import itertools
import threading
import weakref

import torch

from ._ops import ops

__all__ = ["recompute", "recompute_activations"]

# Sessions open in any thread: _batch_norm looks at the thread's own session only
# when this is nonzero (a plain global, cheap to read and to guard under torch.compile).
sessions_open = 0
_thread = threading.local()
_new_token = itertools.count().__next__


def _version_tracker(tensor):
    """A tensor without data that shares ``tensor``'s version counter: in-place changes
    to ``tensor`` (or its views) show in its ``_version`` even after ``tensor`` is gone,
    and it keeps no storage alive."""
    tracker = tensor.detach()
    # Below the ADInplaceOrView key, set_ does not bump the shared counter.
    with torch._C._AutoDispatchBelowADInplaceOrView():
        tracker.set_()
    return tracker


def _check_version(tensor, expected):
    if tensor._version != expected:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{tensor.type()} {list(tensor.shape)}] is at version "
            f"{tensor._version}; expected version {expected} instead. Hint: it was saved for "
            "backward under fused_bn.memory.recompute(); modify a copy instead."
        )


class _Kept:
    """A saved tensor kept as autograd keeps it, with the version check autograd skips
    for tensors that go through hooks."""

    __slots__ = ("alias", "version")

    def __init__(self, tensor):
        # detach(): the same storage and version counter without the autograd history,
        # which would make a reference cycle through the node that saved it (a leaf has
        # no history to cut).
        self.alias = tensor if tensor.is_leaf else tensor.detach()
        self.version = tensor._version

    def unpack(self):
        _check_version(self.alias, self.version)
        return self.alias


class _PackedByOuterHooks:
    """A saved tensor handed to the enclosing saved-tensor hooks."""

    __slots__ = ("packed", "unpack_hook", "tracker", "version")

    def __init__(self, tensor, pack_hook, unpack_hook):
        self.packed = pack_hook(tensor)
        self.unpack_hook = unpack_hook
        self.tracker = _version_tracker(tensor)
        self.version = tensor._version

    def unpack(self):
        _check_version(self.tracker, self.version)
        return self.unpack_hook(self.packed)


class _Recipe:
    """How to rebuild one fused output: the op's input, parameters and statistics (as
    saved handles), and the output's identity for the version check. Shared by the
    handles of every consumer that saved the output or a view of it."""

    def __init__(self, fused, sources):
        self.sources = sources  # input, weight, bias, mean, invstd: handles or None
        self.activation = fused.activation
        self.output_tracker = fused.tracker
        self.output_version = fused.version
        self.output_stride = fused.stride
        self.consumers = set()  # tokens of the live handles
        self.unpacked = set()  # tokens of the handles unpacked since `output` was rebuilt
        self.output = None

    def add_consumer(self):
        token = _new_token()
        self.consumers.add(token)
        return token

    def forget(self, token):
        self.consumers.discard(token)
        self.unpacked.discard(token)
        self._drop_when_done()

    def unpack(self, token):
        _check_version(self.output_tracker, self.output_version)
        if self.output is None:
            self.output = self.recompute()
        rebuilt = self.output
        self.unpacked.add(token)
        self._drop_when_done()
        return rebuilt

    def _drop_when_done(self):
        if self.output is not None and self.consumers <= self.unpacked:
            self.output = None
            self.unpacked.clear()

    def recompute(self):
        input, weight, bias, mean, invstd = (
            None if s is None else s.unpack() for s in self.sources
        )
        with torch.no_grad():
            output = ops.batch_norm_act_elemt.default(
                input, weight, bias, mean, invstd, self.activation.name, self.activation.params
            )
        if output.stride() != self.output_stride:  # same values, the forward's layout
            output = torch.empty_strided(
                output.shape, self.output_stride, dtype=output.dtype, device=output.device
            ).copy_(output)
        return output


class _RecomputedHandle:
    """What a consumer's saved slot holds instead of a fused output (or a view of it)."""

    __slots__ = ("recipe", "token", "view")

    def __init__(self, recipe, tensor, is_output):
        self.recipe = recipe
        self.token = recipe.add_consumer()
        self.view = None if is_output else (tensor.size(), tensor.stride(), tensor.storage_offset())

    def unpack(self):
        output = self.recipe.unpack(self.token)
        return output if self.view is None else output.as_strided(*self.view)

    def __del__(self):
        # The consumer's node was freed: it no longer waits for the output.
        self.recipe.forget(self.token)


class _FusedOutput:
    """A registered output of the fused op and the tensors that rebuild it."""

    def __init__(self, output, sources, activation, on_death):
        self.output = weakref.ref(output, on_death)
        self.tracker = _version_tracker(output)
        self.version = output._version
        self.stride = output.stride()
        self.dtype = output.dtype
        self.sources = sources
        self.source_versions = [None if t is None else t._version for t in sources]
        self.activation = activation
        self.recipe = None

    def recipe_for(self, session):
        """The shared recipe, or None where the output or its sources changed in place
        since the forward (the output is then kept as it is)."""
        if self.tracker._version != self.version:
            return None
        if any(t is not None and t._version != v
               for t, v in zip(self.sources, self.source_versions)):
            return None
        if self.recipe is None:
            self.recipe = _Recipe(
                self, [None if t is None else session.pack(t) for t in self.sources]
            )
        return self.recipe


class _Registry(dict):
    """id(output) -> _FusedOutput; a dict that weak references can point to, so that an
    entry's death callback does not keep the registry alive."""

    __slots__ = ("__weakref__",)


def _unregister(registry_ref, key, output_ref):
    registry = registry_ref()
    fused = None if registry is None else registry.get(key)
    if fused is not None and fused.output is output_ref:
        del registry[key]


class _Session:
    """The state of one ``recompute()`` block: its registered outputs and the enclosing
    hooks it chains to."""

    def __init__(self, outer_hooks):
        self.outer_pack, self.outer_unpack = outer_hooks or (None, None)
        # id(output) -> _FusedOutput while the output lives: every saved tensor is looked
        # up here, and a dict of ids is the cheapest lookup (identity checked on a hit).
        self.fused_outputs = _Registry()

    def register(self, output, sources, activation):
        # Without a node (no grad), nothing keeps the input: a recipe would keep it instead
        # of the output, which saves nothing.
        if output.requires_grad:
            key = id(output)
            on_death = functools.partial(_unregister, weakref.ref(self.fused_outputs), key)
            self.fused_outputs[key] = _FusedOutput(output, sources, activation, on_death)

    def pack(self, tensor):
        fused, is_output = self._fused_output_of(tensor)
        if fused is not None:
            recipe = fused.recipe_for(self)
            if recipe is not None:
                return _RecomputedHandle(recipe, tensor, is_output)
        return self._keep(tensor)

    def _fused_output_of(self, tensor):
        fused = self._registered(tensor)
        if fused is not None:
            return fused, True
        base = tensor._base
        if base is not None and tensor.dtype == base.dtype:
            return self._registered(base), False
        return None, False

    def _registered(self, tensor):
        fused = self.fused_outputs.get(id(tensor))
        return fused if fused is not None and fused.output() is tensor else None

    def _keep(self, tensor):
        if self.outer_pack is None:
            return _Kept(tensor)
        # The fused op's input goes to the outer hooks twice (for the op, and for the
        # recipe), as often as the hooks would have seen it and its output without
        # recompute(): some (a checkpoint's) let each packed tensor be unpacked once.
        return _PackedByOuterHooks(tensor, self.outer_pack, self.outer_unpack)


def _unpack(handle):
    return handle.unpack()


def active_session():
    """This thread's innermost open session, or None."""
    return getattr(_thread, "session", None)


def register(output, input, weight, bias, mean, invstd, activation):
    """Called by the fused op's Python wrapper for each output it computes without a
    residual, while a session may be open."""
    session = active_session()
    if session is not None:
        session.register(output, (input, weight, bias, mean, invstd), activation)


@contextlib.contextmanager
def recompute():
    """Within this block, fused BatchNorm(+activation) outputs that later layers save for
    backward are recomputed in backward instead of kept. Gradients, outputs and running
    statistics are bit-identical to those computed without it.

    Backward may run inside or outside the block. Saved-tensor hooks already active
    (``torch.autograd.graph.save_on_cpu``, a checkpoint's, a user's) receive every tensor
    that is kept; hooks entered inside the block take over from it (nothing is then
    recomputed). Under torch.compile and where saved-tensor hooks are disabled, this is
    a no-op.
    """
    global sessions_open
    outer_hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    previous = active_session()
    already_innermost = previous is not None and outer_hooks is not None and (
        outer_hooks[0] == previous.pack
    )
    if (already_innermost or torch.compiler.is_compiling()
            or not torch._C._autograd._saved_tensors_hooks_is_enabled()):
        yield
        return
    session = _Session(outer_hooks)
    _thread.session = session
    sessions_open += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(session.pack, _unpack):
            yield
    finally:
        sessions_open -= 1
        _thread.session = previous


def _enter_on_forward(module, args):
    if torch.compiler.is_compiling():
        return
    block = contextlib.ExitStack()
    block.enter_context(recompute())
    module.__dict__.setdefault("_fused_bn_recompute_blocks", []).append(block)


def _exit_after_forward(module, args, output):
    if torch.compiler.is_compiling():
        return
    module.__dict__["_fused_bn_recompute_blocks"].pop().close()


def recompute_activations(model, enabled=True):
    """Runs every forward of ``model`` under :func:`recompute` (``enabled=False``
    undoes it). Changes nothing else: parameters, buffers, ``state_dict`` and the
    module's type stay as they are. Returns ``model``."""
    for handle in model.__dict__.pop("_fused_bn_recompute_hooks", ()):
        handle.remove()
    if enabled:
        model.__dict__["_fused_bn_recompute_hooks"] = (
            model.register_forward_pre_hook(_enter_on_forward),
            model.register_forward_hook(_exit_after_forward, always_call=True),
        )
    return model
