"""Which modules the monitor watches: every normalization, conv and linear layer, or a selection by class or glob."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_bn.layers import FrozenBatchNorm, is_batch_norm, tracks_running_stats

__all__ = ["Selector", "NORM_TYPES", "DEFAULT_WATCH_TYPES", "is_norm", "has_batch_stats", "select_modules"]

Selector = Sequence[type | str]

# Torch's normalization bases and ours that do not derive from them; our other layers subclass torch's.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm, FrozenBatchNorm,
)
DEFAULT_WATCH_TYPES: tuple[type[nn.Module], ...] = NORM_TYPES + (_ConvNd, nn.Linear)


def is_norm(module: nn.Module) -> bool:
    """True for a normalization layer (torch's or this package's): its inputs are watched too."""
    return isinstance(module, NORM_TYPES)


def has_batch_stats(module: nn.Module) -> bool:
    """True for a batch-norm layer with running statistics to compare its batches with."""
    return is_batch_norm(module) and tracks_running_stats(module)


def _check_selector(arg: str, selector: Selector | type | str | None) -> list[type | str] | None:
    if selector is None:
        return None
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    for item in items:
        if isinstance(item, str):
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        raise TypeError(
            f"`{arg}` takes nn.Module classes and module-name globs (str), e.g. [nn.Conv2d, 'layer1.*'], "
            f"got {item!r} in {selector!r}"
        )
    return items


def _matches(items: list[type | str], name: str, module: nn.Module) -> bool:
    for item in items:
        if isinstance(item, type):
            if isinstance(module, item):
                return True
        elif fnmatch.fnmatchcase(name, item):
            return True
    return False


def select_modules(
    model: nn.Module, include: Selector | type | str | None = None, exclude: Selector | type | str | None = None
) -> list[tuple[str, nn.Module]]:
    """The watched modules of ``model`` as ``(name, module)`` in registration order.

    Args:
        model: the model.
        include: classes and module-name globs (``fnmatch``, e.g. ``"layer1.*"``); a module is watched when it
            matches any. Default: every normalization, conv and linear layer.
        exclude: classes and globs of modules not to watch, applied after ``include``.

    Raises:
        TypeError: an entry of ``include`` or ``exclude`` is neither a module class nor a str.
    """
    inc = _check_selector("include", include)
    exc = _check_selector("exclude", exclude)
    chosen = []
    for name, module in model.named_modules():
        if not name:
            if inc is None or not any(isinstance(i, type) and isinstance(model, i) for i in inc):
                continue  # the root is watched only when the user names its class
        if inc is None:
            if not isinstance(module, DEFAULT_WATCH_TYPES):
                continue
        elif not _matches(inc, name, module):
            continue
        if exc is not None and _matches(exc, name, module):
            continue
        chosen.append((name, module))
    return chosen
