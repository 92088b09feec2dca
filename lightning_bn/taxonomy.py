"""What any module is as a normalization layer: the one table the whole package asks (pure PyTorch, no Lightning).

:func:`describe_norm` answers, for any module, which kind of normalization it computes, over which input layout,
for how many channels, with which effective scale, shift and eps, and whether it normalizes with batch statistics
and keeps running ones. Swapping, insertion, recalibration, the monitor's selection and ``SyncNormPlugin`` ask it
and nothing else. What it knows comes from, in this order:

1. **Third-party classes** recorded by import path: timm's ``LayerNorm``, ``LayerNorm2d``, ``RmsNorm``,
   ``RmsNorm2d``, ``GroupNorm``, ``BatchNormAct2d``, ``FrozenBatchNormAct2d`` and their relatives, torchvision's
   ``FrozenBatchNorm2d``, and Hugging Face classes such as ``LlamaRMSNorm``, ``T5LayerNorm``, ``GemmaRMSNorm``
   (scale ``1 + weight``), ``CohereLayerNorm`` and ``ConvNextLayerNorm`` (layout from its ``data_format``). They are
   matched by top-level package and class name, so neither package is imported.
2. **Torch's and this package's classes**, by class; a subclass with a ``forward`` of its own is not taken on trust.
3. :func:`declare_norm_layout`: the layout of such a subclass, declared by the user.
4. :func:`lightning_bn.register_norm`: the classes a registered kind builds are that kind.
5. **The probe** (:func:`probe_norm`), for a module none of the above knows but that looks like a norm: it is
   classified by what it computes.

:func:`is_weight_layer` and :func:`weight_layer_output` answer the other question the package asks about modules:
which layers own a weight matrix or kernel (conv, linear, linear-like such as Hugging Face's ``Conv1D``,
embeddings), and what layout their outputs have.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedParameter

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
from lightning_bn.layers._registry import registered_classes
from lightning_bn.layers._sync import SyncBatchNorm

__all__ = [
    "BATCH_STAT_KINDS",
    "NormInfo",
    "declare_norm_layout",
    "describe_norm",
    "find_norms",
    "is_batch_norm",
    "is_norm",
    "is_weight_layer",
    "known_norm_classes",
    "probe_norm",
    "tracks_running_stats",
    "unrecognized_reason",
    "weight_layer_output",
]

#: Kinds that normalize with the statistics of the batch in training (frozen batch norm does not).
BATCH_STAT_KINDS = frozenset({"batch", "sync_batch", "batch_renorm", "ghost_batch"})


@dataclass(frozen=True)
class NormInfo:
    """What a normalization layer computes: ``y = normalize(x) * scale + shift``, then the ``post`` modules.

    Attributes:
        kind: the registry kind it computes (``"batch"``, ``"layer"``, ``"rms"``, ...).
        layout: ``"channels_first"`` for ``(N, C, *)`` or ``"channels_last"`` for ``(N, *, C)``.
        num_features: the channels ``C``.
        dims: spatial dimensions of a channels-first input when the class fixes them (``BatchNorm2d``: 2), else None.
        eps: what is added to the variance (or mean square); None: the kind's default (torch's ``RMSNorm(eps=None)``).
        scale: the effective per-channel scale ``(C,)``, None without one: the layer's weight itself, or a new
            tensor ``1 + weight`` for layers that scale by ``1 + weight`` (Gemma).
        shift: the effective per-channel shift ``(C,)`` (the layer's bias), or None.
        scale_name, shift_name: the attributes the scale and shift are read from (``"weight"``, ``"bias"``), or None.
        batch_stats: it normalizes with the statistics of the batch in training (every batch-norm kind but frozen).
        running_stats: it keeps ``running_mean`` and ``running_var``, used in evaluation, that recalibration may
            recompute.
        num_groups: the groups of a group norm, else None.
        post: attribute names of the child modules the layer applies, in order, after normalizing (timm's
            ``BatchNormAct2d``: ``("drop", "act")``, identities left out); a swap keeps them after the new layer.
        source: how it was recognized: ``"class"`` (a known class), ``"declared"``, ``"registered"`` or ``"probe"``.
    """

    kind: str
    layout: str
    num_features: int
    dims: int | None = None
    eps: float | None = None
    scale: Tensor | None = field(default=None, compare=False, repr=False)
    shift: Tensor | None = field(default=None, compare=False, repr=False)
    scale_name: str | None = None
    shift_name: str | None = None
    batch_stats: bool = False
    running_stats: bool = False
    num_groups: int | None = None
    post: tuple[str, ...] = ()
    source: str = "class"

    @property
    def affine(self) -> bool:
        """True when the layer has a scale or a shift."""
        return self.scale is not None or self.shift is not None


@dataclass(frozen=True)
class _Recipe:
    """How to read a :class:`NormInfo` off an instance of a class (from the table, or found by the probe)."""

    kind: str
    layout: str | None = None  # None: the instance's `layout_attr` (our layers: `layout`)
    dims: int | None = None
    channels: str | None = None  # the attribute holding C; None: found as `_channels` does
    eps: str | float | None = "eps"  # an attribute name, or the value the probe found
    scale: str | None = "weight"
    scale_offset: float = 0.0  # 1.0: the layer scales by `1 + weight` (Gemma)
    shift: str | None = "bias"
    post: tuple[str, ...] = ()
    post_attr: str | None = None  # an instance attribute holding the post names (SyncNormPlugin's layers)
    layout_attr: str = "layout"
    groups: str | int | None = None
    batch_stats: bool | None = None  # None: kind in BATCH_STAT_KINDS
    running_stats: bool | None = None  # None: a batch-stat kind with running buffers and track_running_stats


def _r(kind: str, layout: str | None = None, **kw: Any) -> _Recipe:
    return _Recipe(kind, layout, **kw)


CF, CL = CHANNELS_FIRST, CHANNELS_LAST

# Torch's classes and ours, most derived first. A subclass is described by its base's recipe only when its forward
# is the base's: what a forward of its own computes is for `declare_norm_layout` or the probe to say.
_CLASS_TABLE: list[tuple[type[nn.Module], _Recipe]] = [
    (FrozenBatchNorm, _r("frozen_batch", channels="num_features")),
    # Its statistic is a quadratic mean kept as running_phi, not running_mean/running_var: not a batch-norm kind to
    # swaps and the monitor; recalibrate_bn recomputes running_phi by this kind.
    (PowerNorm, _r("power", channels="num_features", batch_stats=False, running_stats=False)),
    (SyncBatchNorm, _r("sync_batch", channels="num_features")),
    (BatchRenorm, _r("batch_renorm", channels="num_features")),
    (GhostBatchNorm, _r("ghost_batch", channels="num_features")),
    (BatchNormChannelsLast, _r("batch", CL, channels="num_features")),
    (BatchNormNd, _r("batch", CF, channels="num_features")),
    (nn.SyncBatchNorm, _r("sync_batch", CF, channels="num_features")),
    (nn.BatchNorm1d, _r("batch", CF, dims=1, channels="num_features")),
    (nn.BatchNorm2d, _r("batch", CF, dims=2, channels="num_features")),
    (nn.BatchNorm3d, _r("batch", CF, dims=3, channels="num_features")),
    (_BatchNorm, _r("batch", CF, channels="num_features")),  # e.g. Lightning's _BatchNormXd
    (GroupNormChannelsLast, _r("group", CL, channels="num_channels", groups="num_groups")),
    (nn.GroupNorm, _r("group", CF, channels="num_channels", groups="num_groups")),
    (LayerNormChannelsFirst, _r("layer", CF, channels="normalized_shape")),
    (nn.LayerNorm, _r("layer", CL, channels="normalized_shape")),
    (RMSNormChannelsFirst, _r("rms", CF, channels="normalized_shape", shift=None)),
    (nn.RMSNorm, _r("rms", CL, channels="normalized_shape", shift=None)),
    (InstanceNormChannelsLast, _r("instance", CL, channels="num_features")),
    (InstanceNormNd, _r("instance", CF, channels="num_features")),
    (nn.InstanceNorm1d, _r("instance", CF, dims=1, channels="num_features")),
    (nn.InstanceNorm2d, _r("instance", CF, dims=2, channels="num_features")),
    (nn.InstanceNorm3d, _r("instance", CF, dims=3, channels="num_features")),
    (_InstanceNorm, _r("instance", CF, channels="num_features")),
]

_ACT = ("drop", "act")  # timm's norm-act layers: normalize, then self.drop, then self.act
_HF_RMS = _r("rms", CL, eps="variance_epsilon", shift=None)
_GEMMA_RMS = _r("rms", CL, shift=None, scale_offset=1.0)

# Third-party classes by (top-level package, class name): no import of the package is needed to recognize them.
# tests/test_taxonomy.py checks each one the test environment can build against the probe.
_NAMED_TABLE: dict[tuple[str, str], _Recipe] = {
    ("timm", "LayerNorm"): _r("layer", CL, channels="normalized_shape"),
    ("timm", "LayerNormFp32"): _r("layer", CL, channels="normalized_shape"),
    ("timm", "LayerNorm2d"): _r("layer", CF, dims=2, channels="normalized_shape"),
    ("timm", "LayerNorm2dFp32"): _r("layer", CF, dims=2, channels="normalized_shape"),
    ("timm", "RmsNorm"): _r("rms", CL, channels="normalized_shape", shift=None),
    ("timm", "RmsNormFp32"): _r("rms", CL, channels="normalized_shape", shift=None),
    ("timm", "RmsNorm2d"): _r("rms", CF, dims=2, channels="normalized_shape", shift=None),
    ("timm", "RmsNorm2dFp32"): _r("rms", CF, dims=2, channels="normalized_shape", shift=None),
    ("timm", "GroupNorm"): _r("group", CF, channels="num_channels", groups="num_groups"),
    ("timm", "GroupNorm1"): _r("group", CF, channels="num_channels", groups="num_groups"),
    ("timm", "BatchNormAct2d"): _r("batch", CF, dims=2, channels="num_features", post=_ACT),
    ("timm", "SyncBatchNormAct"): _r("sync_batch", CF, channels="num_features", post=_ACT),
    ("timm", "FrozenBatchNormAct2d"): _r("frozen_batch", CF, dims=2, post=_ACT),
    ("timm", "GroupNormAct"): _r("group", CF, channels="num_channels", groups="num_groups", post=_ACT),
    ("timm", "GroupNorm1Act"): _r("group", CF, channels="num_channels", groups="num_groups", post=_ACT),
    ("timm", "LayerNormAct"): _r("layer", CL, channels="normalized_shape", post=_ACT),
    ("timm", "LayerNormActFp32"): _r("layer", CL, channels="normalized_shape", post=_ACT),
    ("timm", "LayerNormAct2d"): _r("layer", CF, dims=2, channels="normalized_shape", post=_ACT),
    ("timm", "LayerNormAct2dFp32"): _r("layer", CF, dims=2, channels="normalized_shape", post=_ACT),
    ("timm", "RmsNormAct"): _r("rms", CL, channels="normalized_shape", shift=None, post=_ACT),
    ("timm", "RmsNormActFp32"): _r("rms", CL, channels="normalized_shape", shift=None, post=_ACT),
    ("timm", "RmsNormAct2d"): _r("rms", CF, dims=2, channels="normalized_shape", shift=None, post=_ACT),
    ("timm", "RmsNormAct2dFp32"): _r("rms", CF, dims=2, channels="normalized_shape", shift=None, post=_ACT),
    ("torchvision", "FrozenBatchNorm2d"): _r("frozen_batch", CF, dims=2),
    ("transformers", "LlamaRMSNorm"): _HF_RMS,
    ("transformers", "MistralRMSNorm"): _HF_RMS,
    ("transformers", "Qwen2RMSNorm"): _HF_RMS,
    ("transformers", "Qwen3RMSNorm"): _HF_RMS,
    ("transformers", "Phi3RMSNorm"): _HF_RMS,
    ("transformers", "T5LayerNorm"): _HF_RMS,
    ("transformers", "GemmaRMSNorm"): _GEMMA_RMS,
    ("transformers", "Gemma2RMSNorm"): _GEMMA_RMS,
    ("transformers", "Gemma3RMSNorm"): _GEMMA_RMS,
    ("transformers", "CohereLayerNorm"): _r("layer", CL, eps="variance_epsilon", shift=None),
    ("transformers", "ConvNextLayerNorm"): _r("layer", None, channels="normalized_shape", layout_attr="data_format"),
    # SyncNormPlugin's stand-in for a norm-act layer during a fit (lightning_bn.plugins, which imports Lightning)
    ("lightning_bn", "_SyncBatchNormThen"): _r("sync_batch", channels="num_features", post_attr="post"),
}

# Classes whose layout the user declared (subclasses of known norms with a forward of their own).
_DECLARED: dict[type[nn.Module], str] = {}
# Per class: its recipe and source (None: not a norm by class; the probe may still decide per instance).
_CLASS_CACHE: dict[type, tuple[_Recipe, str] | None] = {}
# Per class and configuration: what the probe found (None: no formula matched).
_PROBE_CACHE: dict[Any, _Recipe | None] = {}

# Modules that synchronize across processes in their forward are never probed: a probe on one process would wait
# in a collective for the others.
_NEVER_PROBED: tuple[type[nn.Module], ...] = (nn.SyncBatchNorm, SyncBatchNorm)
_EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")


def clear_caches() -> None:
    """Forget what was decided per class (called when a declaration or a registration changes the answer)."""
    _CLASS_CACHE.clear()
    _PROBE_CACHE.clear()


def declare_norm_layout(cls: type[nn.Module], layout: str) -> None:
    """Declare the input layout of a norm subclass that has its own ``forward``, so it can be swapped.

    The class is then described as its known base's kind in ``layout``, without probing. For a class with no known
    base, the probe tries ``layout`` only.

    Example: a ``LayerNorm`` subclass that permutes a channels-first input itself is
    ``declare_norm_layout(MyLayerNorm2d, "channels_first")``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module subclass, got {cls!r}")
    _DECLARED[cls] = check_layout(layout)
    clear_caches()


def known_norm_classes() -> tuple[type[nn.Module], ...]:
    """Torch's and this package's normalization classes the table knows (third-party ones are known by name)."""
    return tuple(cls for cls, _ in _CLASS_TABLE)


# ---------------------------------------------------------------------------------------------------- describing
def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _channels(module: nn.Module, attr: str | None = None) -> int | None:
    """``C``: from ``attr`` when given, else a 1-d weight, ``normalized_shape``, ``num_features``, ``num_channels``,
    ``hidden_size`` or the one size of the module's 1-d tensors; None when none gives a single positive int (a
    LayerNorm over several dims)."""
    names = [attr] if attr else ["weight", "normalized_shape", "num_features", "num_channels", "hidden_size"]
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, Tensor):
            if isinstance(value, UninitializedParameter):
                return None
            if value.dim() == 1:
                return int(value.shape[0])
            if attr:
                return None
            continue
        if isinstance(value, (tuple, list, torch.Size)):
            value = value[0] if len(value) == 1 else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if attr:
            return None
    if attr is None:  # the one size of the module's own 1-d tensors (a registered class with a `gain`)
        sizes = {t.shape[0] for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]
                 if not isinstance(t, UninitializedParameter) and t.dim() == 1}
        if len(sizes) == 1:
            return int(sizes.pop())
    return None


