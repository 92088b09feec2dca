"""Input layouts: channels-first ``(N, C, *)`` and channels-last ``(N, *, C)``."""

from __future__ import annotations

from torch import Tensor

from lightning_bn._checks import check_choice

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST)


def check_layout(layout: str) -> str:
    return check_choice("layout", layout, LAYOUTS)


def channel_dim(layout: str, ndim: int) -> int:
    """The channel dimension of an ``ndim``-dimensional input in ``layout`` (non-negative)."""
    return 1 if layout == CHANNELS_FIRST else ndim - 1


def per_channel(values: Tensor, ndim: int, cdim: int) -> Tensor:
    """A view of the ``(C,)`` tensor ``values`` that broadcasts over an ``ndim``-dimensional input with channels in
    dimension ``cdim``."""
    shape = [1] * ndim
    shape[cdim] = -1
    return values.view(shape)
