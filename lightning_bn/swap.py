"""Find, swap and insert normalization layers in a model (pure PyTorch, no Lightning).

* :func:`describe_norm` (from :mod:`lightning_bn.taxonomy`) says what a module is as a norm layer (kind, layout,
  channels, effective scale and shift, eps, batch statistics), or None.
* :func:`swap_norms` replaces selected norm layers in place with layers of another kind built by the registry.
* :func:`insert_norms` adds a norm on the output of each selected conv/linear layer of a model without one.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_bn.layers import FrozenBatchNorm, build_norm, check_options, kind_options, normalize_kind
from lightning_bn.taxonomy import (
    NormInfo,
    declare_norm_layout,
    describe_norm,
    find_norms,
    unrecognized_reason,
    weight_layer_output,
)

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


def _class_names(module: nn.Module | None) -> str:
    """``BatchNorm2d``, or ``Sequential(BatchNorm2d, SiLU)`` for a norm kept with the activation after it."""
    if module is None:
        return "-"
    if type(module) is nn.Sequential:
        return f"Sequential({', '.join(type(m).__name__ for m in module)})"
    return type(module).__name__


@dataclass
class SwapRecord:
    """One replaced (or inserted) layer: its qualified name(s), the old layer and the new one."""

    name: str
    old: nn.Module | None
    new: nn.Module
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name or '<root>'}: {_class_names(self.old)} -> {_class_names(self.new)}"


@dataclass
class SwapReport(list):  # type: ignore[type-arg]
    """A list of :class:`SwapRecord` with the resulting root module in ``model``.

    ``model`` is the module passed in, except when that module was itself a norm layer: it cannot be replaced in the
    caller's variable, so the new layer is returned here (``model = swap_norms(model, "group").model``).
    ``skipped`` names the selected layers left as they were, with the reason: already the exact class the kind
    builds, or looking like a norm the taxonomy does not recognize.
    """

    model: nn.Module = field(default_factory=nn.Identity)
    skipped: dict[str, str] = field(default_factory=dict)

    def __init__(
        self, records: Iterable[SwapRecord] = (), model: nn.Module | None = None, skipped: dict[str, str] | None = None
    ) -> None:
        super().__init__(records)
        self.model = model if model is not None else nn.Identity()
        self.skipped = dict(skipped or {})

    def __repr__(self) -> str:
        return f"SwapReport({len(self)} layers, {len(self.skipped)} left as they were)"


def format_report(records: Sequence[SwapRecord]) -> str:
    """A plain-text table of a swap: layer, old class, new class, parameters before and after; then the layers left
    as they were (a :class:`SwapReport`'s ``skipped``) with the reason."""
    rows = [("layer", "was", "now", "params was", "params now")]
    for r in records:
        old_params = sum(p.numel() for p in r.old.parameters()) if r.old is not None else 0
        rows.append((
            r.name or "<root>",
            _class_names(r.old),
            _class_names(r.new),
            str(old_params),
            str(sum(p.numel() for p in r.new.parameters())),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    skipped = getattr(records, "skipped", {})
    if skipped:
        lines.append(f"left as they were ({len(skipped)}):")
        lines += [f"  {name or '<root>'}: {reason}" for name, reason in skipped.items()]
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


def _inherited_options(old: nn.Module, info: NormInfo, kind: str) -> dict[str, Any]:
    """Settings of the old layer that the new kind takes too: eps, affine (and bias), and between batch-norm kinds
    momentum and track_running_stats."""
    from lightning_bn.taxonomy import BATCH_STAT_KINDS

    allowed = kind_options(kind) or set()
    found: dict[str, Any] = {}
    if "eps" in allowed and info.eps is not None:
        found["eps"] = info.eps
    if "affine" in allowed:
        found["affine"] = info.affine
    if "bias" in allowed and info.affine:
        found["bias"] = info.shift is not None
    if info.batch_stats and kind in BATCH_STAT_KINDS:
        momentum = getattr(old, "momentum", 0.1)
        if "momentum" in allowed and (momentum is None or isinstance(momentum, float)):
            found["momentum"] = momentum
        if "track_running_stats" in allowed:
            found["track_running_stats"] = info.running_stats
    return found


def _copy_state(old: nn.Module, info: NormInfo, new: nn.Module) -> list[str]:
    """The effective scale and shift when shapes match (``1 + weight`` becomes the new weight); running statistics
    between batch-norm kinds. Returns what could not be carried: ``"shift"`` when the old layer's shift is not zero
    and the new layer has no bias, ``"scale"`` likewise for a scale that is not one."""
    lost = []
    for source, target_name, neutral, what in ((info.scale, "weight", 1.0, "scale"),
                                               (info.shift, "bias", 0.0, "shift")):
        target = getattr(new, target_name, None)
        if isinstance(source, torch.Tensor) and not isinstance(target, torch.Tensor):
            if not isinstance(new, nn.Identity) and not _all_equal(source, neutral):
                lost.append(what)
    with torch.no_grad():
        for source, source_name, target_name in ((info.scale, info.scale_name, "weight"),
                                                 (info.shift, info.shift_name, "bias")):
            target = getattr(new, target_name, None)
            if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor) and source.shape == target.shape:
                target.copy_(source)
                # A frozen affine parameter stays frozen; a frozen batch norm keeps the trainability it was built with.
                param = getattr(old, source_name, None) if source_name else None
                if isinstance(target, nn.Parameter) and isinstance(param, torch.Tensor) and not isinstance(
                    new, FrozenBatchNorm
                ):
                    target.requires_grad_(param.requires_grad)
        for bname in ("running_mean", "running_var", "num_batches_tracked"):
            src, dst = getattr(old, bname, None), getattr(new, bname, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
    return lost


def _all_equal(t: torch.Tensor, value: float) -> bool:
    if t.device.type == "meta":
        return True  # no values yet: nothing is lost
    return bool((t.detach() == value).all())


def _build_like(
    old: nn.Module, info: NormInfo, kind: str, options: dict[str, Any], name: str, lost: dict[str, list[str]]
) -> nn.Module:
    opts = {**_inherited_options(old, info, kind), **options}
    try:
        new = build_norm(kind, info.num_features, layout=info.layout, dims=info.dims, **opts)
    except ValueError as err:
        raise ValueError(
            f"cannot swap layer {name or '<root>'!r} ({type(old).__name__}, {info.num_features} channels) "
            f"to {kind!r}: {err}"
        ) from err
    new = _placed_like(new, old)
    for what in _copy_state(old, info, new):
        lost.setdefault(what, []).append(name or "<root>")
    return new


def _sharded_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters and buffers that are DTensors (sharded by ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return []
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [name for name, t in own if isinstance(t, DTensor)]


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

    Every layer the taxonomy recognizes (:func:`lightning_bn.describe_norm`: torch's and this package's norms,
    known timm, torchvision and Hugging Face classes, classes of registered kinds, and third-party norms the probe
    classifies by what they compute) is a candidate; ``include``/``exclude`` select by module-name glob
    (``"layer1.*"``) or class. A module that looks like a norm but is not recognized is left alone with a warning
    naming its class.

    The new layer keeps the input layout, device, dtype and training mode; it inherits ``eps``, ``affine`` (and
    whether there is a bias) and, between batch-norm kinds, ``momentum`` and ``track_running_stats``, where the new
    kind takes them (``options`` override); it gets the old layer's effective scale and shift when shapes match
    (a layer that scales by ``1 + weight``, as Gemma's, gives ``1 + weight`` as the new weight) and, between
    batch-norm kinds, the running statistics. So a swap to the kind the layer already computes (``LlamaRMSNorm`` to
    ``"rms"``, ``CohereLayerNorm`` to ``"layer"``, timm's ``LayerNorm2d`` to ``"layer"``) replaces it with the
    package's (torch's) class and leaves the model's outputs unchanged up to float rounding. A layer that applies an
    activation after normalizing (timm's ``BatchNormAct2d``) becomes ``Sequential(new layer, activation)``, holding
    the same activation (and drop) module; its ``state_dict`` keys gain a ``.0``. A module used at several places is
    replaced by one new module at all of them. A layer that already is the exact class the kind builds is left
    alone when no options are given (``report.skipped`` says so), so a second call changes nothing.

    If ``model`` itself is a norm layer it cannot be replaced in the caller's variable: the new layer is the
    returned report's ``model`` (and the record named ``""``).

    Args:
        model: the module to change in place.
        to: the target kind (see :func:`lightning_bn.available_norms`).
        include: globs or classes; only matching layers are swapped (default: all).
        exclude: globs or classes; matching layers are left alone.
        options: options of the target kind (``num_groups=8``, ``virtual_batch_size=16`` ...).

    Returns:
        A :class:`SwapReport`: one :class:`SwapRecord` per replaced layer, the layers left as they were with the
        reason in ``.skipped``, and the resulting root in ``.model``.

    Raises:
        ValueError: unknown kind (lists the kinds), options the kind does not take (names them), a layer the kind
            cannot be built for (names the layer, its channels and the bad option, e.g. ``num_groups``), or a layer
            whose parameters are DTensors, already sharded by ``fully_shard`` (swap before sharding). Every new layer
            is built before the model is touched, so after an error the model is unchanged.
    """
    kind = _checked_kind(model, to, options)
    include_l, exclude_l = _check_selector("include", include), _check_selector("exclude", exclude)

    names = _all_names(model)
    candidates: list[tuple[list[str], nn.Module]] = []
    infos: dict[int, NormInfo] = {}
    unrecognized: dict[str, list[str]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        info = describe_norm(module)
        if info is not None:
            candidates.append((names[id(module)], module))
            infos[id(module)] = info
        else:
            reason = unrecognized_reason(module)
            module_names = names[id(module)]
            wanted = not include_l or any(_matches(i, module_names, module) for i in include_l)
            if reason is not None and wanted and not any(_matches(i, module_names, module) for i in exclude_l):
                unrecognized.setdefault(reason, []).append(name or "<root>")
    for reason, layer_names in unrecognized.items():  # one warning per class, naming its layers
        warnings.warn(f"{reason} Layers: {', '.join(layer_names)}.", UserWarning, stacklevel=2)
    skipped = {name: "looks like a norm, not recognized (see the warning)"
               for layer_names in unrecognized.values() for name in layer_names}
    if not candidates:
        warnings.warn(f"{type(model).__name__} has no normalization layer to swap; nothing changed", UserWarning,
                      stacklevel=2)
        return SwapReport([], model, skipped)

    chosen = _select(candidates, include_l, exclude_l)
    # Build everything first: a bad option on any layer raises before the model is touched.
    mapping: dict[int, nn.Module] = {}
    records: list[SwapRecord] = []
    lost: dict[str, list[str]] = {}
    for module_names, module in chosen:
        info = infos[id(module)]
        name = module_names[0]
        sharded = _sharded_tensors(module)
        if sharded:
            raise ValueError(
                f"cannot swap layer {name or '<root>'!r} ({type(module).__name__}): its {', '.join(sharded)} "
                f"{'is a DTensor' if len(sharded) == 1 else 'are DTensors'}, already sharded by fully_shard. Swap "
                "normalization layers before sharding: call lightning_bn.swap_norms (or let NormSwap run) before "
                "fully_shard, e.g. at the start of configure_model."
            )
        new = _build_like(module, info, kind, options, name, lost)
        if not options and type(new) is type(module) and not info.post:
            skipped[name] = f"already {type(module).__name__}"
            continue
        if info.post:  # what the layer does after normalizing (timm's drop and act) stays after the new layer
            new = nn.Sequential(new, *(module.get_submodule(attr) for attr in info.post))
        mapping[id(module)] = new
        records.append(SwapRecord(name, module, new, tuple(module_names[1:])))
    for what, layer_names in lost.items():
        param = "bias" if what == "shift" else "weight"
        warnings.warn(
            f"swap to {kind!r}: the new layers have no {param}, so the {what} of {', '.join(layer_names)} is dropped "
            "and their outputs change", UserWarning, stacklevel=2,
        )
    return SwapReport(records, replace_modules(model, mapping), skipped)


class _InsertedNorm:
    """Forward hook that passes a layer's output through the norm registered on it as the child ``norm``."""

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        norm: nn.Module = module.get_submodule("norm")
        return norm(output)


def _inserted_norm(module: nn.Module) -> nn.Module | None:
    norm = module._modules.get("norm") if hasattr(module, "_modules") else None
    hooks = getattr(module, "_forward_hooks", {})
    return norm if norm is not None and any(isinstance(h, _InsertedNorm) for h in hooks.values()) else None


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
        if id(module) not in seen and isinstance(module, after_t) and weight_layer_output(module) is not None:
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
        out = weight_layer_output(module)
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