def _vector(module: nn.Module, name: str | None, channels: int) -> Tensor | None:
    if name is None:
        return None
    value = getattr(module, name, None)
    if isinstance(value, Tensor) and not isinstance(value, UninitializedParameter) and value.shape == (channels,):
        return value
    return None


def _info(module: nn.Module, recipe: _Recipe, source: str, layout: str | None = None) -> NormInfo | None:
    """The :class:`NormInfo` of ``module`` read with ``recipe``; None when the instance does not fit it."""
    channels = _channels(module, recipe.channels)
    if channels is None:
        return None
    layout = layout or recipe.layout or getattr(module, recipe.layout_attr, None)
    if layout not in LAYOUTS:
        return None
    eps = _number(getattr(module, recipe.eps, None)) if isinstance(recipe.eps, str) else recipe.eps
    scale = _vector(module, recipe.scale, channels)
    if scale is not None and recipe.scale_offset:
        scale = scale.detach() + recipe.scale_offset
    shift = _vector(module, recipe.shift, channels)
    batch = recipe.kind in BATCH_STAT_KINDS if recipe.batch_stats is None else recipe.batch_stats
    if recipe.running_stats is not None:
        running = recipe.running_stats
    else:
        running = (
            batch
            and bool(getattr(module, "track_running_stats", True))
            and isinstance(getattr(module, "running_mean", None), Tensor)
            and isinstance(getattr(module, "running_var", None), Tensor)
        )
    groups = getattr(module, recipe.groups, None) if isinstance(recipe.groups, str) else recipe.groups
    names = tuple(getattr(module, recipe.post_attr, ())) if recipe.post_attr else recipe.post
    post = tuple(
        name for name in names
        if isinstance(getattr(module, name, None), nn.Module) and not isinstance(getattr(module, name), nn.Identity)
    )
    return NormInfo(
        kind=recipe.kind,
        layout=layout,
        num_features=channels,
        dims=recipe.dims,
        eps=eps,
        scale=scale,
        shift=shift,
        scale_name=recipe.scale if scale is not None else None,
        shift_name=recipe.shift if shift is not None else None,
        batch_stats=batch,
        running_stats=running,
        num_groups=groups if isinstance(groups, int) else None,
        post=post,
        source=source,
    )


