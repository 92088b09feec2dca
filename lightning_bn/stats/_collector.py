"""Collect per-layer statistics on demand into one on-device buffer; one reduction, one transfer to the host.

A :class:`LayerStatsCollector` watches a fixed list of modules. Between :meth:`~LayerStatsCollector.attach` and
:meth:`~LayerStatsCollector.detach` it holds one forward hook per watched module that adds sufficient statistics of
each watched module's output, of a normalization layer's input, of the gradient with respect to the output (through a
tensor hook) and of a batch-norm layer's batch to the collection started by ``attach``. Any number of forwards and
backwards may run in between (gradient accumulation): the figures are those of their union.
:meth:`~LayerStatsCollector.finalize` lays the collection out in the named fields of one buffer
(:mod:`lightning_bn.stats._fields`), reduces it across processes in one collective
(:func:`lightning_bn.moments.reduce_across_processes`), brings it to the host in one transfer and computes the
figures with one pure function of the fields (:func:`lightning_bn.stats._figures.compute_figures`). Outside
``attach``/``detach`` the model carries none of the collector's hooks.

Activation checkpointing: a forward run while autograd executes a backward pass is a recomputation
(``torch.utils.checkpoint``, reentrant or not); its output statistics are not counted again, but a gradient hook is
still registered on it, because with reentrant checkpointing only the recomputed output is part of the graph. A
gradient hook fires only for a tensor that takes part in the backward pass, so each gradient is counted once.

Padding: under :func:`lightning_bn.padding_mask`, a tensor whose dimensions other than the last match the mask (a
channels-last ``(N, T, C)`` for an ``(N, T)`` mask) is summarized over its real tokens only, and so is its gradient
(the mask active at the forward is kept for the gradient hook); a batch-norm layer's batch moments count the real
tokens of its input in its own layout (as the mask-aware layers do). Every other tensor is summarized whole.

``torch.compile``: the hooks are eager code. A hook that dynamo traces (hooks present while a compiled region
compiles) returns at once, so it never breaks a graph, and counts nothing. Run the collected forward and backward
under ``torch.compiler.set_stance("force_eager")`` on a compiled model (the monitor does) and every hook fires.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_bn.moments import (
    SUMMARY_FIELDS,
    channel_moments,
    distributed_world_size,
    reduce_across_processes,
    shard_copies,
    shard_sums_of_squares,
)
from lightning_bn.padding import active_padding_mask
from lightning_bn.stats import _fields
from lightning_bn.stats._fields import (
    ACTIVATION_GRAD_STATS,
    ACTIVATION_STATS,
    SHARDED_PARAM_FIELDS,
    FieldViews,
    Layout,
    Reduction,
    TensorField,
    accumulate,
)
from lightning_bn.stats._figures import AREAS, FigureSpec, LayerStats, area_stats, compute_figures, tensor_keys
from lightning_bn.stats._histogram import LogBins, bin_counts
from lightning_bn.stats._names import uncompiled_modules
from lightning_bn.stats._select import has_batch_stats, is_norm
from lightning_bn.stats._summary import summary_row

__all__ = [
    "LayerStats",
    "LayerStatsCollector",
    "ACTIVATION_STATS",
    "ACTIVATION_GRAD_STATS",
    "in_backward_pass",
    "real_tokens",
]


def real_tokens(t: Tensor, mask: Tensor | None, channel_dim: int = -1) -> Tensor:
    """The ``(R, C)`` rows of ``t`` at the real tokens of ``mask`` when ``mask`` fits ``t``'s dimensions other than
    ``channel_dim`` (a copy: boolean indexing), else ``t`` itself."""
    if mask is None or t.dim() < 2:
        return t
    cdim = channel_dim % t.dim()
    if tuple(t.shape[:cdim] + t.shape[cdim + 1 :]) != tuple(mask.shape):
        return t
    return t.detach().movedim(cdim, -1)[mask.to(t.device)]


def in_backward_pass() -> bool:
    """True while autograd runs a backward pass on this thread (a checkpointed forward is being recomputed)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


def _float_tensors(obj: Any) -> Iterator[Tensor]:
    """The real floating-point tensors of a module output: a tensor, or those inside tuples, lists and dicts.

    Integer, boolean and complex tensors are not activations here (a complex spectrum has no order for a maximum).
    """
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _float_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _float_tensors(item)


def _running(module: nn.Module) -> tuple[Tensor, Tensor]:
    """A batch-norm layer's running mean and variance, typed (``nn.Module`` types its buffers loosely)."""
    mean, var = module.running_mean, module.running_var
    assert isinstance(mean, Tensor) and isinstance(var, Tensor)
    return mean, var


