"""Running a LightningModule's own ``training_step`` outside the fit loop, with its logging muted.

Shared by :class:`~lightning_bn.callbacks.LossLandscapeProbe` (its default loss) and
:class:`~lightning_bn.callbacks.BatchNormRecalibration` (its default feeding of a module without a ``forward``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl

__all__ = ["logging_muted", "muted_training_step"]

_LOGGING = ("log", "log_dict")


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def logging_muted(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside the block: instance attributes shadow the methods and are
    removed after (or the user's own instance attributes put back), also when an exception passes."""
    saved = {name: pl_module.__dict__[name] for name in _LOGGING if name in pl_module.__dict__}
    for name in _LOGGING:
        pl_module.__dict__[name] = _no_log
    try:
        yield
    finally:
        for name in _LOGGING:
            if name in saved:
                pl_module.__dict__[name] = saved[name]
            else:
                pl_module.__dict__.pop(name, None)


def muted_training_step(pl_module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> Any:
    """``pl_module.training_step(batch, batch_idx)`` with logging muted; returns what it returns."""
    with logging_muted(pl_module):
        return pl_module.training_step(batch, batch_idx)