def _table_base(cls: type) -> tuple[type[nn.Module], _Recipe] | None:
    for base, recipe in _CLASS_TABLE:
        if issubclass(cls, base):
            return base, recipe
    return None


def _registered_recipe(cls: type) -> _Recipe | None:
    found = registered_classes().get(cls)
    if not found:
        return None
    kinds = set(found.values())
    if len(kinds) != 1:
        return None
    layouts = sorted(found)
    layout = layouts[0] if len(layouts) == 1 else None  # one class for both layouts: the instance's `layout`
    return _Recipe(kinds.pop(), layout, batch_stats=issubclass(cls, _BatchNorm))


def _by_class(cls: type) -> tuple[_Recipe, str] | None:
    """What the tables, declarations and registrations say about ``cls`` (cached per class)."""
    if cls in _CLASS_CACHE:
        return _CLASS_CACHE[cls]
    result: tuple[_Recipe, str] | None = None
    named = _NAMED_TABLE.get((cls.__module__.partition(".")[0], cls.__qualname__))
    base = _table_base(cls)
    declared = next((lay for klass, lay in _DECLARED.items() if issubclass(cls, klass)), None)
    if named is not None:
        result = (named, "class")
    elif base is not None and (cls is base[0] or getattr(cls, "forward", None) is getattr(base[0], "forward", None)):
        result = (base[1], "class")
    elif base is not None and declared is not None:
        result = (replace(base[1], layout=declared), "declared")
    else:
        registered = _registered_recipe(cls)
        if registered is not None:
            result = (registered, "registered")
    _CLASS_CACHE[cls] = result
    return result