def _to(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """L2 norms of many tensors in one foreach kernel: float32 when all are float32, else float64 (a half norm
    overflows at 65504, and the kernel takes one accumulation dtype that no input may be narrowed to)."""
    if all(t.dtype == torch.float32 for t in tensors):
        return list(torch._foreach_norm(tensors, 2))
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float64))


class _Summarized(NamedTuple):
    """The last output summarized, so that the next layer's input (usually the same tensor) is not read again."""

    tensor: weakref.ref
    version: int
    row: Tensor | list[float]
    producer: int
    channel_sums: Tensor | None
    channel_dim: int | None
    mask: Tensor | None  # the padding mask it was summarized under


@dataclass
class _Collection:
    """What one collection (``attach`` to ``finalize``) gathers; ``attach`` starts a fresh one."""

    histograms: bool = False
    bn_snapshot: tuple[Tensor, Tensor] | None = None  # every layer's running means and variances at attach
    # per area: the summary rows (lists of floats where read back on the CPU, else tensors) and their modules
    rows: dict[str, list[Tensor | list[float]]] = field(default_factory=lambda: {a: [] for a in AREAS})
    modules: dict[str, list[int]] = field(default_factory=lambda: {a: [] for a in AREAS})
    recent: _Summarized | None = None  # the last output summarized
    act_hist: dict[int, Tensor] = field(default_factory=dict)
    bn_moments: list[tuple[int, Tensor, float]] = field(default_factory=list)  # (module, (2, C) sums, values/channel)
    order: dict[int, None] = field(default_factory=dict)  # modules in the order of their first forward
    # parameter figures, by parameter index
    weight_norm: dict[int, Tensor] = field(default_factory=dict)
    grad_norm: dict[int, Tensor] = field(default_factory=dict)
    update_norm: dict[int, Tensor] = field(default_factory=dict)
    grad_abs_max: dict[int, Tensor] = field(default_factory=dict)
    param_abs_max: dict[int, Tensor] = field(default_factory=dict)
    before: dict[int, Tensor] = field(default_factory=dict)  # weights at record_params, for the update norms
    param_hist: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    copies: dict[int, int] = field(default_factory=dict)  # sharded parameters: processes holding each element
    device: torch.device | None = None  # of the first tensor summarized; an accelerator's if any is on one
    forwards: int = 0  # forward hook calls counted (for tests and diagnostics)
    summaries: int = 0  # tensors summarized (a norm input that was just summarized is not again)

    def add_row(self, area: str, module: int, row: Tensor | list[float], device: torch.device) -> None:
        self.rows[area].append(row)
        self.modules[area].append(module)
        if self.device is None or self.device.type == "cpu":
            self.device = device


