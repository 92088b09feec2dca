"""Input layouts: channels-first ``(N, C, *)`` and channels-last ``(N, *, C)``."""

from __future__ import annotations

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def channel_dim(layout: str, ndim: int) -> int:
    """The channel dimension of an ``ndim``-dimensional input in ``layout`` (non-negative)."""
    return 1 if layout == CHANNELS_FIRST else ndim - 1