def describe_norm(module: nn.Module, *, warn: bool = False) -> NormInfo | None:
    """What ``module`` is as a normalization layer, or None when it is not one the package recognizes.

    Known classes are read off the table (see the module docstring); a module the table does not know but that
    looks like a norm is classified by :func:`probe_norm`. With ``warn``, a module that looks like a norm but is not
    recognized gets a warning naming its class and saying why (see :func:`unrecognized_reason`).
    """
    if not isinstance(module, nn.Module):
        return None
    by_class = _by_class(type(module))
    if by_class is not None:
        recipe, source = by_class
        info = _info(module, recipe, source)
        if info is not None or source != "registered":
            return info
    layouts = _probe_layouts(type(module))
    info = probe_norm(module, layouts=layouts) if _looks_like_norm(module) else None
    if info is not None and by_class is not None:  # registered class built for both layouts: the probe says which
        info = _info(module, by_class[0], by_class[1], layout=info.layout)
    if info is None and warn:
        reason = unrecognized_reason(module)
        if reason is not None:
            import warnings

            warnings.warn(reason, UserWarning, stacklevel=2)
    return info


def _probe_layouts(cls: type) -> tuple[str, ...]:
    declared = next((lay for klass, lay in _DECLARED.items() if issubclass(cls, klass)), None)
    return (declared,) if declared is not None else LAYOUTS