class LayerStatsCollector:
    """Per-layer statistics of a list of modules, collected only while attached.

    Args:
        modules: ``(name, module)`` pairs to watch (see :func:`lightning_bn.stats.select_modules`). Names are
            written without the ``_orig_mod`` that ``torch.compile`` wrappers add (``net._orig_mod.0`` is
            ``net.0``); a wrapper listed with the module it wraps is watched once, as that module.
        activations: collect output (and normalization-input) statistics.
        activation_grads: collect statistics of the gradient with respect to each output.
        batch_norm: collect batch-versus-running statistics of batch-norm layers.
        params: collect weight, gradient and update norms of the watched modules' own parameters.
        zero_tol: a value with ``|x| <= zero_tol`` counts as zero (dead).
        gamma_tol: a batch-norm scale with ``|gamma| < gamma_tol`` counts as small.
        bins: histogram bins (used by ``attach(histograms=True)``).
        dtype: accumulation dtype of the buffer (float64 keeps sums over many micro-batches exact).
        prefix: put before every metric key (e.g. ``"val_"`` gives ``val_act/std/<module>``).

    Modules that run as TorchScript (``torch.jit.ScriptModule``, listed in ``unhooked``) get no hook: Python hooks do
    not run there. Their parameter figures and batch-norm scales are still collected.

    Raises:
        ValueError: ``zero_tol`` or ``gamma_tol`` negative, or a module listed twice under different names.
    """

    def __init__(
        self,
        modules: Sequence[tuple[str, nn.Module]],
        *,
        activations: bool = True,
        activation_grads: bool = True,
        batch_norm: bool = True,
        params: bool = True,
        zero_tol: float = 0.0,
        gamma_tol: float = 1e-3,
        bins: LogBins | None = None,
        dtype: torch.dtype = torch.float64,
        prefix: str = "",
    ) -> None:
        if zero_tol < 0:
            raise ValueError(f"`zero_tol` must be >= 0, got {zero_tol!r}")
        if gamma_tol < 0:
            raise ValueError(f"`gamma_tol` must be >= 0, got {gamma_tol!r}")
        seen: dict[int, str] = {}
        for name, module in modules:
            if id(module) in seen:
                raise ValueError(f"`modules` lists one module twice, as {seen[id(module)]!r} and {name!r}")
            seen[id(module)] = name
        self.modules = uncompiled_modules(modules)
        self.names = [n for n, _ in self.modules]
        self.activations, self.activation_grads = activations, activation_grads
        self.batch_norm, self.params = batch_norm, params
        self.zero_tol, self.gamma_tol = float(zero_tol), float(gamma_tol)
        self.bins = bins or LogBins()
        self.dtype = dtype
        self.prefix = prefix
        self.is_norm = [is_norm(m) for _, m in self.modules]
        self.bn_index = [i for i, (_, m) in enumerate(self.modules) if has_batch_stats(m)]
        # TorchScript runs no Python hook (torch refuses one on a scripted module; on its children it never fires)
        self.unhooked = [name for name, m in self.modules if isinstance(m, torch.jit.ScriptModule)]
        self.param_list: list[tuple[str, nn.Parameter]] = []
        seen_params: set[int] = set()
        for name, module in self.modules:
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in seen_params:
                    seen_params.add(id(p))
                    self.param_list.append((f"{name}.{pname}" if name else pname, p))
        # A per-tensor row holds the fields of TENSOR_FIELDS in order: summary_row's six, then the measured ones.
        tensor_fields, width = _fields.TENSOR_FIELDS, len(SUMMARY_FIELDS)
        fused = tuple(f.name for f in tensor_fields if f.measure is None)
        if fused != SUMMARY_FIELDS or any(f.measure is not None for f in tensor_fields[:width]):
            raise ValueError(f"TENSOR_FIELDS must start with {SUMMARY_FIELDS} (no measure), then measured fields")
        self._measured = list(tensor_fields[width:])
        # The per-tensor fields each area keeps: those its statistics need, and always count and non-finite
        # (together they tell whether the area saw anything).
        self._areas = [a for a in AREAS if (self.activation_grads if a == "act_grad" else self.activations)]
        self._area_fields: dict[str, list[tuple[int, TensorField]]] = {}
        for area in self._areas:
            needed = {"count", "nonfinite"}.union(*(s.needs for s in area_stats(area)))
            self._area_fields[area] = [(col, f) for col, f in enumerate(tensor_fields) if f.name in needed]
        grad_needs = {f.name for _, f in self._area_fields.get("act_grad", [])}
        self._grad_full = bool(grad_needs & {"sum", "zeros"})  # gradients skip both unless a statistic needs them
        self._keys = {
            area: tuple(tensor_keys(prefix, area, name) if area != "act_in" or self.is_norm[i] else ()
                        for i, name in enumerate(self.names))
            for area in self._areas
        }
        self._handles: list[Any] = []
        self._hooks = [self._make_hook(i) for i in range(len(self.modules))]
        self._scratch_buffers: dict[torch.dtype, Tensor] = {}
        # module index -> (channel dim, channels) of the batch-norm layer its output fed in an earlier collection
        self._feeds_bn: dict[int, tuple[int, int]] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._state = _Collection()

    # ------------------------------------------------------------------ state
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def histograms(self) -> bool:
        """Whether the current collection bins histograms (chosen at ``attach``)."""
        return self._state.histograms

    @property
    def forwards(self) -> int:
        """Forward hook calls counted in the current collection (recomputations under checkpointing are not)."""
        return self._state.forwards

    @property
    def summaries(self) -> int:
        """Tensors summarized in the current collection."""
        return self._state.summaries

    def num_hooks(self) -> int:
        """Module hooks this collector holds now (0 when detached)."""
        return len(self._handles)

    # ------------------------------------------------------------------ hooks
    def attach(self, histograms: bool = False) -> None:
        """Register the hooks and start a fresh collection.

        The running statistics of the batch-norm layers are snapshotted here, in one copy: the batch-versus-running
        figures compare each batch with the running statistics from before the collection's first forward.

        Raises:
            RuntimeError: already attached.
        """
        if self.attached:
            raise RuntimeError("LayerStatsCollector.attach() called while already attached; call detach() first")
        self._state = _Collection(histograms=bool(histograms))
        try:
            if self.batch_norm and self.bn_index:
                with torch.no_grad():
                    running = [_running(self.modules[i][1]) for i in self.bn_index]
                    device = running[0][0].device
                    # cat copies: later updates do not show
                    means = torch.cat([_to(mean, device) for mean, _ in running]).to(self.dtype)
                    variances = torch.cat([_to(var, device) for _, var in running]).to(self.dtype)
                    self._state.bn_snapshot = (means, variances)
            for i, (_, module) in enumerate(self.modules):
                if not isinstance(module, torch.jit.ScriptModule):
                    self._handles.append(module.register_forward_hook(self._hooks[i]))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook (idempotent). The collected figures stay until the next ``attach``."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _scratch(self, like: Tensor) -> Tensor | None:
        """A reusable 1-d buffer for ``like`` on the CPU (where a fresh large allocation costs page faults)."""
        if like.device.type != "cpu":
            return None
        # summary_row widens half and bfloat16 to float32 before it counts: the buffer has the widened dtype
        key = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        buf = self._scratch_buffers.get(key)
        n = like.numel()
        if buf is None or buf.numel() < n:
            buf = self._scratch_buffers[key] = torch.empty(n, dtype=key)
        return buf

    def _row(self, t: Tensor, full: bool = True, totals: Tensor | None = None) -> Tensor | list[float]:
        """One per-tensor row in the column order of ``TENSOR_FIELDS``."""
        row = summary_row(t, self.zero_tol, full=full, scratch=self._scratch(t) if full else None, totals=totals)
        if not self._measured:
            return row
        measured = [f.measure(t.detach()) for f in self._measured]  # type: ignore[misc]
        if isinstance(row, list):
            return row + [float(m) for m in measured]
        return torch.cat([row, torch.stack([m.to(row) for m in measured])])

    def _make_hook(self, i: int) -> Any:
        norm, bn = self.is_norm[i], i in self.bn_index
        grad_hook = self._make_grad_hook(i)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if torch.compiler.is_compiling():
                return  # traced by dynamo: count nothing rather than break the graph (see the module docstring)
            state = self._state
            if type(output) is Tensor:
                outputs = [output] if output.is_floating_point() else []
            else:
                outputs = list(_float_tensors(output))
            mask = active_padding_mask()
            if not in_backward_pass():
                state.forwards += 1
                state.order.setdefault(i)
                x = args[0] if args and isinstance(args[0], Tensor) else None
                sums = None  # the input's channel sums, when its producer computed them with its summary
                if self.activations:
                    # the input first: it is usually the previous watched output, still in the one-entry cache
                    if norm and x is not None:
                        reused = self._add_summary(state, "act_in", i, x, mask=mask)
                        if bn and reused is not None:
                            # from the next collection on, the producer computes the channel sums of its output
                            # along with its summary (they give its sum and sum of squares) and this layer reuses them
                            cdim = self._channel_dim(module, x)
                            self._feeds_bn[reused.producer] = (cdim, _running(module)[0].numel())
                            sums = reused.channel_sums if reused.channel_dim == cdim else None
                    for t in outputs:
                        real = real_tokens(t, mask)  # one selection (a copy under a mask) for summary and histogram
                        self._add_summary(state, "act", i, t, producer=True, mask=mask, real=real)
                        if state.histograms:
                            self._add_hist(state, i, real)
                if bn and self.batch_norm and x is not None:
                    self._add_bn_moments(state, i, module, x, sums, mask)
            if self.activation_grads:
                for t in outputs:
                    if t.requires_grad:
                        # the gradient runs after the forward has left the mask's block: bind the mask now
                        t.register_hook(grad_hook if mask is None else functools.partial(grad_hook, mask=mask))

        return hook

    def _make_grad_hook(self, i: int) -> Any:
        def grad_hook(grad: Tensor, mask: Tensor | None = None) -> None:
            if torch.compiler.is_compiling():
                return
            grad = real_tokens(grad, mask)
            state = self._state
            # by default RMS, max and non-finite fraction only (ACTIVATION_GRAD_STATS): no sum or zeros
            state.add_row("act_grad", i, self._row(grad, full=self._grad_full), grad.device)
            state.summaries += 1

        return grad_hook

    def _add_summary(
        self,
        state: _Collection,
        area: str,
        i: int,
        t: Tensor,
        producer: bool = False,
        mask: Tensor | None = None,
        real: Tensor | None = None,
    ) -> _Summarized | None:
        """Summarize ``t`` (its real tokens under ``mask``: ``real`` where the caller selected them already) as module
        ``i``'s ``area``; returns the cache entry when ``t`` is the output just summarized under the same mask (then
        its row is reused)."""
        version = None if t.is_inference() else t._version  # inference tensors have no version counter
        cached = state.recent
        if (
            version is not None
            and cached is not None
            and cached.tensor() is t
            and cached.version == version
            and cached.mask is mask
        ):
            state.add_row(area, i, cached.row, t.device)
            return cached
        real = real_tokens(t, mask) if real is None else real
        sums, cdim = None, None
        if producer and i in self._feeds_bn:
            cdim, channels = self._feeds_bn[i]
            # the consumer's moments count the real tokens of its own layout: the same selection for channels last
            if real is t:
                sums = self._channel_sums(t, cdim, channels)
            elif cdim == t.dim() - 1:
                sums = self._channel_sums(real, real.dim() - 1, channels)
        row = self._row(real, totals=None if sums is None else sums.sum(1))
        state.summaries += 1
        state.add_row(area, i, row, t.device)
        if producer and version is not None:
            state.recent = _Summarized(weakref.ref(t), version, row, i, sums, cdim, mask)
        return None

    def _add_hist(self, state: _Collection, i: int, t: Tensor) -> None:
        counts = bin_counts(t, self.bins, self.dtype)
        state.act_hist[i] = counts if i not in state.act_hist else state.act_hist[i] + counts

    @staticmethod
    def _channel_dim(module: nn.Module, x: Tensor) -> int:
        return 1 if getattr(module, "layout", "channels_first") == "channels_first" else x.dim() - 1

    def _add_bn_moments(
        self,
        state: _Collection,
        i: int,
        module: nn.Module,
        x: Tensor,
        sums: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> None:
        channels = _running(module)[0].numel()
        cdim = self._channel_dim(module, x)
        real = real_tokens(x, mask, cdim)
        if real is not x:
            x, cdim = real, 1  # (R, C)
        if sums is None or sums.shape[-1] != channels:
            sums = self._channel_sums(x, cdim, channels)
        if sums is not None:
            state.bn_moments.append((i, sums, x.numel() / sums.shape[-1]))

    @staticmethod
    def _channel_sums(x: Tensor, cdim: int, channels: int) -> Tensor | None:
        """Per-channel sums and sums of squares ``(2, C)`` of ``x`` from ``channel_moments`` (float32 at least), or
        None if ``x`` has no dimension ``cdim`` of ``channels`` entries."""
        if x.dim() < 2 or cdim >= x.dim() or x.shape[cdim] != channels:
            return None
        return channel_moments(x.detach(), cdim)[1:]

    # ------------------------------------------------------------------ parameters
    def record_params(self, params: Iterable[Tensor] | None = None, histograms: bool | None = None) -> None:
        """At the optimizer step (gradients averaged and unscaled): weight and gradient norms, weight snapshot.

        A sharded parameter (a DTensor, as ``fully_shard`` makes it) records this process's share of the full
        tensor's sum of squares, maximum and histogram counts, from its local shard; the reduction across processes
        in :meth:`finalize` adds the shares up, so its figures are those of the full tensor, never gathered.

        Args:
            params: only these parameters (e.g. those of the optimizer stepping now); default every watched one.
            histograms: also bin weights and gradients (default: as chosen at ``attach``).
        """
        if not self.params:
            return
        state = self._state
        wanted = None if params is None else {id(p) for p in params}
        hist = state.histograms if histograms is None else histograms
        chosen = [(k, p) for k, (_, p) in enumerate(self.param_list) if wanted is None or id(p) in wanted]
        if not chosen:
            return
        with torch.no_grad():
            keys, weights = [k for k, _ in chosen], [p.detach() for _, p in chosen]
            for k, w in zip(keys, weights):
                shard = shard_copies(w)
                if shard is not None:
                    state.copies[k] = shard[1]
            state.weight_norm.update(self._norm_figures(keys, weights))
            state.before.update(self._snapshot(keys, weights))
            graded = [(k, p.grad.detach()) for k, p in chosen if p.grad is not None]
            if graded:
                state.grad_norm.update(self._norm_figures([k for k, _ in graded], [g for _, g in graded]))
            if hist:
                for kind, pairs in (("param", list(zip(keys, weights))), ("grad", graded)):
                    abs_max = state.param_abs_max if kind == "param" else state.grad_abs_max
                    for k, t in pairs:
                        shard = shard_copies(t)
                        local, copies = shard if shard is not None else (t, 1)
                        state.param_hist[(kind, k)] = bin_counts(local, self.bins, self.dtype) / copies
                        # maxima: the outer edges of the histograms
                        abs_max[k] = local.abs().amax() if local.numel() else local.new_zeros(())

    def _norm_figures(self, keys: list[int], tensors: list[Tensor]) -> dict[int, Tensor]:
        """By key: the norm of a plain tensor; of a sharded one, this process's share of the sum of squares."""
        plain = [(k, t) for k, t in zip(keys, tensors) if k not in self._state.copies]
        sharded = [(k, t) for k, t in zip(keys, tensors) if k in self._state.copies]
        out: dict[int, Tensor] = {}
        if plain:  # one foreach kernel per figure over every parameter instead of one reduction per parameter
            out.update(zip([k for k, _ in plain], _norms([t for _, t in plain])))
        if sharded:
            out.update(zip([k for k, _ in sharded], shard_sums_of_squares([t for _, t in sharded])))
        return out

    def _snapshot(self, keys: list[int], weights: list[Tensor]) -> dict[int, Tensor]:
        """One copy of every weight (a DTensor's copy is a DTensor of copied shards), for the update norms."""
        out: dict[int, Tensor] = {}
        for sharded in (False, True):  # a foreach kernel takes DTensors or plain tensors, not both
            part = [(k, w) for k, w in zip(keys, weights) if (k in self._state.copies) == sharded]
            if part:
                out.update(zip([k for k, _ in part], torch._foreach_mul([w for _, w in part], 1.0)))
        return out

    def record_updates(self) -> None:
        """After the optimizer step: ``||w_after - w_before||`` for each parameter snapshotted by ``record_params``."""
        state = self._state
        if not state.before:
            return
        with torch.no_grad():
            for sharded in (False, True):
                keys = [k for k in state.before if (k in state.copies) == sharded]
                if not keys:
                    continue
                before = [state.before[k] for k in keys]
                after = [self.param_list[k][1].detach() for k in keys]
                torch._foreach_sub_(before, after)  # before - after, in the snapshot's memory: the norm is the same
                state.update_norm.update(self._norm_figures(keys, before))
        state.before = {}

    # ------------------------------------------------------------------ reduction
    def _device(self) -> torch.device:
        state = self._state
        if state.device is not None:
            return state.device
        for _, m in self.modules:
            for p in m.parameters(recurse=False):
                return p.device
            for b in m.buffers(recurse=False):
                return b.device
        return torch.device("cpu")

    def _spec(self, act_grad_scale: float) -> FigureSpec:
        """What the figures need besides the fields, for the current collection."""
        state = self._state
        bns = tuple(self.bn_index) if self.batch_norm else ()
        bn_mods = [self.modules[i][1] for i in bns]
        all_gammas = [(i, w) for i, m in zip(bns, bn_mods) if isinstance(w := m.weight, Tensor)]
        sharded = [shard_copies(w) is not None for _, w in all_gammas]
        gammas = [g for g, s in zip(all_gammas, sharded) if not s]
        gammas_shard = [g for g, s in zip(all_gammas, sharded) if s]
        copies = state.copies  # sharded parameters fill the reduced counterparts of the parameter fields
        recorded: dict[str, tuple[int, ...]] = {}
        for name, store in (
            ("param.norm", state.weight_norm), ("grad.norm", state.grad_norm), ("update.norm", state.update_norm),
            ("grad.abs_max", state.grad_abs_max), ("param.abs_max", state.param_abs_max)):
            for field_name, indices in ((name, [k for k in store if k not in copies]),
                                        (SHARDED_PARAM_FIELDS[name][0], [k for k in store if k in copies])):
                if indices:
                    recorded[field_name] = tuple(sorted(indices))
        return FigureSpec(
            names=tuple(self.names),
            keys=self._keys,
            prefix=self.prefix,
            order=tuple(state.order),
            act_grad_scale=float(act_grad_scale),
            bn=bns,
            bn_sizes=tuple(_running(m)[0].numel() for m in bn_mods),
            bn_eps=tuple(float(getattr(m, "eps", 1e-5)) for m in bn_mods),
            gamma=tuple(i for i, _ in gammas),
            gamma_sizes=tuple(w.numel() for _, w in gammas),
            gamma_tol=self.gamma_tol,
            gamma_shard=tuple(i for i, _ in gammas_shard),
            gamma_shard_sizes=tuple(w.numel() for _, w in gammas_shard),
            params=tuple(n for n, _ in self.param_list),
            recorded=recorded,
            act_hist=tuple(range(len(self.modules))) if state.histograms and self.activations else (),
            param_hist=tuple(sorted(key for key in state.param_hist if key[1] not in copies)),
            param_hist_shard=tuple(sorted(key for key in state.param_hist if key[1] in copies)),
            bins=self.bins,
        )

    def _declare(self, spec: FigureSpec, spread: bool) -> list[tuple[str, int | tuple[int, ...], Reduction]]:
        """The buffer's fields, by name, shape and reduction: the one place its layout is written down.

        The reduced part depends only on the configuration, the histogram flag and the number of processes, so
        every process lays it out alike (one collective over it).
        """
        n, bins = len(self.modules), self.bins.num_bins
        fields: list[tuple[str, int | tuple[int, ...], Reduction]] = []
        for area in self._areas:
            fields += [(f"{area}.{f.name}", n, f.reduce) for _, f in self._area_fields[area]]
        if spec.act_hist:
            fields.append(("act.hist", (len(spec.act_hist), bins), "sum"))
        if spec.bn:
            channels, layers = sum(spec.bn_sizes), len(spec.bn)
            fields += [("bn.count", channels, "sum"), ("bn.sum", channels, "sum"), ("bn.sum_sq", channels, "sum"),
                       ("bn.ref_mean", channels, "sum"), ("bn.ref_var", channels, "sum"), ("bn.seen", layers, "sum")]
            if spread:  # the running statistics of every process, for their spread
                fields += [("bn.running_mean", channels, "sum"), ("bn.running_mean_sq", channels, "sum"),
                           ("bn.running_var", channels, "sum"), ("bn.processes", layers, "sum")]
        if spec.gamma:
            fields.append(("bn.gamma_abs", sum(spec.gamma_sizes), "local"))
        if spec.gamma_shard:
            fields.append((SHARDED_PARAM_FIELDS["bn.gamma_abs"][0], len(spec.gamma_shard), "sum"))
        reduction = dict(SHARDED_PARAM_FIELDS.values())
        fields += [(name, len(indices), reduction.get(name, "local")) for name, indices in spec.recorded.items()]
        if spec.param_hist:
            fields.append(("param.hist", (len(spec.param_hist), bins), "local"))
        if spec.param_hist_shard:
            fields.append((SHARDED_PARAM_FIELDS["param.hist"][0], (len(spec.param_hist_shard), bins), "sum"))
        return fields

    def _check_meshes(self, group: dist.ProcessGroup | None, world: int) -> None:
        """A sharded parameter's shares add up to its full tensor only over exactly the processes of its mesh."""
        for k in self._state.copies:
            name, param = self.param_list[k]
            mesh = getattr(param, "device_mesh", None)
            if mesh is not None and mesh.size() != world:
                raise ValueError(
                    f"LayerStatsCollector: parameter {name!r} is sharded over a mesh of {mesh.size()} processes "
                    f"({mesh}), but the figures are reduced over a group of {world} (`group`={group!r}); the norm of "
                    "a sharded tensor is a sum over the processes of its mesh. Reduce over the mesh's group, or shard "
                    "over a 1-D mesh of every process (data parallel only)."
                )

    def finalize(
        self, group: dist.ProcessGroup | None = None, act_grad_scale: float = 1.0, reduce: bool = True
    ) -> LayerStats:
        """Reduce across processes (one collective), transfer once, and compute the figures.

        Every process of ``group`` must call it (also one that saw no data). Keeps the hooks as they are.

        Args:
            group: the process group (default: the world).
            act_grad_scale: multiplies activation gradients, e.g. ``1 / (world_size * loss_scale)`` so they are the
                gradients of the loss DDP optimizes (the mean of the processes' losses), unscaled.
            reduce: reduce across processes (false: this process's figures only).
        """
        device = self._device()
        world = distributed_world_size(group) if reduce else 1
        spec = self._spec(act_grad_scale)
        if reduce:  # also for a group of one: the shares of a shard are not the figures of the full tensor
            self._check_meshes(group, world)
        declared = tuple(self._declare(spec, spread=world > 1))
        layout = self._layouts.get(declared)
        if layout is None:  # the same few layouts recur (training steps alike, histogram steps)
            if len(self._layouts) >= 8:
                del self._layouts[next(iter(self._layouts))]
            layout = self._layouts[declared] = Layout(declared)
        # What the host knows is written on the host; then one copy to the device (none on the CPU), where the
        # device's tensors are added.
        host = np.zeros(layout.size)
        self._fill_on_host(layout.views(host), spec)
        buffer = torch.from_numpy(host).to(device, self.dtype)
        self._fill_on_device(layout.views(buffer), spec, device)
        if world > 1:
            reduced = reduce_across_processes(buffer[: layout.reduced_size], layout.max_mask(device), group)
            buffer = torch.cat([reduced, buffer[layout.reduced_size :]])
        fields = layout.views(buffer.cpu().numpy().astype(np.float64, copy=False))  # the one transfer to the host
        return compute_figures(fields, spec)

    def _fill_on_host(self, fields: FieldViews[np.ndarray], spec: FigureSpec) -> None:
        state = self._state
        for area in self._areas:  # rows read back already (CPU): one array, written per field
            rows = [(i, r) for i, r in zip(state.modules[area], state.rows[area]) if type(r) is list]
            if not rows:
                continue
            index = np.asarray([i for i, _ in rows])
            table = np.asarray([r for _, r in rows], dtype=np.float64)
            unique = len(set(index.tolist())) == len(index)  # one row per module: no reduction needed
            for col, f in self._area_fields[area]:
                if unique:
                    fields[f"{area}.{f.name}"][index] = table[:, col]
                else:
                    accumulate(fields[f"{area}.{f.name}"], f.reduce, index, table[:, col])
        if spec.bn:
            where = {i: b for b, i in enumerate(spec.bn)}
            counts, seen = np.zeros(len(spec.bn)), np.zeros(len(spec.bn))
            for i, _, values_per_channel in state.bn_moments:
                counts[where[i]] += values_per_channel
                seen[where[i]] = 1.0
            fields["bn.seen"][:] = seen
            fields["bn.count"][:] = np.repeat(counts, spec.bn_sizes)
            if "bn.processes" in fields:
                fields["bn.processes"][:] = 1.0

    def _fill_on_device(self, fields: FieldViews[Tensor], spec: FigureSpec, device: torch.device) -> None:
        state, dt = self._state, self.dtype
        for area in self._areas:
            rows = [(i, r) for i, r in zip(state.modules[area], state.rows[area]) if type(r) is not list]
            if not rows:
                continue
            index = torch.tensor([i for i, _ in rows], device=device)
            table = torch.stack([torch.as_tensor(r).to(device, dt) for _, r in rows])
            for col, f in self._area_fields[area]:
                accumulate(fields[f"{area}.{f.name}"], f.reduce, index, table[:, col])
        for row, i in enumerate(spec.act_hist):
            if i in state.act_hist:
                fields["act.hist"][row] = state.act_hist[i]
        if spec.bn:
            self._fill_bn(fields, spec, device)
        if spec.gamma:
            gammas = [self.modules[i][1].weight for i in spec.gamma]
            fields["bn.gamma_abs"].copy_(torch.cat([
                _to(w.detach(), device).reshape(-1) for w in gammas if isinstance(w, Tensor)]).abs())
        if spec.gamma_shard:
            small = []
            for i in spec.gamma_shard:
                weight = self.modules[i][1].weight
                shard = shard_copies(weight.detach()) if isinstance(weight, Tensor) else None
                assert shard is not None  # _spec chose the sharded ones
                local, copies = shard
                small.append(_to((local.abs() < self.gamma_tol).sum().to(dt), device) / copies)
            fields[SHARDED_PARAM_FIELDS["bn.gamma_abs"][0]].copy_(torch.stack(small))
        stores = {"param.norm": state.weight_norm, "grad.norm": state.grad_norm, "update.norm": state.update_norm,
                  "grad.abs_max": state.grad_abs_max, "param.abs_max": state.param_abs_max}
        stores.update({SHARDED_PARAM_FIELDS[name][0]: store for name, store in list(stores.items())})
        for name, indices in spec.recorded.items():
            values = [stores[name][k] for k in indices]
            if len({(v.device, v.dtype) for v in values}) == 1:  # the usual case: one stack, one copy
                fields[name].copy_(torch.stack(values))
            else:
                fields[name].copy_(torch.stack([_to(v, device).to(dt) for v in values]))
        for row, key in enumerate(spec.param_hist):
            fields["param.hist"][row] = state.param_hist[key]
        for row, key in enumerate(spec.param_hist_shard):
            fields[SHARDED_PARAM_FIELDS["param.hist"][0]][row] = state.param_hist[key]

    def _fill_bn(self, fields: FieldViews[Tensor], spec: FigureSpec, device: torch.device) -> None:
        """The batches' channel moments, the snapshot of the running statistics where a layer ran, and with
        several processes the running statistics now (their spread)."""
        state, dt = self._state, self.dtype
        where = {i: b for b, i in enumerate(spec.bn)}
        sums: dict[int, Tensor] = {}
        for i, part, _ in state.bn_moments:
            b = where[i]
            sums[b] = part if b not in sums else sums[b].to(dt) + part.to(dt)  # micro-batches add up in float64
        if sums:
            moments = torch.cat([_to(sums[b], device).to(dt) if b in sums
                                 else torch.zeros(2, c, dtype=dt, device=device)
                                 for b, c in enumerate(spec.bn_sizes)], dim=1)
            fields["bn.sum"].copy_(moments[0])
            fields["bn.sum_sq"].copy_(moments[1])
        if state.bn_snapshot is not None:
            # the reference counts only where the layer ran (the processes that saw it divide it on the host)
            mean, var = (_to(t, device) for t in state.bn_snapshot)
            if len(sums) < len(spec.bn):
                ran = torch.repeat_interleave(fields["bn.seen"], torch.tensor(spec.bn_sizes, device=device))
                mean, var = mean * ran, var * ran
            fields["bn.ref_mean"].copy_(mean)
            fields["bn.ref_var"].copy_(var)
        if "bn.running_mean" in fields:
            running = [_running(self.modules[i][1]) for i in spec.bn]
            mean_now = torch.cat([_to(m.detach(), device) for m, _ in running]).to(dt)
            fields["bn.running_mean"].copy_(mean_now)
            fields["bn.running_mean_sq"].copy_(mean_now * mean_now)
            fields["bn.running_var"].copy_(torch.cat([_to(v.detach(), device) for _, v in running]).to(dt))
