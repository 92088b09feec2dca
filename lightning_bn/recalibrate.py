"""Exact population statistics for batch-norm running buffers (pure PyTorch, no Lightning).

Running statistics are an exponential moving average of batch statistics taken while the weights moved, so at the
end of training they lag the model (Wu & Johnson, 2021), and under DDP every process holds different ones.
:func:`recalibrate_bn` replaces them with the statistics of the population of inputs each batch-norm layer sees on
the given batches: per-channel counts, sums and sums of squares accumulated in float64, reduced across processes in
one collective (:func:`lightning_bn.moments.reduce_across_processes`), then turned into the mean and the unbiased
variance (the law of total variance, so the spread of the batch means is included). Every process ends with
identical buffers, equal to the statistics of the union of all processes' data.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bn._checks import check_positive_int
from lightning_bn.layers import channel_dim
from lightning_bn.layers._layout import per_channel
from lightning_bn.layers._power import group_scaling
from lightning_bn.moments import (
    COUNT,
    SUM_SQ,
    channel_moments,
    masked_channel_moments,
    mean_var,
    reduce_across_processes,
)
from lightning_bn.padding import mask_for, padding_mask
from lightning_bn.stats._names import uncompiled_name
from lightning_bn.taxonomy import NormInfo, find_norms

__all__ = [
    "LayerRecalibration",
    "RecalibrationReport",
    "default_forward",
    "has_own_forward",
    "move_to_device",
    "recalibratable_layers",
    "recalibrate_bn",
]

ForwardFn = Callable[[nn.Module, Any], Any]
MaskFn = Callable[[Any], "Tensor | None"]  # a batch to its padding mask


@dataclass(frozen=True)
class LayerRecalibration:
    """What recalibration changed in one batch-norm layer.

    Attributes:
        name: the layer's name in the model (``model.named_modules()``).
        num_values: values per channel the statistics were computed from, summed over processes (batch items times
            spatial positions or tokens; the same for every channel).
        mean_shift: how far the old running mean was from the population mean, in units of the population standard
            deviation, averaged over channels: ``mean(|old_mean - mean| / sqrt(var + eps))``.
        var_shift: relative change of the variance, averaged over channels: ``mean(|old_var - var| / (var + eps))``.
    """

    name: str
    num_values: int
    mean_shift: float
    var_shift: float


@dataclass
class RecalibrationReport:
    """The result of :func:`recalibrate_bn`: one :class:`LayerRecalibration` per recomputed layer.

    Attributes:
        layers: recomputed layers by name, in model order.
        skipped: layers left as they were, by name, with the reason (frozen, ``track_running_stats=False``, not
            selected, saw no input).
        num_batches: batches that went through the model, summed over processes.
        num_passes: passes over the batches (1, or one per batch-norm depth level with ``exact_eval``).
    """

    layers: dict[str, LayerRecalibration] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    num_batches: int = 0
    num_passes: int = 0

    def metrics(self) -> dict[str, float]:
        """``bn/recal_mean_shift/<layer>`` and ``bn/recal_var_shift/<layer>`` for every recomputed layer."""
        out: dict[str, float] = {}
        for name, layer in self.layers.items():
            out[f"bn/recal_mean_shift/{name}"] = layer.mean_shift
            out[f"bn/recal_var_shift/{name}"] = layer.var_shift
        return out

    def __str__(self) -> str:
        width = max([len("layer")] + [len(n) for n in self.layers] + [len(n) for n in self.skipped])
        lines = [
            f"Batch-norm recalibration: {len(self.layers)} layer(s) from {self.num_batches} batch(es) "
            f"in {self.num_passes} pass(es)",
            f"  {'layer':<{width}}  {'values/channel':>14}  {'mean shift':>10}  {'var shift':>10}",
        ]
        for name, layer in self.layers.items():
            lines.append(
                f"  {name:<{width}}  {layer.num_values:>14}  {layer.mean_shift:>10.4g}  {layer.var_shift:>10.4g}"
            )
        for name, reason in self.skipped.items():
            lines.append(f"  {name:<{width}}  skipped: {reason}")
        return "\n".join(lines)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in ``batch`` (nested lists, tuples, named tuples and mappings) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def has_own_forward(model: nn.Module) -> bool:
    """True when ``model`` has a ``forward`` of its own: not ``nn.Module``'s placeholder, nor Lightning's
    ``LightningModule.forward``, which only calls it (checked by name, so Lightning is not imported here)."""
    if "forward" in model.__dict__:
        return True
    for klass in type(model).__mro__:
        if "forward" in klass.__dict__:
            lightning = klass.__module__.startswith(("lightning.", "pytorch_lightning."))
            return klass is not nn.Module and not (klass.__name__ == "LightningModule" and lightning)
    return False


_PASS_FORWARD = (
    "Pass `forward=lambda model, batch: ...` to say how to feed a batch (e.g. `lambda m, b: m.model(**b)`); "
    "BatchNormRecalibration feeds a LightningModule without a forward through its training_step by default."
)


def _check_call(model: nn.Module, batch: Any, args: tuple, kwargs: dict, how: str) -> None:
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"recalibrate_bn's default forward tried {how} with a batch of type {type(batch).__name__}, but "
            f"{type(model).__name__}.forward does not accept it: {err}. {_PASS_FORWARD}"
        ) from None
    except ValueError:  # no signature to check (some builtins): let the call decide
        pass


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed ``batch`` to ``model``: a tensor as ``model(batch)``, a tuple or list by its first tensor, a mapping as
    ``model(**batch)``.

    Raises:
        TypeError: ``model`` has no ``forward`` of its own (a LightningModule whose ``training_step`` calls an inner
            model), any other batch, a tuple or list without a tensor, or a batch the model's ``forward`` does not
            accept; the message says what was tried and how to pass ``forward``.
    """
    if isinstance(batch, Tensor):
        how = "model(batch)"
    elif isinstance(batch, (list, tuple)):
        how = "model(batch[<first tensor>])"
    elif isinstance(batch, Mapping):
        how = f"model(**batch) with keys {sorted(map(str, batch))}"
    else:
        raise TypeError(
            f"recalibrate_bn's default forward takes batches that are a tensor, a tuple or list (fed by its first "
            f"tensor) or a mapping (fed as keyword arguments), got {type(batch).__name__}. {_PASS_FORWARD}"
        )
    if not has_own_forward(model):
        raise TypeError(
            f"recalibrate_bn's default forward tried {how}, but {type(model).__name__} has no forward of its own "
            f"(calling it would raise from nn.Module's placeholder). {_PASS_FORWARD}"
        )
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)):
        first = next((item for item in batch if isinstance(item, Tensor)), None)
        if first is None:
            raise TypeError(
                f"recalibrate_bn's default forward feeds a tuple or list batch by its first tensor, but this "
                f"{type(batch).__name__} holds none (types: {[type(i).__name__ for i in batch]}). {_PASS_FORWARD}"
            )
        _check_call(model, batch, (first,), {}, how)
        return model(first)
    _check_call(model, batch, (), dict(batch), how)
    return model(**batch)


