"""The one registry of normalization kinds: names to factories, ``build_norm`` and ``register_norm``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_bn._checks import check_positive_int
from lightning_bn.layers._batch import BatchNormChannelsLast, BatchNormNd, BatchRenorm, FrozenBatchNorm, GhostBatchNorm
from lightning_bn.layers._channel import (
    GroupNormChannelsLast,
    InstanceNormChannelsLast,
    InstanceNormNd,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
)
from lightning_bn.layers._layout import CHANNELS_FIRST, CHANNELS_LAST, LAYOUTS, check_layout
from lightning_bn.layers._power import PowerNorm
from lightning_bn.layers._sync import SyncBatchNorm

__all__ = ["build_norm", "register_norm", "available_norms", "normalize_kind", "NormFactory", "registered_classes"]

# A factory is called as factory(num_features, layout=..., dims=..., **options) and returns a module.
NormFactory = Callable[..., nn.Module]

_BATCH_FIRST = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_FIRST = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _batch(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, momentum: float | None = 0.1,
    affine: bool = True, track_running_stats: bool = True,
) -> nn.Module:
    cls = BatchNormChannelsLast if layout == CHANNELS_LAST else _BATCH_FIRST.get(dims or 0, BatchNormNd)
    return cls(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)


def _sync_batch(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, momentum: float | None = 0.1,
    affine: bool = True, track_running_stats: bool = True, process_group: Any = None,
) -> nn.Module:
    return SyncBatchNorm(
        num_features, eps, momentum, affine, track_running_stats, process_group=process_group, layout=layout
    )


def default_num_groups(num_channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``num_channels`` that is at most ``max_groups`` (32 as in Wu & He, 2018)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def _group(
    num_features: int, layout: str, dims: int | None, num_groups: int | None = None, eps: float = 1e-5,
    affine: bool = True,
) -> nn.Module:
    groups = default_num_groups(num_features) if num_groups is None else int(num_groups)
    if groups < 1 or num_features % groups:
        raise ValueError(
            f"`num_groups`={num_groups} must be a positive divisor of the {num_features} channels "
            f"(divisors: {[g for g in range(1, num_features + 1) if num_features % g == 0]})"
        )
    cls = GroupNormChannelsLast if layout == CHANNELS_LAST else nn.GroupNorm
    return cls(groups, num_features, eps=eps, affine=affine)


def _layer(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, affine: bool = True, bias: bool = True,
) -> nn.Module:
    cls = nn.LayerNorm if layout == CHANNELS_LAST else LayerNormChannelsFirst
    return cls(num_features, eps=eps, elementwise_affine=affine, bias=bias)


def _instance(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, momentum: float | None = 0.1,
    affine: bool = True, track_running_stats: bool = False,
) -> nn.Module:
    if layout == CHANNELS_LAST:
        cls: type[nn.Module] = InstanceNormChannelsLast
    else:
        cls = _INSTANCE_FIRST.get(dims or 0, InstanceNormNd)
    return cls(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)


def _rms(num_features: int, layout: str, dims: int | None, eps: float | None = None, affine: bool = True) -> nn.Module:
    cls = nn.RMSNorm if layout == CHANNELS_LAST else RMSNormChannelsFirst
    return cls(num_features, eps=eps, elementwise_affine=affine)


def _batch_renorm(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, momentum: float | None = 0.1,
    affine: bool = True, rmax: float = 3.0, dmax: float = 5.0, warmup_steps: int = 5000,
) -> nn.Module:
    return BatchRenorm(num_features, eps, momentum, affine, rmax, dmax, warmup_steps, layout=layout)


def _ghost_batch(
    num_features: int, layout: str, dims: int | None, virtual_batch_size: int = 32, eps: float = 1e-5,
    momentum: float | None = 0.1, affine: bool = True,
) -> nn.Module:
    return GhostBatchNorm(num_features, virtual_batch_size, eps, momentum, affine, layout=layout)


def _frozen_batch(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, affine: bool = True,
    trainable_affine: bool = False,
) -> nn.Module:
    return FrozenBatchNorm(num_features, eps, affine, trainable_affine, layout=layout)


def _power(
    num_features: int, layout: str, dims: int | None, eps: float = 1e-5, alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9, affine: bool = True, warmup_iters: int = 10000, num_groups: int = 1,
) -> nn.Module:
    return PowerNorm(num_features, eps, alpha_fwd, alpha_bkw, affine, warmup_iters, num_groups, layout=layout)


def _none(num_features: int, layout: str, dims: int | None) -> nn.Module:
    return nn.Identity()


_REGISTRY: dict[str, NormFactory] = {
    "batch": _batch,
    "sync_batch": _sync_batch,
    "group": _group,
    "layer": _layer,
    "instance": _instance,
    "rms": _rms,
    "batch_renorm": _batch_renorm,
    "ghost_batch": _ghost_batch,
    "frozen_batch": _frozen_batch,
    "power": _power,
    "none": _none,
}
_BUILT_IN = frozenset(_REGISTRY)

# The classes that registered (user) kinds build, by layout: class -> {layout: kind}. The taxonomy describes their
# instances as that kind (lightning_bn.taxonomy.describe_norm), after its own tables.
_BUILT_CLASSES: dict[type, dict[str, str]] = {}
# Containers and identities are never a kind's class: a factory returning Sequential(norm, act) teaches nothing.
_NOT_A_NORM_CLASS = (nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def registered_classes() -> dict[type, dict[str, str]]:
    """The classes registered kinds have built, with the kind per layout (read by the taxonomy)."""
    return _BUILT_CLASSES


def _record_class(kind: str, layout: str, module: Any) -> None:
    if kind in _BUILT_IN or not isinstance(module, nn.Module) or isinstance(module, _NOT_A_NORM_CLASS):
        return
    by_layout = _BUILT_CLASSES.setdefault(type(module), {})
    if by_layout.get(layout) != kind:
        by_layout[layout] = kind
        _forget_descriptions()


def _forget_descriptions() -> None:
    from lightning_bn.taxonomy import clear_caches  # the taxonomy imports this module: import when it is loaded

    clear_caches()


def normalize_kind(kind: str) -> str:
    """``"Batch-Renorm"`` -> ``"batch_renorm"``; raises ValueError listing the kinds for an unknown one."""
    if not isinstance(kind, str):
        raise TypeError(f"`kind` must be a str naming a norm kind ({', '.join(available_norms())}), got {kind!r}")
    key = kind.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"Unknown norm kind {kind!r}: the kinds are {', '.join(available_norms())}")
    return key


def available_norms() -> list[str]:
    """Names of the registered kinds, built-in first."""
    return list(_REGISTRY)


def register_norm(name: str, factory: NormFactory, *, overwrite: bool = False) -> None:
    """Add a user kind: ``factory(num_features, layout=..., dims=..., **options) -> nn.Module``.

    ``layout`` is ``"channels_first"`` or ``"channels_last"``; ``dims`` is the number of spatial dimensions when
    known (1, 2, 3) or None. The factory's keyword parameters are the options the kind takes.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`name` must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"`factory` must be callable, got {factory!r}")
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"norm kind {key!r} is already registered; pass overwrite=True to replace it")
    if key in _BUILT_IN:
        raise ValueError(f"norm kind {key!r} is built in and cannot be replaced; register it under another name")
    _forget_kind(key)
    _REGISTRY[key] = factory
    # Teach the taxonomy the classes the kind builds: one layer per layout, 8 channels, default options (a factory
    # that needs options or rejects a layout is learnt from the layers build_norm builds with it later).
    for layout in LAYOUTS:
        try:
            sample = factory(8, layout=layout, dims=None)
        except Exception:  # noqa: BLE001 - the factory's own business; nothing is recorded for this layout
            continue
        _record_class(key, layout, sample)


