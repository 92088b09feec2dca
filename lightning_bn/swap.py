"""Find, swap and insert normalization layers in a model (pure PyTorch, no Lightning).

* :func:`describe_norm` says what a module is (kind, layout, channels) or None when it is not a norm layer the
  package can convert.
* :func:`swap_norms` replaces selected norm layers in place with layers of another kind built by the registry.
* :func:`insert_norms` adds a norm on the output of each selected conv/linear layer of a model without one.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_bn import layers as L
from lightning_bn.layers import CHANNELS_FIRST, CHANNELS_LAST, build_norm, check_options, normalize_kind
from lightning_bn.layers._layout import check_layout

__all__ = [
    "NormInfo",
    "SwapRecord",
    "SwapReport",
    "declare_norm_layout",
    "describe_norm",
    "find_norms",
    "insert_norms",
    "swap_norms",
    "format_report",
    "replace_modules",
    "DEFAULT_INSERT_AFTER",
]

Selector = str | type | Sequence[str | type] | None

DEFAULT_INSERT_AFTER: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class NormInfo:
    """What a normalization layer is: its kind, input layout, channels and (for channels-first) spatial dims."""

    kind: str
    layout: str
    num_features: int
    dims: int | None = None


def _batch_dims(m: nn.Module) -> int | None:
    return {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(m))  # type: ignore[arg-type]


def _instance_dims(m: nn.Module) -> int | None:
    return {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(m))  # type: ignore[arg-type]


def _one_dim(shape: Sequence[int]) -> int | None:
    return int(shape[0]) if len(shape) == 1 else None


# Known classes, most derived first. Each entry: class -> function giving NormInfo (None if not convertible).
_KNOWN: list[tuple[type[nn.Module], Any]] = [
    (L.FrozenBatchNorm, lambda m: NormInfo("frozen_batch", m.layout, m.num_features)),
    (L.SyncBatchNorm, lambda m: NormInfo("sync_batch", m.layout, m.num_features)),
    (L.BatchRenorm, lambda m: NormInfo("batch_renorm", m.layout, m.num_features)),
    (L.GhostBatchNorm, lambda m: NormInfo("ghost_batch", m.layout, m.num_features)),
    (L.BatchNormChannelsLast, lambda m: NormInfo("batch", CHANNELS_LAST, m.num_features)),
    (L.BatchNormNd, lambda m: NormInfo("batch", CHANNELS_FIRST, m.num_features)),
    (nn.SyncBatchNorm, lambda m: NormInfo("sync_batch", CHANNELS_FIRST, m.num_features)),
    (nn.BatchNorm1d, lambda m: NormInfo("batch", CHANNELS_FIRST, m.num_features, 1)),
    (nn.BatchNorm2d, lambda m: NormInfo("batch", CHANNELS_FIRST, m.num_features, 2)),
    (nn.BatchNorm3d, lambda m: NormInfo("batch", CHANNELS_FIRST, m.num_features, 3)),
    (_BatchNorm, lambda m: NormInfo("batch", CHANNELS_FIRST, m.num_features)),  # e.g. Lightning's _BatchNormXd
    (L.GroupNormChannelsLast, lambda m: NormInfo("group", CHANNELS_LAST, m.num_channels)),
    (nn.GroupNorm, lambda m: NormInfo("group", CHANNELS_FIRST, m.num_channels)),
    (L.LayerNormChannelsFirst, lambda m: NormInfo("layer", CHANNELS_FIRST, m.normalized_shape[0])),
    (nn.LayerNorm, lambda m: _one_dim(m.normalized_shape) and NormInfo("layer", CHANNELS_LAST, m.normalized_shape[0])),
    (L.RMSNormChannelsFirst, lambda m: NormInfo("rms", CHANNELS_FIRST, m.normalized_shape[0])),
    (nn.RMSNorm, lambda m: _one_dim(m.normalized_shape) and NormInfo("rms", CHANNELS_LAST, m.normalized_shape[0])),
    (L.InstanceNormChannelsLast, lambda m: NormInfo("instance", CHANNELS_LAST, m.num_features)),
    (L.InstanceNormNd, lambda m: NormInfo("instance", CHANNELS_FIRST, m.num_features)),
    (_InstanceNorm, lambda m: NormInfo("instance", CHANNELS_FIRST, m.num_features, _instance_dims(m))),
]

# Classes whose layout the user declared (subclasses with a forward of their own).
_DECLARED: dict[type[nn.Module], str] = {}


def register_known_norm(cls: type[nn.Module], info: Any) -> None:
    """Teach :func:`describe_norm` a class: ``info(module) -> NormInfo``. Used by the package's own extra kinds."""
    _KNOWN.insert(0, (cls, info))