def unrecognized_reason(module: nn.Module) -> str | None:
    """Why ``module``, which looks like a normalization layer, is not recognized as one; None when it is recognized
    or does not look like one."""
    if not _looks_like_norm(module) or describe_norm(module) is not None:
        return None
    name = type(module).__qualname__
    base = _table_base(type(module))
    formulas = ("layer, RMS, batch, instance or group norm with a per-channel scale and shift, channels-first or "
                "channels-last")
    if base is not None:
        if isinstance(module, _NEVER_PROBED):
            checked = " (a synchronized norm is not probed)"
        else:
            checked = f", and the probe found none of the formulas ({formulas})"
        return (
            f"Skipping {name}: it looks like a normalization layer, but it subclasses {base[0].__name__} with a "
            f"forward of its own{checked}. If it computes what {base[0].__name__} computes, declare its layout with "
            f"`lightning_bn.declare_norm_layout({type(module).__name__}, 'channels_first' or 'channels_last')` to "
            f"convert it."
        )
    return (
        f"Skipping {name}: it looks like a normalization layer, but the probe found none of the formulas it knows "
        f"({formulas}) in what its forward computes, so it is left as it is; exclude it (`exclude=[{name}]`) to "
        f"silence this."
    )


def find_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module, NormInfo]]:
    """Every recognized norm layer in ``model`` as ``(name, module, info)``, in registration order."""
    for name, module in model.named_modules():
        info = describe_norm(module)
        if info is not None:
            yield name, module, info


def is_norm(module: nn.Module) -> bool:
    """True for a module the taxonomy recognizes as a normalization layer."""
    return describe_norm(module) is not None


def is_batch_norm(module: nn.Module) -> bool:
    """True for a normalization layer that normalizes with batch statistics in training (not frozen batch norm)."""
    info = describe_norm(module)
    return info is not None and info.batch_stats


def tracks_running_stats(module: nn.Module) -> bool:
    """True for a batch-norm layer with running statistics that recalibration may recompute."""
    info = describe_norm(module)
    return info is not None and info.batch_stats and info.running_stats


# ---------------------------------------------------------------------------------------------------- weight layers
_LINEAR_LIKE: dict[tuple[str, str], Callable[[nn.Module], int]] = {
    # GPT-2's projections: a linear layer whose weight is stored (in, out)
    ("transformers", "Conv1D"): lambda m: int(m.__dict__["nf"]),
}
_WEIGHT_CLASSES: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag)


def is_weight_layer(module: nn.Module) -> bool:
    """True for a layer that owns a weight matrix or kernel: conv, linear, embedding, and any leaf module with a
    parameter of two or more dimensions of its own (Hugging Face's ``Conv1D``, an LSTM)."""
    if isinstance(module, _WEIGHT_CLASSES):
        return True
    if next(module.children(), None) is not None:
        return False
    for p in module.parameters(recurse=False):
        if isinstance(p, UninitializedParameter) or p.dim() >= 2:
            return True
    return False


