"""How the fused BatchNorm modules behave under PyTorch's deployment tools (docs/deploy.md).

* ``torch.export`` and ONNX export (both exporters), in eval mode: the modules compute with
  torch's own ops (``F.batch_norm`` and the activation), so that an exported program holds
  standard ops only: it runs without fused_bn, and ONNX has them (``BatchNormalization``,
  ``Relu``, ...). The fused op mutates the running statistics by schema, which the ONNX
  exporter cannot translate (nor a custom translation table) even in eval mode, where
  nothing is written.
* ``torch.fx`` symbolic tracing: a leaf, one ``call_module`` node, as torch.nn's BatchNorm.
* ``torch.jit.script``: one clear error that names the alternatives.
* ``torch.nn.utils.fusion`` (``fuse_conv_bn_eval``) and ``nn.SyncBatchNorm.convert_sync_batchnorm``
  rebuild a BatchNorm from ``eps`` and the tensors, without an activation: for a module with one
  they raise instead of dropping it (:class:`GuardedEps`).
"""

import sys

import torch
from torch import fx

__all__ = ["GuardedEps", "exporting", "fx_leaf_call", "refuse_scripting"]


def exporting():
    """Whether torch.export (which ONNX's default exporter runs) or the TorchScript-based
    ONNX exporter is tracing the model."""
    return torch.compiler.is_exporting() or (
        torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()
    )


def fx_leaf_call(module, input, residual):
    """The ``call_module`` node a tracer makes for a leaf module: torch.fx treats only
    torch.nn's modules as leaves, and tracing into the fused forward cannot work (it checks
    the input's rank and device)."""
    tracer = input.tracer
    if module is tracer.root:
        raise fx.proxy.TraceError(
            f"{type(module).__name__} is a leaf of torch.fx graphs: trace a model that contains it"
        )
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def refuse_scripting(module):
    """``__prepare_scriptable__`` of the fused modules, which torch.jit.script calls on every
    module before it compiles anything."""
    raise RuntimeError(
        f"torch.jit.script does not support fused_bn's {type(module).__name__}. Script the "
        "plain PyTorch model instead: torch.jit.script(fused_bn.revert_model(model)); or "
        "export it: torch.export.export(model.eval(), args), or torch.jit.trace(model.eval(), "
        "args) (see docs/deploy.md)"
    )


# Modules whose functions rebuild a BatchNorm from `eps` and the tensors alone.
_ACTIVATION_DROPPING_CALLERS = frozenset({"torch.nn.utils.fusion", "torch.nn.modules.batchnorm"})


class GuardedEps:
    """``eps`` of a module that applies an activation after BatchNorm: a plain attribute (kept
    in the instance dict, so state, repr, pickling and TorchScript see it as before), except
    when read by the functions of torch.nn.utils.fusion (``fuse_conv_bn_eval``,
    ``fuse_linear_bn_eval``) or torch.nn.modules.batchnorm
    (``nn.SyncBatchNorm.convert_sync_batchnorm``): they would return a module without the
    activation, so they get an error instead. ``activation_of(module)`` describes the
    activation, or is falsy for none."""

    def __init__(self, activation_of):
        self.activation_of = activation_of

    def __get__(self, module, owner=None):
        if module is None:
            return self
        if not torch.compiler.is_compiling() and (  # dynamo does not trace sys._getframe
            sys._getframe(1).f_globals.get("__name__") in _ACTIVATION_DROPPING_CALLERS
        ):
            activation = self.activation_of(module)
            if activation:
                raise RuntimeError(
                    f"{type(module).__name__} applies {activation} after BatchNorm, which this "
                    "function would drop: fold it with fused_bn.fold_batch_norm(model), or with "
                    "torch.ao.quantization.fuse_modules(..., fuse_custom_config_dict="
                    "fused_bn.fuse_custom_config()), or revert the model first "
                    "(fused_bn.revert_model)"
                )
        return module.__dict__["eps"]

    def __set__(self, module, value):
        module.__dict__["eps"] = value