def recalibratable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers :func:`recalibrate_bn` recomputes by default: every layer the taxonomy describes as normalizing
    with batch statistics and keeping running ones (torch's, ours, third-party ones such as timm's
    ``BatchNormAct2d``)."""
    return [(name, m) for name, m, info in _batch_norms(model) if _recomputable(info)]


def _recomputable(info: NormInfo) -> bool:
    """Batch norm with running statistics, or PowerNorm (its running quadratic mean ``running_phi``)."""
    return (info.batch_stats and info.running_stats) or info.kind == "power"


def _stat_names(info: NormInfo) -> tuple[str, ...]:
    """The running buffers recalibration sets: ``running_mean``/``running_var``, or PowerNorm's ``running_phi``."""
    return ("running_phi",) if info.kind == "power" else ("running_mean", "running_var")


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` under the user's names: a ``torch.compile`` wrapper's ``_orig_mod`` left out."""
    return [(uncompiled_name(name), m) for name, m in model.named_modules()]


def _batch_norms(model: nn.Module) -> list[tuple[str, nn.Module, NormInfo]]:
    """Every batch-norm layer (batch statistics in training, or frozen) with its description, in model order."""
    return [
        (uncompiled_name(name), m, info)
        for name, m, info in find_norms(model)
        if info.batch_stats or info.kind in ("frozen_batch", "power")
    ]


def _select(
    model: nn.Module, modules: Iterable[str | nn.Module] | None
) -> tuple[dict[str, nn.Module], dict[str, NormInfo], dict[str, str]]:
    """Layers to recompute, by name in model order, their descriptions, and the batch-norm layers skipped with the
    reason."""
    named = dict(_named_modules(model))  # a compile wrapper and the module it wraps share a name: the latter wins
    skipped: dict[str, str] = {}
    infos: dict[str, NormInfo] = {}
    for name, _, info in _batch_norms(model):
        if info.kind == "frozen_batch":
            skipped[name] = "frozen batch norm"
        elif info.kind == "power":
            infos[name] = info
        elif not info.running_stats:
            skipped[name] = "track_running_stats=False"
        else:
            infos[name] = info
    candidates = {name: named[name] for name in infos}
    if modules is None:
        return candidates, infos, skipped
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    by_id = {id(m): n for n, m in named.items()}
    wanted: set[str] = set()
    for item in modules:
        if isinstance(item, str):
            name = item
            if name not in named:
                raise ValueError(
                    f"`modules` names {item!r}, which is not a module of the model; the layers that can be "
                    f"recalibrated are: {', '.join(candidates) or 'none'}"
                )
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"`modules` holds a {type(item).__name__} that is not part of the model")
            name = by_id[id(item)]
        else:
            raise TypeError(f"`modules` must hold module names or modules, got {type(item).__name__}: {item!r}")
        if name not in candidates:
            raise ValueError(
                f"`modules` selects {name!r} ({type(named[name]).__name__}), which is not a batch-norm layer with "
                f"running statistics; the layers that can be recalibrated are: {', '.join(candidates) or 'none'}"
            )
        wanted.add(name)
    for name in candidates:
        if name not in wanted:
            skipped[name] = "not selected by `modules`"
    return {n: m for n, m in candidates.items() if n in wanted}, {n: infos[n] for n in wanted}, skipped


class _Probe:
    """Finds which batch-norm layers feed which, from one batch: each layer's output is cut from the graph and
    marked as a leaf that requires grad, so the graph of a later layer's input leads back to exactly the batch-norm
    outputs it depends on."""

    def __init__(self) -> None:
        self.leaf_owner: dict[int, str] = {}
        self.leaves: list[Tensor] = []  # keeps the marked tensors alive so their ids stay unique
        self.edges: dict[str, set[str]] = {}
        self.active = True

    def stop(self) -> None:
        self.active = False
        self.leaves.clear()
        self.leaf_owner.clear()

    def upstream(self, x: Tensor) -> set[str]:
        found: set[str] = set()
        if x.grad_fn is None:
            if x.requires_grad and id(x) in self.leaf_owner:
                found.add(self.leaf_owner[id(x)])
            return found
        stack: list[Any] = [x.grad_fn]
        seen: set[Any] = set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)
            if variable is not None and id(variable) in self.leaf_owner:
                found.add(self.leaf_owner[id(variable)])
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
        return found

    def record(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        self.edges.setdefault(name, set()).update(self.upstream(x) - {name})
        leaf = out.detach().requires_grad_()
        self.leaf_owner[id(leaf)] = name
        self.leaves.append(leaf)
        return leaf.clone()  # not a leaf, so an in-place op after the layer (ReLU(inplace=True)) stays legal

    def levels(self, names: Sequence[str]) -> dict[str, int]:
        """Depth of each layer: 0 when no batch-norm layer feeds it, else 1 + the depth of its deepest feeder."""
        memo: dict[str, int] = {}

        def depth(name: str, path: frozenset[str]) -> int:
            if name in memo:
                return memo[name]
            feeders = [u for u in self.edges.get(name, ()) if u not in path]
            memo[name] = 1 + max((depth(u, path | {name}) for u in feeders), default=-1)
            return memo[name]

        return {n: depth(n, frozenset()) if n in self.edges else -1 for n in names}


def _affine_reader(module: nn.Module, info: NormInfo) -> Callable[[], tuple[Tensor | None, Tensor | None]]:
    """Reads the layer's scale and shift when called: FSDP2 puts the unsharded parameter under the same attribute for
    each forward (the one described is a shard); a scale or shift that is no parameter of the layer is the
    described one."""
    own = dict(module.named_parameters(recurse=False))
    scale_attr = next((n for n, p in own.items() if p is info.scale), None)
    shift_attr = next((n for n, p in own.items() if p is info.shift), None)

    def read() -> tuple[Tensor | None, Tensor | None]:
        weight = getattr(module, scale_attr) if scale_attr is not None else info.scale
        bias = getattr(module, shift_attr) if shift_attr is not None else info.shift
        return weight, bias

    return read


def _batch_stat_forward(
    module: nn.Module, info: NormInfo, name: str, sink: Tensor | None, probe: _Probe | None
) -> Callable:
    """Plain batch norm with the batch's own statistics, adding the input's channel moments to ``sink``.

    The layer's effective scale and shift, eps and layout come from its description, and what the layer does after
    normalizing (timm's ``BatchNormAct2d``: drop, act) follows as in its own forward. No running buffer is touched
    and nothing is synchronized across processes, so the result depends only on the batches, not on their order or
    on how they are spread over processes. The batch statistics come from the same float64 moments that are
    accumulated, so each input is read for statistics once.
    """
    post = [module.get_submodule(attr) for attr in info.post]
    affine = _affine_reader(module, info)
    label, eps = f"{name} ({type(module).__name__})", info.eps if info.eps is not None else 1e-5

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        cdim = channel_dim(info.layout, x.dim())
        mask = mask_for(x, cdim, strict=True, name=label)
        if mask is None:
            moments = channel_moments(x.detach(), cdim, dtype=torch.float64)
        else:
            moments = masked_channel_moments(x.detach(), mask, cdim, dtype=torch.float64)
        if sink is not None:
            sink.add_(moments)
        mean, var = mean_var(moments, unbiased=False)  # training-mode batch norm normalizes with the biased var
        if mask is not None:  # an all-padding batch: finite outputs, which later layers' masks leave out anyway
            var = torch.where(moments[COUNT] > 0, var, torch.ones_like(var))
        weight, bias = affine()
        stat_dtype = weight.dtype if weight is not None else x.dtype
        mean, var = mean.to(stat_dtype), var.to(stat_dtype)
        if cdim == 1:
            out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        elif cdim == x.dim() - 1:
            out = F.batch_norm(x.reshape(-1, x.shape[-1]), mean, var, weight, bias, False, 0.0, eps).reshape(x.shape)
        else:
            out = F.batch_norm(x.movedim(cdim, 1), mean, var, weight, bias, False, 0.0, eps).movedim(1, cdim)
        for layer in post:
            out = layer(out)
        return probe.record(name, x, out) if probe is not None and probe.active else out

    return forward


def _power_stat_forward(
    module: nn.Module, info: NormInfo, name: str, sink: Tensor | None, probe: _Probe | None
) -> Callable:
    """PowerNorm with the batch's own quadratic mean (its warm-up forward), adding the moments of its group-scaled
    input (real tokens only under a mask) to ``sink``; no buffer is touched."""

    affine = _affine_reader(module, info)
    label, eps = f"{name} ({type(module).__name__})", info.eps if info.eps is not None else 1e-5
    groups = int(getattr(module, "num_groups", 1))

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        cdim = channel_dim(info.layout, x.dim())
        mask = mask_for(x, cdim, strict=True, name=label)
        scaled = group_scaling(x.detach(), cdim, groups)
        if mask is None:
            moments = channel_moments(scaled, cdim, dtype=torch.float64)
        else:
            moments = masked_channel_moments(scaled, mask, cdim, dtype=torch.float64)
        if sink is not None:
            sink.add_(moments)
        quadratic_mean = moments[SUM_SQ] / moments[COUNT].clamp_min(1.0)
        ndim = x.dim()
        weight, bias = affine()
        out = scaled * per_channel(torch.rsqrt(quadratic_mean + eps).to(x.dtype), ndim, cdim)
        if weight is not None:
            out = out * per_channel(weight.to(x.dtype), ndim, cdim)
        if bias is not None:
            out = out + per_channel(bias.to(x.dtype), ndim, cdim)
        return probe.record(name, x, out) if probe is not None and probe.active else out

    return forward


class _ModelState:
    """Everything recalibration changes on a model, to put back afterwards: modes, forwards, ``requires_grad`` and
    the buffers of every batch-norm layer."""

    _MISSING = object()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.buffers = [
            (m, name, buf.detach().clone())
            for _, m, _ in _batch_norms(model)
            for name, buf in m.named_buffers(recurse=False)
            if buf is not None
        ]
        self.forwards: dict[nn.Module, Any] = {}

    def override_forward(self, module: nn.Module, fn: Callable | None) -> None:
        """Replace ``module.forward`` by ``fn`` (None: put the original back)."""
        if module not in self.forwards:
            self.forwards[module] = module.__dict__.get("forward", self._MISSING)
        original = self.forwards[module]
        if fn is not None:
            module.forward = fn  # type: ignore[method-assign]
        elif original is self._MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = original  # type: ignore[method-assign]

    def restore(self, keep: set[tuple[int, str]]) -> None:
        """Put everything back, except the buffers listed in ``keep`` as ``(id(module), buffer name)``."""
        for module in list(self.forwards):
            self.override_forward(module, None)
        for m, training in self.modes:
            m.training = training
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        with torch.no_grad():
            for m, name, saved in self.buffers:
                if (id(m), name) not in keep:
                    getattr(m, name).copy_(saved)


def _buffer(module: nn.Module, name: str) -> Tensor:
    """A batch-norm buffer that is known to exist (selected layers track running statistics)."""
    buf = getattr(module, name)
    assert isinstance(buf, Tensor), f"{type(module).__name__}.{name} is not a tensor"
    return buf


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _progress_bar(total: int | None, desc: str) -> Any:
    rank_zero = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if not rank_zero:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _limited(batches: Iterable, num_batches: int | None) -> Iterator:
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def _check_args(batches: Any, num_batches: Any, forward: Any, exact_eval: bool) -> None:
    check_positive_int("num_batches", num_batches, allow_none=True, none_means="all batches")
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be callable as forward(model, batch) or None, got {forward!r}")
    if isinstance(batches, (Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"`batches` must be an iterable of batches (a DataLoader, a list, a generator), "
            f"got {type(batches).__name__}"
        )
    if exact_eval and iter(batches) is batches:
        raise ValueError(
            "`exact_eval=True` passes over `batches` once per batch-norm depth level, so `batches` must be "
            f"re-iterable (a DataLoader or a list), got a one-shot iterator ({type(batches).__name__})"
        )


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    forward: ForwardFn | None = None,
    modules: Iterable[str | nn.Module] | None = None,
    progress: bool = False,
    exact_eval: bool = False,
    group: dist.ProcessGroup | None = None,
    padding_mask_from: MaskFn | None = None,
) -> RecalibrationReport:
    """Set the running statistics of every batch-norm layer to the exact population statistics over ``batches``.

    The batches go forward without gradients, every module in eval mode (dropout off) except the batch-norm
    layers being recomputed, which are in train mode and normalize each input with its own batch statistics (plain
    batch norm: no per-batch synchronization, ghost batches or renorm corrections, and no running buffer touched
    while the batches go through). Hooked on each layer's input, per-channel counts, sums and sums of squares
    accumulate in float64 over every call (a layer called several times per forward pools all its calls). One
    reduction across the processes of ``group`` follows (every process must call ``recalibrate_bn``), and each
    layer's ``running_mean`` and ``running_var`` become the mean and the unbiased variance of the union of all
    processes' inputs, identical on every process. ``num_batches_tracked``, modes, momenta, ``requires_grad``,
    forwards and every other buffer are as before afterwards, also when an exception passes through (then the
    running statistics are the old ones too).

    A ``torch.compile``'d model (or one holding compiled submodules) is recalibrated eagerly, under
    ``torch.compiler.set_stance("force_eager")``: the modes and forwards it changes compile nothing, and the graphs
    compiled for training are used again afterwards. Layer names are the user's (no ``_orig_mod``).

    Recomputed by default: every layer :func:`lightning_bn.describe_norm` describes as normalizing with batch
    statistics and keeping running ones: torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, this package's
    batch-norm kinds, third-party ones (timm's ``BatchNormAct2d``, whose activation still follows), channels-first or
    channels-last as the taxonomy says. Skipped: frozen batch norm and layers with ``track_running_stats=False``; a
    layer that saw no input keeps its statistics, with a warning.

    Padded sequences: while a :func:`lightning_bn.padding_mask` is active, each layer whose input fits the mask
    (its shape without the channel dimension) accumulates the moments of the real tokens only, so the statistics are
    the exact population statistics of the real tokens (a mask that does not fit a layer's input raises, naming the
    layer). The mask is set either by the feeding itself (``forward``, or the model's own ``training_step`` or
    hooks such as :func:`lightning_bn.set_padding_mask_from`, which see the batch's ``attention_mask``), or by
    ``padding_mask_from(batch)``, which maps each batch (already on the model's device) to its mask, entered around
    the feeding of that batch (a mask the feeding enters itself is the innermost and wins). PowerNorm layers (kind
    ``"power"``) are recomputed too: their ``running_phi`` becomes the population quadratic mean of their
    group-scaled (real) inputs, their ``ema_gz`` and ``iters`` stay; their report's ``mean_shift`` is 0 and
    ``var_shift`` compares the quadratic means.

    With ``exact_eval=True`` the statistics of each layer are taken from the inputs inference will give it: the
    layers are recomputed depth level by depth level (a layer's level is one more than that of the deepest
    batch-norm layer feeding it, found from the autograd graph of the first batch), with the layers of earlier
    levels already in eval mode with their new statistics. Exact for the eval-mode model and independent of how the
    samples are grouped into batches, at the cost of one pass over ``batches`` per level (a plain ResNet block
    stack has about one level per layer); the default single pass approximates the upstream layers' eval outputs
    by batch-statistics outputs, which is close for large batches. ``batches`` must then be re-iterable, and
    should give the same samples on every pass (with ``num_batches`` and a shuffling loader it would not).

    Args:
        model: any module; it stays on its device, and tensors in the batches are moved there.
        batches: an iterable of batches (a DataLoader, a list, a generator); under DDP each process its own shard.
        num_batches: use at most this many batches per process (default: all).
        forward: ``forward(model, batch)`` feeds one batch (already moved to the model's device); by default
            :func:`default_forward` (a tensor, the first tensor of a tuple or list, or a mapping as keywords), which
            needs a model with a ``forward`` of its own.
        modules: recompute only these layers (names or modules); the other layers run in eval mode.
        progress: show a tqdm progress bar on process zero.
        exact_eval: recompute level by level from eval-mode features (see above).
        group: the process group to reduce over (default: the world when initialized).
        padding_mask_from: ``padding_mask_from(batch)`` gives the batch's boolean ``(N, *)`` mask (True, or
            nonzero, at a real token) or None; each batch is fed under :func:`lightning_bn.padding_mask` of it.

    Returns:
        A :class:`RecalibrationReport`: per layer the relative change of mean and variance and the values used.

    Raises:
        ValueError: ``batches`` gave no batch on any process, a bad ``num_batches``, ``modules`` naming a layer
            that is not in the model or cannot be recalibrated, or ``exact_eval`` with a one-shot iterator.
        TypeError: ``batches`` is not iterable, ``padding_mask_from`` is not callable or returns something that is
            not a tensor, or the default ``forward`` cannot feed a batch to the model (no
            ``forward`` of its own, or one that does not take the batch); the message says what was tried and how
            to pass ``forward``.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> report = recalibrate_bn(model, [torch.randn(32, 4) for _ in range(3)])
        >>> report.layers["1"].num_values
        96
    """
    _check_args(batches, num_batches, forward, exact_eval)
    if padding_mask_from is not None and not callable(padding_mask_from):
        raise TypeError(
            f"`padding_mask_from` must be callable as padding_mask_from(batch) -> mask or None, "
            f"got {padding_mask_from!r}"
        )
    selected, infos, skipped = _select(model, modules)
    report = RecalibrationReport(skipped=skipped)
    if not selected:
        warnings.warn(
            f"recalibrate_bn: {type(model).__name__} has no batch-norm layer with running statistics to recompute "
            f"(skipped: {', '.join(f'{n} ({r})' for n, r in skipped.items()) or 'none'}); the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return report
    feed = forward or default_forward
    device = _model_device(model)
    names = list(selected)
    old = {n: _old_stats(m, infos[n]) for n, m in selected.items()}
    state = _ModelState(model)
    new_stats: dict[str, tuple[Tensor, Tensor, int]] = {}
    no_input: list[str] = []
    finalized: set[str] = set()
    levels: dict[str, int] = {n: 0 for n in names}
    eager = contextlib.ExitStack()
    if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
        # Compiled regions run eagerly while the modes and forwards are changed: nothing is traced or compiled for
        # them, and the graphs compiled for training stay valid (the stance it found is restored on exit).
        eager.enter_context(torch.compiler.set_stance("force_eager"))
    try:
        model.eval()
        level, max_level = 0, 0
        while level <= max_level:
            todo = [n for n in names if n not in finalized and levels[n] <= level]
            sinks = {n: torch.zeros(3, infos[n].num_features, dtype=torch.float64, device=device) for n in todo}
            probe = _Probe() if exact_eval and level == 0 else None
            for name, m in selected.items():
                if name in finalized:  # an earlier level: inference behaviour with its new statistics
                    m.training = False
                    state.override_forward(m, None)
                else:
                    m.training = True
                    stat_forward = _power_stat_forward if infos[name].kind == "power" else _batch_stat_forward
                    state.override_forward(m, stat_forward(m, infos[name], name, sinks.get(name), probe))
            seen = _one_pass(
                model, batches, num_batches, feed, device, probe, progress, level, max_level, state, padding_mask_from
            )
            buffer = torch.cat([sinks[n].flatten() for n in todo] + [torch.tensor([float(seen)], device=device,
                                                                                  dtype=torch.float64)])
            max_mask = None
            if probe is not None:
                probed = probe.levels(names)
                buffer = torch.cat([buffer, torch.tensor([probed[n] for n in names], dtype=torch.float64,
                                                         device=device)])
                max_mask = torch.zeros_like(buffer, dtype=torch.bool)
                max_mask[-len(names):] = True
            reduced = reduce_across_processes(buffer, max_mask=max_mask, group=group)
            if probe is not None:
                agreed = reduced[-len(names):].long().tolist()
                reduced = reduced[: -len(names)]
                max_level = max(agreed)
                # a layer no probe reached (called only on later batches) is recomputed in the last pass
                levels = {n: (lv if lv >= 0 else max_level) for n, lv in zip(names, agreed)}
            total_batches = int(reduced[-1].item())
            if level == 0:
                report.num_batches = total_batches
                if total_batches == 0:
                    raise ValueError(
                        "`batches` gave no batch on any process: recalibration needs at least one batch "
                        f"(got an empty {type(batches).__name__})"
                    )
            moments = reduced[:-1].view(-1)
            views, offset = [], 0
            for name in todo:
                size = 3 * infos[name].num_features
                views.append(moments[offset: offset + size].view(3, -1))
                offset += size
            counts = torch.stack([mom[COUNT].max() for mom in views]).tolist() if views else []  # one host read
            for name, mom, count_value in zip(todo, views, counts):
                m = selected[name]
                if levels[name] > level:
                    continue  # collected only because pass 0 collects everything; a later level recomputes it
                finalized.add(name)
                count = int(count_value)
                if count == 0:
                    no_input.append(name)
                    continue
                if infos[name].kind == "power":
                    # The population quadratic mean; no mean is kept (the report's mean shift is 0).
                    var = mom[SUM_SQ] / mom[COUNT].clamp_min(1.0)
                    mean = torch.zeros_like(var)
                    with torch.no_grad():
                        running_phi = _buffer(m, "running_phi")
                        running_phi.copy_(var.to(running_phi.dtype))
                else:
                    mean, var = mean_var(mom, unbiased=True)
                    with torch.no_grad():
                        running_mean, running_var = _buffer(m, "running_mean"), _buffer(m, "running_var")
                        running_mean.copy_(mean.to(running_mean.dtype))
                        running_var.copy_(var.to(running_var.dtype))
                new_stats[name] = (mean, var, count)
            report.num_passes += 1
            level += 1
        keep = {(id(selected[n]), b) for n in new_stats for b in _stat_names(infos[n])}
    except BaseException:
        state.restore(keep=set())
        raise
    finally:
        eager.close()
    state.restore(keep=keep)
    for name in names:
        if name in new_stats:
            mean, var, count = new_stats[name]
            eps = infos[name].eps
            old_mean, old_var = (t.to(torch.float64) for t in old[name])
            scale = var + (eps if eps is not None else 1e-5)
            report.layers[name] = LayerRecalibration(
                name=name,
                num_values=count,
                mean_shift=float(((old_mean - mean).abs() / scale.sqrt()).mean()),
                var_shift=float(((old_var - var).abs() / scale).mean()),
            )
        elif name in no_input:
            report.skipped[name] = "saw no input"
    if no_input:
        warnings.warn(
            f"recalibrate_bn: no input reached {', '.join(no_input)} on any process; their running statistics are "
            f"unchanged",
            UserWarning,
            stacklevel=2,
        )
    return report


def _old_stats(module: nn.Module, info: NormInfo) -> tuple[Tensor, Tensor]:
    """The running mean and variance before recalibration (PowerNorm: zeros and ``running_phi``)."""
    if info.kind == "power":
        phi = _buffer(module, "running_phi").detach().clone()
        return torch.zeros_like(phi), phi
    return _buffer(module, "running_mean").detach().clone(), _buffer(module, "running_var").detach().clone()


def _batch_mask(padding_mask_from: MaskFn | None, batch: Any) -> Tensor | None:
    if padding_mask_from is None:
        return None
    mask = padding_mask_from(batch)
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(
            f"`padding_mask_from` must return a tensor (True, or nonzero, at a real token) or None, "
            f"got {type(mask).__name__}"
        )
    return mask if mask is None or mask.dtype == torch.bool else mask != 0


def _one_pass(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None,
    feed: ForwardFn,
    device: torch.device,
    probe: _Probe | None,
    progress: bool,
    level: int,
    max_level: int,
    state: _ModelState,
    padding_mask_from: MaskFn | None = None,
) -> int:
    """Feed the batches once; the first goes with autograd on when ``probe`` maps the layers' dependencies."""
    total = num_batches
    if hasattr(batches, "__len__"):
        try:
            total = len(batches) if num_batches is None else min(num_batches, len(batches))  # type: ignore[arg-type]
        except TypeError:
            pass
    bar = _progress_bar(total, f"recalibrating batch norm (pass {level + 1})") if progress else None
    seen = 0
    try:
        for batch in _limited(batches, num_batches):
            batch = move_to_device(batch, device)
            mask = _batch_mask(padding_mask_from, batch)
            with padding_mask(mask) if mask is not None else contextlib.nullcontext():
                _feed_one(model, batch, feed, probe if seen == 0 else None, state)
            seen += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return seen


def _feed_one(model: nn.Module, batch: Any, feed: ForwardFn, probe: _Probe | None, state: _ModelState) -> None:
    """One batch forward; with ``probe`` (the first batch of a probing pass) with autograd on."""
    if probe is None:
        with torch.no_grad():
            feed(model, batch)
        return
    for p, _ in state.requires_grad:
        p.requires_grad_(False)
    with torch.enable_grad():
        feed(model, batch)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    probe.stop()  # the graph is known: the rest of the pass runs without autograd