def weight_layer_output(module: nn.Module) -> tuple[int, str, int | None] | None:
    """``(channels, layout, dims)`` of the output of a conv, linear or linear-like layer, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, CHANNELS_LAST, None
    if isinstance(module, _ConvNd):
        return module.out_channels, CHANNELS_FIRST, len(module.kernel_size)
    linear_like = _LINEAR_LIKE.get((type(module).__module__.partition(".")[0], type(module).__qualname__))
    if linear_like is not None:
        return linear_like(module), CHANNELS_LAST, None
    return None


# ---------------------------------------------------------------------------------------------------- the probe
_TOL = 1e-4  # relative: loose enough for layers that compute in float32 inside, far below any wrong formula's error
_EPS_LADDER = (1e-5, 1e-6, 1e-12, 1e-8, 1e-3, 1e-4, 1e-7, 1e-10, 0.0)
_SIZES = (3, 5, 7, 11, 13)
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


def _looks_like_norm(module: nn.Module) -> bool:
    """A module worth probing: its class name says ``Norm``, or it has a 1-d weight of C values and an eps; and no
    tensor in it has two or more dimensions (a block that holds a norm is not one)."""
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    name_says = "norm" in type(module).__qualname__.lower()
    weight = getattr(module, "weight", None)
    has_eps = any(_number(module.__dict__.get(a)) is not None for a in _EPS_ATTRS)
    if not (name_says or (isinstance(weight, Tensor) and weight.dim() == 1 and has_eps)):
        return False
    for t in [*module.parameters(), *module.buffers()]:
        if isinstance(t, UninitializedParameter) or t.dim() >= 2:
            return False
    return _channels(module) is not None


def _config_key(module: nn.Module, layouts: Sequence[str]) -> Any:
    """The class and everything in the instance that may change what its forward computes: plain attributes, private
    ones included (``eps``, ``data_format``, a ``_eps`` ...), parameter and buffer names and shapes, child classes."""
    plain: list[tuple[str, Any]] = []
    for name, value in sorted(module.__dict__.items()):
        if name == "training":
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            plain.append((name, value))
        elif isinstance(value, (tuple, list, torch.Size)) and all(
            isinstance(v, (bool, int, float, str)) for v in value
        ):
            plain.append((name, tuple(value)))
    tensors = tuple(
        (kind, name, None if t is None else (tuple(t.shape), t.is_floating_point()))
        for kind, table in (("p", module._parameters), ("b", module._buffers))
        for name, t in table.items()
    )
    children = tuple((name, type(child)) for name, child in module._modules.items())
    return type(module), tuple(layouts), tuple(plain), tensors, children


def probe_norm(module: nn.Module, *, layouts: Sequence[str] = LAYOUTS) -> NormInfo | None:
    """Classify ``module`` by what it computes; None when it computes none of the known formulas.

    The decision rule. A copy of the module (fresh float64 tensors of the same shapes on the CPU, no hooks; the
    module itself, its tensors and the global random state are not touched: values come from a local
    ``torch.Generator`` and the forward runs under ``torch.random.fork_rng``) has every 1-d float tensor of ``C``
    values (weight, bias, ...) set to distinct random values in ``[0.5, 1.5]``, and runs in training mode on a random
    input with per-channel offsets and spreads, in each plausible layout: ``(4, T, C)`` and ``(4, H, W, C)``
    channels-last, ``(4, C, H, W)`` and ``(4, C, L)`` channels-first (spatial sizes different from ``C``). Each
    output is compared with the reference formulas: layer norm (statistics over the channels at each position), RMS
    norm (the same without mean subtraction), batch norm (per channel over batch and positions), instance norm (per
    sample and channel), group norm (the module's ``num_groups``, else every divisor of ``C``), and, when the module
    has ``running_mean``/``running_var``, frozen batch norm. For each, a per-channel scale ``a`` and shift ``b`` are
    fitted by least squares; the formula matches when

    1. the fit leaves a relative error below 1e-4, and
    2. ``a`` is 1, one of the 1-d tensors ``w`` or ``1 + w`` (the Gemma convention), and ``b`` is 0 or another of
       those tensors: a per-channel affine map that is no norm (``x * weight``) fails here, since its fitted ``a``
       carries the input's spread, and
    3. the eps is confirmed on a second input whose variance is about eps: the module's ``eps``,
       ``variance_epsilon`` or ``epsilon`` attribute, else the first of 1e-5, 1e-6, 1e-12, 1e-8, 1e-3, 1e-4, 1e-7,
       1e-10, 0 that fits, and
    4. for batch norm, evaluation mode either uses the running buffers (``running_stats``) or the batch statistics.

    The first formula that matches gives kind, layout, eps and which tensors are the scale and shift (read per
    instance, so :attr:`NormInfo.scale` is the module's own ``w`` or ``1 + w``); ``dims`` is set when only one
    channels-first rank ran. The result is cached per class and configuration (plain attributes, tensor shapes,
    child classes), so a class whose instances differ in layout (``data_format``) is probed once per layout.
    """
    layouts = tuple(check_layout(lay) for lay in layouts)
    if isinstance(module, _NEVER_PROBED) or _channels(module) is None:
        return None
    if any(isinstance(t, UninitializedParameter) for t in module.parameters()):
        return None
    key = _config_key(module, layouts)
    if key not in _PROBE_CACHE:
        _PROBE_CACHE[key] = _probe(module, layouts)
    recipe = _PROBE_CACHE[key]
    return None if recipe is None else _info(module, recipe, "probe")


def _fresh(t: Tensor, name: str, gen: torch.Generator) -> Tensor:
    """A new CPU tensor of ``t``'s (global) shape: float64 random values for floating tensors, zeros otherwise."""
    shape = tuple(t.shape)
    if not t.is_floating_point():
        return torch.zeros(shape, dtype=t.dtype)
    low, high = {"running_mean": (-1.0, 1.0), "running_var": (0.5, 2.0)}.get(name, (0.5, 1.5))
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen)


def _probe_copy(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """A shallow copy of ``module`` with fresh tensors, copied children and no hooks: nothing the probe does to it
    reaches the original (a deep copy would also copy whatever the hooks hold)."""
    clone = copy.copy(module)
    state = clone.__dict__
    state["_parameters"] = {
        n: None if p is None else nn.Parameter(_fresh(p, n, gen), requires_grad=False)
        for n, p in module._parameters.items()
    }
    state["_buffers"] = {n: None if b is None else _fresh(b, n, gen) for n, b in module._buffers.items()}
    state["_modules"] = {n: None if c is None else _probe_copy(c, gen) for n, c in module._modules.items()}
    for hooks in _HOOK_DICTS:
        if hooks in state:
            state[hooks] = OrderedDict()
    return clone


def _run(clone: nn.Module, x: Tensor, training: bool) -> Tensor | None:
    clone.train(training)
    try:
        y = clone.forward(x)
    except Exception:  # noqa: BLE001 - a layout the module does not take
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape or not y.is_floating_point() or not torch.isfinite(y).all():
        return None
    return y.to(torch.float64)


@dataclass(frozen=True)
class _Formula:
    kind: str
    groups: int | None = None


def _formulas(ndim: int, cdim: int, channels: int, module: nn.Module) -> list[_Formula]:
    spatial = ndim > 2
    found = [_Formula("layer"), _Formula("rms"), _Formula("batch")]
    if spatial:
        found.append(_Formula("instance"))
        groups = getattr(module, "num_groups", None)
        if isinstance(groups, int) and not isinstance(groups, bool) and groups > 0 and channels % groups == 0:
            options = [groups]
        else:
            options = [g for g in range(1, channels // 2 + 1) if channels % g == 0]
        found += [_Formula("group", g) for g in options]
    if isinstance(getattr(module, "running_mean", None), Tensor) and isinstance(
        getattr(module, "running_var", None), Tensor
    ):
        found.append(_Formula("frozen_batch"))
    return found


def _tensor(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name)
    assert isinstance(value, Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return value


def _stat_dims(kind: str, ndim: int, cdim: int) -> tuple[int, ...]:
    if kind in ("layer", "rms"):
        return (cdim,)
    if kind == "batch":
        return tuple(d for d in range(ndim) if d != cdim)
    return tuple(d for d in range(1, ndim) if d != cdim)  # instance


def _normalized(x: Tensor, formula: _Formula, cdim: int, eps: float, clone: nn.Module) -> Tensor:
    """``x`` normalized by ``formula`` (biased variance, eps added to it), before any scale or shift."""
    if formula.kind == "frozen_batch":
        shape = [1] * x.dim()
        shape[cdim] = -1
        mean = _tensor(clone, "running_mean").to(torch.float64).view(shape)
        var = _tensor(clone, "running_var").to(torch.float64).view(shape)
        return (x - mean) / (var + eps).sqrt()
    if formula.kind == "group":
        moved = x.movedim(cdim, 1)
        n, c = moved.shape[:2]
        grouped = moved.reshape(n, formula.groups or 1, -1)
        mean = grouped.mean(-1, keepdim=True)
        var = grouped.var(-1, unbiased=False, keepdim=True)
        return ((grouped - mean) / (var + eps).sqrt()).reshape(moved.shape).movedim(1, cdim)
    dims = _stat_dims(formula.kind, x.dim(), cdim)
    if formula.kind == "rms":
        return x / (x.square().mean(dims, keepdim=True) + eps).sqrt()
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / (var + eps).sqrt()


def _typical_stat(x: Tensor, formula: _Formula, cdim: int, clone: nn.Module) -> float:
    """The size of the statistic eps is added to, for an input like ``x``: so an input scaled by
    ``sqrt(eps / stat)`` makes eps matter."""
    if formula.kind == "frozen_batch":
        return float(_tensor(clone, "running_var").to(torch.float64).mean())
    if formula.kind == "rms":
        return float(x.square().mean())
    if formula.kind == "group":
        return float(x.movedim(cdim, 1).reshape(x.shape[0], formula.groups or 1, -1).var(-1, unbiased=False).mean())
    return float(x.var(_stat_dims(formula.kind, x.dim(), cdim), unbiased=False).mean())


def _per_channel(t: Tensor, cdim: int) -> Tensor:
    """``(M, C)``: every value of each channel in a column."""
    return t.movedim(cdim, -1).reshape(-1, t.shape[cdim])


def _fit(z: Tensor, y: Tensor, cdim: int) -> tuple[Tensor, Tensor, float]:
    """Per-channel least-squares ``y ~ a z + b`` and the relative error left."""
    zc, yc = _per_channel(z, cdim), _per_channel(y, cdim)
    z_mean, y_mean = zc.mean(0), yc.mean(0)
    a = ((zc - z_mean) * (yc - y_mean)).sum(0) / (zc - z_mean).square().sum(0).clamp_min(1e-300)
    b = y_mean - a * z_mean
    error = (yc - a * zc - b).abs().max() / yc.abs().max().clamp_min(1e-300)
    return a, b, float(error)


def _close(a: Tensor, b: Tensor | float, scale: float) -> bool:
    return bool(((a - b).abs() <= _TOL * scale).all())


def _affine_match(
    a: Tensor, b: Tensor, vectors: dict[str, Tensor]
) -> tuple[str | None, float, str | None] | None:
    """Which of the module's 1-d tensors are the fitted scale (as ``w`` or ``1 + w``) and shift, or None."""
    size = max(1.0, float(a.abs().max()))
    scales: list[tuple[str | None, float]] = [(None, 0.0)] + [(n, off) for n in vectors for off in (0.0, 1.0)]
    for scale_name, offset in scales:
        expected = 1.0 if scale_name is None else vectors[scale_name] + offset
        if not _close(a, expected, size):
            continue
        for shift_name in [None, *[n for n in vectors if n != scale_name]]:
            if _close(b, 0.0 if shift_name is None else vectors[shift_name], size):
                return scale_name, offset, shift_name
    return None


def _affine(z: Tensor, cdim: int, clone: nn.Module, match: tuple[str | None, float, str | None]) -> Tensor:
    scale_name, offset, shift_name = match
    shape = [1] * z.dim()
    shape[cdim] = -1
    out = z
    if scale_name is not None:
        out = out * (getattr(clone, scale_name).to(torch.float64) + offset).view(shape)
    if shift_name is not None:
        out = out + getattr(clone, shift_name).to(torch.float64).view(shape)
    return out


def _probe_input(shape: tuple[int, ...], cdim: int, gen: torch.Generator) -> Tensor:
    """Random values with a different offset and spread per channel, about 10 times unit size, so that an unknown
    eps barely matters at this scale and a per-channel affine map is told apart from batch norm."""
    channels = shape[cdim]
    view = [1] * len(shape)
    view[cdim] = channels
    spread = torch.empty(channels, dtype=torch.float64).uniform_(5.0, 20.0, generator=gen).view(view)
    offset = torch.empty(channels, dtype=torch.float64).uniform_(-10.0, 10.0, generator=gen).view(view)
    return torch.randn(shape, dtype=torch.float64, generator=gen) * spread + offset


def _shapes(layout: str, channels: int) -> list[tuple[tuple[int, ...], int, int | None]]:
    """``(shape, channel dim, dims)`` to try for ``layout``; spatial sizes differ from ``channels``."""
    s1, s2, s3 = [s for s in _SIZES if s != channels][:3]
    if layout == CHANNELS_LAST:
        return [((4, s3, channels), 2, None), ((4, s1, s2, channels), 3, None)]
    return [((4, channels, s1, s2), 1, 2), ((4, channels, s3), 1, 1)]


def _confirm_eps(
    clone: nn.Module, x: Tensor, formula: _Formula, cdim: int, match: tuple[str | None, float, str | None],
    eps_attr: float | None,
) -> float | None:
    """The eps the module adds, checked on an input whose statistic is about eps; None when no candidate fits."""
    for eps in (eps_attr,) if eps_attr is not None else _EPS_LADDER:
        target = max(eps, 1e-10)
        if formula.kind == "frozen_batch":
            saved = _tensor(clone, "running_var").clone()
            _tensor(clone, "running_var").mul_(target)
            xs = x
        else:
            xs = x * math.sqrt(target / max(_typical_stat(x, formula, cdim, clone), 1e-300))
        y = _run(clone, xs, training=True)
        ok = y is not None and _fit_error(y, _affine(_normalized(xs, formula, cdim, eps, clone), cdim, clone, match))
        if formula.kind == "frozen_batch":
            _tensor(clone, "running_var").copy_(saved)
        if ok:
            return eps
    return None


def _fit_error(y: Tensor, expected: Tensor) -> bool:
    return float((y - expected).abs().max() / expected.abs().max().clamp_min(1e-300)) <= _TOL


def _eval_running(
    clone: nn.Module, x: Tensor, cdim: int, eps: float, match: tuple[str | None, float, str | None]
) -> bool | None:
    """For batch norm: True when evaluation uses the running buffers, False when it uses the batch's statistics,
    None when it does something else."""
    y_train = _run(clone, x, training=True)
    has_buffers = isinstance(getattr(clone, "running_mean", None), Tensor) and isinstance(
        getattr(clone, "running_var", None), Tensor
    )
    expected = None
    if has_buffers:
        expected = _affine(_normalized(x, _Formula("frozen_batch"), cdim, eps, clone), cdim, clone, match)
    y_eval = _run(clone, x, training=False)
    if y_eval is None:
        return None
    if expected is not None and _fit_error(y_eval, expected):
        return True
    if y_train is not None and _fit_error(y_eval, y_train):
        return False
    return None


def _probe(module: nn.Module, layouts: tuple[str, ...]) -> _Recipe | None:
    channels = _channels(module)
    if channels is None or channels < 2:
        return None
    eps_name = next((a for a in _EPS_ATTRS if _number(module.__dict__.get(a)) is not None), None)
    eps_attr = _number(module.__dict__.get(eps_name)) if eps_name else None
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        clone = _probe_copy(module, gen)
        vectors = {
            name: t.to(torch.float64)
            for name, t in [*clone._parameters.items(), *clone._buffers.items()]
            if isinstance(t, Tensor) and t.is_floating_point() and t.shape == (channels,)
            and name not in ("running_mean", "running_var")
        }
        for layout in layouts:
            found: _Recipe | None = None
            matched_dims: list[int | None] = []
            for shape, cdim, dims in _shapes(layout, channels):
                x = _probe_input(shape, cdim, gen)
                y = _run(clone, x, training=True)
                if y is None:
                    continue
                recipe = _match(clone, x, y, cdim, layout, channels, module, vectors, eps_name, eps_attr)
                if recipe is not None and (found is None or recipe == found):
                    found = recipe
                    matched_dims.append(dims)
            if found is not None:
                # A layer that takes one channels-first rank only is built for it (BatchNorm2d); else any rank.
                return replace(found, dims=matched_dims[0] if len(matched_dims) == 1 else None)
    return None


def _match(
    clone: nn.Module, x: Tensor, y: Tensor, cdim: int, layout: str, channels: int,
    module: nn.Module, vectors: dict[str, Tensor], eps_name: str | None, eps_attr: float | None,
) -> _Recipe | None:
    for formula in _formulas(x.dim(), cdim, channels, module):
        z = _normalized(x, formula, cdim, eps_attr or 0.0, clone)
        a, b, error = _fit(z, y, cdim)
        if error > _TOL:
            continue
        match = _affine_match(a, b, vectors)
        if match is None:
            continue
        eps = _confirm_eps(clone, x, formula, cdim, match, eps_attr)
        if eps is None:
            continue
        running: bool | None = False
        if formula.kind == "batch":
            running = _eval_running(clone, x, cdim, eps, match)
            if running is None:
                continue
        scale_name, offset, shift_name = match
        return _Recipe(
            kind=formula.kind,
            layout=layout,
            eps=eps_name if eps_name is not None else eps,
            scale=scale_name,
            scale_offset=offset,
            shift=shift_name,
            groups=formula.groups,
            batch_stats=formula.kind == "batch",
            running_stats=running,
        )
    return None