def declare_norm_layout(cls: type[nn.Module], layout: str) -> None:
    """Declare the input layout of a norm subclass that has its own ``forward``, so it can be swapped.

    Example: a ``LayerNorm`` subclass that permutes a channels-first input itself is
    ``declare_norm_layout(MyLayerNorm2d, "channels_first")``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module subclass, got {cls!r}")
    _DECLARED[cls] = check_layout(layout)


def _known_base(cls: type) -> tuple[type[nn.Module], Any] | None:
    for base, info in _KNOWN:
        if issubclass(cls, base):
            return base, info
    return None


def describe_norm(module: nn.Module, *, warn: bool = False) -> NormInfo | None:
    """What ``module`` is as a normalization layer, or None.

    A subclass of a known norm whose ``forward`` is its own is described only when its layout is known (declared
    with :func:`declare_norm_layout`); otherwise None, with a warning naming the class when ``warn`` is true.
    """
    found = _known_base(type(module))
    if found is None:
        return None
    base, info_fn = found
    own_forward = type(module).forward is not base.forward
    if own_forward and not any(type(module) is b for b, _ in _KNOWN):
        declared = next((lay for cls, lay in _DECLARED.items() if isinstance(module, cls)), None)
        if declared is None:
            if warn:
                warnings.warn(
                    f"Skipping {type(module).__qualname__}: it subclasses {base.__name__} with a forward of its own, "
                    f"so its input layout is unknown. Declare it with "
                    f"`lightning_bn.swap.declare_norm_layout({type(module).__name__}, 'channels_first' or "
                    f"'channels_last')` to convert it.",
                    UserWarning,
                    stacklevel=3,
                )
            return None
        base_info = info_fn(module)
        if not base_info:
            return None
        return NormInfo(base_info.kind, declared, base_info.num_features, base_info.dims)
    return info_fn(module) or None


def find_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module, NormInfo]]:
    """Every convertible norm layer in ``model`` as ``(name, module, info)``, in registration order."""
    for name, module in model.named_modules():
        info = describe_norm(module)
        if info is not None:
            yield name, module, info


@dataclass
class SwapRecord:
    """One replaced (or inserted) layer: its qualified name(s), the old layer and the new one."""

    name: str
    old: nn.Module | None
    new: nn.Module
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        old = type(self.old).__name__ if self.old is not None else "-"
        return f"{self.name or '<root>'}: {old} -> {type(self.new).__name__}"


@dataclass
class SwapReport(list):  # type: ignore[type-arg]
    """A list of :class:`SwapRecord` with the resulting root module in ``model``.

    ``model`` is the module passed in, except when that module was itself a norm layer: it cannot be replaced in the
    caller's variable, so the new layer is returned here (``model = swap_norms(model, "group").model``).
    """

    model: nn.Module = field(default_factory=nn.Identity)

    def __init__(self, records: Iterable[SwapRecord] = (), model: nn.Module | None = None) -> None:
        super().__init__(records)
        self.model = model if model is not None else nn.Identity()

    def __repr__(self) -> str:
        return f"SwapReport({len(self)} layers)"


def format_report(records: Sequence[SwapRecord]) -> str:
    """A plain-text table of a swap: layer, old class, new class, parameters before and after."""
    rows = [("layer", "was", "now", "params was", "params now")]
    for r in records:
        old_params = sum(p.numel() for p in r.old.parameters(recurse=False)) if r.old is not None else 0
        rows.append((
            r.name or "<root>",
            type(r.old).__name__ if r.old is not None else "-",
            type(r.new).__name__,
            str(old_params),
            str(sum(p.numel() for p in r.new.parameters(recurse=False))),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _as_list(selector: Selector) -> list[str | type]:
    if selector is None:
        return []
    if isinstance(selector, (str, type)):
        return [selector]
    return list(selector)


def _check_selector(arg: str, selector: Selector) -> list[str | type]:
    items = _as_list(selector)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(f"`{arg}` takes module-name globs (str) or classes, got {item!r}")
    return items


def _matches(item: str | type, names: Sequence[str], module: nn.Module) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    return any(fnmatch.fnmatchcase(n, item) for n in names)


def _select(
    candidates: list[tuple[list[str], nn.Module]], include: list[str | type], exclude: list[str | type]
) -> list[tuple[list[str], nn.Module]]:
    """Filter by include/exclude, warning about patterns that matched nothing."""
    used: set[int] = set()
    chosen = []
    for names, module in candidates:
        inc = [i for i, item in enumerate(include) if _matches(item, names, module)]
        exc = [i for i, item in enumerate(exclude) if _matches(item, names, module)]
        used.update(inc)
        used.update(len(include) + i for i in exc)
        if (not include or inc) and not exc:
            chosen.append((names, module))
    for i, item in enumerate(include + exclude):
        if i not in used:
            arg = "include" if i < len(include) else "exclude"
            warnings.warn(f"`{arg}` pattern {item!r} matched no candidate layer", UserWarning, stacklevel=3)
    return chosen


def _all_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _placed_like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on the device and in the floating dtype of ``old`` (where it has tensors), in its training mode."""
    device, dtype = _device_dtype(old)
    if device is not None:
        new = new.to(device=device, dtype=dtype)
    return new.train(old.training)