def _forget_kind(key: str) -> None:
    for cls in [c for c, by_layout in _BUILT_CLASSES.items() if key in by_layout.values()]:
        kept = {lay: k for lay, k in _BUILT_CLASSES[cls].items() if k != key}
        if kept:
            _BUILT_CLASSES[cls] = kept
        else:
            del _BUILT_CLASSES[cls]
    _forget_descriptions()


def unregister_norm(name: str) -> None:
    """Remove a kind added with :func:`register_norm` (and what the taxonomy learnt of its classes)."""
    key = normalize_kind(name)
    if key in _BUILT_IN:
        raise ValueError(f"norm kind {key!r} is built in and cannot be removed")
    _REGISTRY.pop(key)
    _forget_kind(key)


def kind_options(kind: str) -> set[str] | None:
    """The option names ``kind`` accepts (None when its factory takes ``**kwargs``)."""
    params = inspect.signature(_REGISTRY[normalize_kind(kind)]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in list(params)[1:] if n not in ("layout", "dims")}


def check_options(kind: str, options: dict[str, Any]) -> None:
    """Raise ValueError naming the options ``kind`` does not take."""
    allowed = kind_options(kind)
    if allowed is None:
        return
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"norm kind {normalize_kind(kind)!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(allowed)) or 'no options'}"
        )


def build_norm(
    kind: str | NormFactory, num_features: int, layout: str = CHANNELS_FIRST, dims: int | None = None, **options: Any
) -> nn.Module:
    """Build a normalization layer of ``kind`` for ``num_features`` channels.

    Args:
        kind: a registered name (see :func:`available_norms`) or a factory/class called as
            ``kind(num_features, **options)``.
        num_features: the number of channels ``C``.
        layout: ``"channels_first"`` for ``(N, C, *)`` (conv nets) or ``"channels_last"`` for ``(N, *, C)``
            (transformer tokens).
        dims: spatial dimensions of channels-first input when known (1, 2, 3): picks ``BatchNorm2d`` over the
            any-dimensional ``BatchNormNd``, for example.
        options: the kind's own options (``num_groups``, ``eps``, ``momentum``, ``virtual_batch_size`` ...).

    Raises:
        ValueError: an unknown kind (the message lists the kinds), a bad layout, options the kind does not take,
            or a bad option value.
    """
    check_layout(layout)
    check_positive_int("num_features", num_features)
    if dims is not None and dims not in (1, 2, 3):
        raise ValueError(f"`dims` must be 1, 2, 3 or None, got {dims!r}")
    if callable(kind) and not isinstance(kind, str):
        return kind(num_features, **options)
    check_options(kind, options)
    key = normalize_kind(kind)
    module = _REGISTRY[key](num_features, layout=layout, dims=dims, **options)
    _record_class(key, layout, module)
    return module


__all__ += ["CHANNELS_FIRST", "CHANNELS_LAST", "kind_options", "check_options", "unregister_norm", "default_num_groups"]
