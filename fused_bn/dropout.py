"""Drop-in Dropout module."""

from torch import fx, nn

from . import deploy
from .functional import DEFAULT_DROPOUT_MASK_MODE, DROPOUT_MASK_MODES, dropout

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """Drop-in for :class:`torch.nn.Dropout` that keeps at most 1 bit per element
    for backward (``mask_mode="bits"``) or none (``mask_mode="recompute"``); see
    :func:`fused_bn.functional.dropout`."""

    def __init__(self, p=0.5, inplace=False, *, mask_mode=DEFAULT_DROPOUT_MASK_MODE):
        super().__init__(p, inplace)
        if mask_mode not in DROPOUT_MASK_MODES:
            raise ValueError(f"mask_mode must be one of {DROPOUT_MASK_MODES}, got {mask_mode!r}")
        self.mask_mode = mask_mode

    # Deployment tools: see fused_bn/deploy.py.
    __prepare_scriptable__ = deploy.refuse_scripting

    def forward(self, input):
        if isinstance(input, fx.Proxy):
            return deploy.fx_leaf_call(self, input, None)
        return dropout(input, self.p, self.training, self.inplace, self.mask_mode)

    def extra_repr(self):
        return super().extra_repr() + f", mask_mode={self.mask_mode}"