def _inherited_options(old: nn.Module, kind: str) -> dict[str, Any]:
    """Settings of the old layer that the new kind takes too (eps, momentum, affine)."""
    from lightning_bn.layers import kind_options

    allowed = kind_options(kind) or set()
    found: dict[str, Any] = {}
    eps = getattr(old, "eps", None)
    if "eps" in allowed and isinstance(eps, float):
        found["eps"] = eps
    momentum = getattr(old, "momentum", None)
    if "momentum" in allowed and isinstance(old, _BatchNorm):
        found["momentum"] = momentum
    if "affine" in allowed:
        affine = getattr(old, "affine", getattr(old, "elementwise_affine", None))
        if isinstance(affine, bool):
            found["affine"] = affine
    return found


def _copy_state(old: nn.Module, new: nn.Module) -> None:
    """Affine weight and bias when shapes match; running statistics between batch-norm kinds."""
    with torch.no_grad():
        for pname in ("weight", "bias"):
            src, dst = getattr(old, pname, None), getattr(new, pname, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                # A frozen affine parameter stays frozen; a frozen batch norm keeps the trainability it was built with.
                if isinstance(dst, nn.Parameter) and not isinstance(new, L.FrozenBatchNorm):
                    dst.requires_grad_(src.requires_grad)
        for bname in ("running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(old, bname, None), getattr(new, bname, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)


def _build_like(old: nn.Module, info: NormInfo, kind: str, options: dict[str, Any], name: str) -> nn.Module:
    opts = {**_inherited_options(old, kind), **options}
    try:
        new = build_norm(kind, info.num_features, layout=info.layout, dims=info.dims, **opts)
    except ValueError as err:
        raise ValueError(
            f"cannot swap layer {name or '<root>'!r} ({type(old).__name__}, {info.num_features} channels) "
            f"to {kind!r}: {err}"
        ) from err
    new = _placed_like(new, old)
    _copy_state(old, new)
    return new


def replace_modules(model: nn.Module, replacements: Mapping[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(module)]`` in every place a module sits in ``model``; returns the resulting root.

    Every (parent, attribute) edge is visited, so a module used at several places is replaced at all of them by the
    same new module. ``model`` itself cannot be replaced in the caller's variable: when it is among the modules
    replaced, its replacement is returned (otherwise ``model``). The new modules are not walked into.
    """
    if replacements:
        for parent in list(model.modules()):
            for attr, child in list(parent._modules.items()):
                if child is not None and id(child) in replacements:
                    parent.add_module(attr, replacements[id(child)])
    return replacements.get(id(model), model)


def _checked_kind(model: Any, kind: str, options: dict[str, Any]) -> str:
    """The registry name of ``kind``, once ``model`` is a module and ``options`` are options ``kind`` takes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    kind = normalize_kind(kind)
    check_options(kind, options)
    return kind


def swap_norms(
    model: nn.Module, to: str, *, include: Selector = None, exclude: Selector = None, **options: Any
) -> SwapReport:
    """Replace normalization layers of ``model`` in place with layers of kind ``to``.

    Every norm layer :func:`describe_norm` knows (torch's BatchNorm1d/2d/3d, SyncBatchNorm, GroupNorm, LayerNorm,
    InstanceNorm1d/2d/3d, RMSNorm and this package's layers) is a candidate; ``include``/``exclude`` select by
    module-name glob (``"layer1.*"``) or class. The new layer keeps the input layout, device, dtype and training
    mode; it inherits ``eps``, ``momentum`` and ``affine`` where the new kind takes them (``options`` override);
    affine weight and bias are copied when shapes match; running statistics are copied between batch-norm kinds.
    A module used at several places is replaced by one new module at all of them. Layers already of kind ``to``
    are left alone when no options are given, so a second call changes nothing.

    If ``model`` itself is a norm layer it cannot be replaced in the caller's variable: the new layer is the
    returned report's ``model`` (and the record named ``""``).

    Args:
        model: the module to change in place.
        to: the target kind (see :func:`lightning_bn.available_norms`).
        include: globs or classes; only matching layers are swapped (default: all).
        exclude: globs or classes; matching layers are left alone.
        options: options of the target kind (``num_groups=8``, ``virtual_batch_size=16`` ...).

    Returns:
        A :class:`SwapReport`: one :class:`SwapRecord` per replaced layer, and the resulting root in ``.model``.

    Raises:
        ValueError: unknown kind (lists the kinds), options the kind does not take (names them), or a layer the
            kind cannot be built for (names the layer, its channels and the bad option, e.g. ``num_groups``).
    """
    kind = _checked_kind(model, to, options)
    include_l, exclude_l = _check_selector("include", include), _check_selector("exclude", exclude)

    names = _all_names(model)
    candidates: list[tuple[list[str], nn.Module]] = []
    seen: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        if describe_norm(module, warn=True) is not None:
            candidates.append((names[id(module)], module))
    if not candidates:
        warnings.warn(f"{type(model).__name__} has no normalization layer to swap; nothing changed", UserWarning,
                      stacklevel=2)
        return SwapReport([], model)

    chosen = _select(candidates, include_l, exclude_l)
    # Build everything first: a bad option on any layer raises before the model is touched.
    mapping: dict[int, nn.Module] = {}
    records: list[SwapRecord] = []
    for module_names, module in chosen:
        info = describe_norm(module)
        assert info is not None
        if info.kind == kind and not options:
            continue
        new = _build_like(module, info, kind, options, module_names[0])
        mapping[id(module)] = new
        records.append(SwapRecord(module_names[0], module, new, tuple(module_names[1:])))
    return SwapReport(records, replace_modules(model, mapping))


class _InsertedNorm:
    """Forward hook that passes a layer's output through the norm registered on it as the child ``norm``."""

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        norm: nn.Module = module.get_submodule("norm")
        return norm(output)


def _inserted_norm(module: nn.Module) -> nn.Module | None:
    norm = module._modules.get("norm") if hasattr(module, "_modules") else None
    hooks = getattr(module, "_forward_hooks", {})
    return norm if norm is not None and any(isinstance(h, _InsertedNorm) for h in hooks.values()) else None


def _out_features(module: nn.Module) -> tuple[int, str, int | None] | None:
    if isinstance(module, nn.Linear):
        return module.out_features, CHANNELS_LAST, None
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d)):
        return module.out_channels, CHANNELS_FIRST, len(module.kernel_size)
    return None


def insert_norms(
    model: nn.Module,
    kind: str = "batch",
    *,
    after: Sequence[type[nn.Module]] = DEFAULT_INSERT_AFTER,
    include: Selector = None,
    exclude: Selector = None,
    **options: Any,
) -> SwapReport:
    """Add a norm of ``kind`` on the output of each selected layer, for models that have none.

    The norm is registered as a child named ``norm`` of the layer it follows (so existing ``state_dict`` keys keep
    their names and the new ones are ``<layer>.norm.*``) and applied by a forward hook, so it sits between the layer
    and the activation that follows it. Conv outputs are channels-first; linear outputs ``(N, *, C)`` are
    channels-last. The last selected layer in registration order is taken as the one producing the model's output
    and is left alone unless ``include`` names it. A layer that already has an inserted norm is skipped.

    Returns:
        A :class:`SwapReport` whose records name each layer that got a norm (``old`` is None, ``new`` the norm).
    """
    kind = _checked_kind(model, kind, options)
    after_t = tuple(after)
    if not after_t or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in after_t):
        raise TypeError(f"`after` must be a sequence of nn.Module classes, got {after!r}")
    include_l, exclude_l = _check_selector("include", include), _check_selector("exclude", exclude)
    names = _all_names(model)
    candidates = []
    seen: set[int] = set()
    for _, module in model.named_modules():
        if id(module) not in seen and isinstance(module, after_t) and _out_features(module) is not None:
            seen.add(id(module))
            candidates.append((names[id(module)], module))
    if not candidates:
        warnings.warn(f"{type(model).__name__} has no layer of {[c.__name__ for c in after_t]}; nothing changed",
                      UserWarning, stacklevel=2)
        return SwapReport([], model)
    output_layer = candidates[-1][1]
    named_explicitly = any(isinstance(i, str) and not any(ch in i for ch in "*?[") for i in include_l)
    chosen = _select(candidates, include_l, exclude_l)
    built: list[tuple[nn.Module, nn.Module, list[str]]] = []
    for module_names, module in chosen:
        if _inserted_norm(module) is not None:
            continue
        if module is output_layer and not (named_explicitly and _matches_exact(include_l, module_names)):
            continue
        out = _out_features(module)
        assert out is not None
        channels, layout, dims = out
        try:
            norm = build_norm(kind, channels, layout=layout, dims=dims, **options)
        except ValueError as err:
            raise ValueError(
                f"cannot insert {kind!r} after layer {module_names[0]!r} ({channels} channels): {err}"
            ) from err
        built.append((module, _placed_like(norm, module), module_names))
    records = []
    for module, norm, module_names in built:
        module.add_module("norm", norm)
        module.register_forward_hook(_InsertedNorm())
        records.append(SwapRecord(module_names[0], None, norm, tuple(module_names[1:])))
    return SwapReport(records, model)


def _matches_exact(include: list[str | type], names: Sequence[str]) -> bool:
    return any(isinstance(i, str) and i in names for i in include)
