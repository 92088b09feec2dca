"""Collect per-layer statistics on demand into one on-device buffer; one reduction, one transfer to the host.

A :class:`LayerStatsCollector` watches a fixed list of modules. Between :meth:`~LayerStatsCollector.attach` and
:meth:`~LayerStatsCollector.detach` it holds one forward hook per watched module that adds
sufficient statistics of each watched module's output, of a normalization layer's input, of the gradient with respect
to the output (through a tensor hook) and of a batch-norm layer's batch to per-step accumulators on the device. Any
number of forwards and backwards may run in between (gradient accumulation): the figures are those of their union.
:meth:`~LayerStatsCollector.finalize` reduces everything across processes in one collective
(:func:`lightning_bn.moments.reduce_across_processes`), brings it to the host in one transfer and turns it into
figures. Outside ``attach``/``detach`` the model carries none of the collector's hooks.

Activation checkpointing: a forward run while autograd executes a backward pass is a recomputation
(``torch.utils.checkpoint``, reentrant or not); its output statistics are not counted again, but a gradient hook is
still registered on it, because with reentrant checkpointing only the recomputed output is part of the graph. A
gradient hook fires only for a tensor that takes part in the backward pass, so each gradient is counted once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_bn.moments import (
    SUMMARY_FIELDS,
    channel_moments,
    distributed_world_size,
    mean_var,
    reduce_across_processes,
    summary_to_figures,
)
from lightning_bn.stats._histogram import LogBins, bin_counts, histogram_edges, trim_histogram
from lightning_bn.stats._select import has_batch_stats, is_norm
from lightning_bn.stats._summary import summary_row

__all__ = ["LayerStats", "LayerStatsCollector", "ACTIVATION_STATS", "ACTIVATION_GRAD_STATS", "in_backward_pass"]

ACTIVATION_STATS = ("mean", "std", "rms", "abs_max", "frac_zero", "frac_nonfinite")
ACTIVATION_GRAD_STATS = ("rms", "abs_max", "frac_nonfinite")
_NF = len(SUMMARY_FIELDS)
_ABS_MAX = SUMMARY_FIELDS.index("abs_max")
_OUT, _IN, _GRAD = 0, 1, 2  # summary kinds per module


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


def _on(t: Tensor, dev: torch.device) -> Tensor:
    return t if t.device == dev else t.to(dev)


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """L2 norms of many tensors in one foreach kernel: float32 when all are float32, else float64 (a half norm
    overflows at 65504, and the kernel takes one accumulation dtype that no input may be narrowed to)."""
    if all(t.dtype == torch.float32 for t in tensors):
        return list(torch._foreach_norm(tensors, 2))
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float64))


@dataclass
class LayerStats:
    """Figures of one collection: scalars by metric key, histograms by tag, watched modules in forward order."""

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    histogram_exact: dict[str, dict[str, float]] = field(default_factory=dict)  # true sum, sum_squares per tag
    order: list[str] = field(default_factory=list)


class LayerStatsCollector:
    """Per-layer statistics of a list of modules, collected only while attached.

    Args:
        modules: ``(name, module)`` pairs to watch (see :func:`lightning_bn.stats.select_modules`).
        activations: collect output (and normalization-input) statistics.
        activation_grads: collect statistics of the gradient with respect to each output.
        batch_norm: collect batch-versus-running statistics of batch-norm layers.
        params: collect weight, gradient and update norms of the watched modules' own parameters.
        zero_tol: a value with ``|x| <= zero_tol`` counts as zero (dead).
        gamma_tol: a batch-norm scale with ``|gamma| < gamma_tol`` counts as small.
        bins: histogram bins (used by ``attach(histograms=True)``).
        dtype: accumulation dtype of the buffer (float64 keeps sums over many micro-batches exact).
        prefix: put before every metric key (e.g. ``"val_"`` gives ``val_act/std/<module>``).

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
        self.modules = list(modules)
        self.names = [n for n, _ in self.modules]
        self.activations, self.activation_grads = activations, activation_grads
        self.batch_norm, self.params = batch_norm, params
        self.zero_tol, self.gamma_tol = float(zero_tol), float(gamma_tol)
        self.bins = bins or LogBins()
        self.dtype = dtype
        self.prefix = prefix
        self.is_norm = [is_norm(m) for _, m in self.modules]
        self.bn_index = [i for i, (_, m) in enumerate(self.modules) if has_batch_stats(m)]
        self.param_list: list[tuple[str, nn.Parameter]] = []
        seen_params: set[int] = set()
        for name, module in self.modules:
            for pname, p in module.named_parameters(recurse=False):
                if id(p) not in seen_params:
                    seen_params.add(id(p))
                    self.param_list.append((f"{name}.{pname}" if name else pname, p))
        pre = prefix
        self._param_keys = [(f"{pre}param/norm/{n}", f"{pre}grad/norm/{n}", f"{pre}grad/ratio/{n}",
                             f"{pre}update/ratio/{n}") for n, _ in self.param_list]
        self._bn_keys = {i: (f"{pre}bn/running_spread/{self.names[i]}", f"{pre}bn/mean_shift/{self.names[i]}",
                             f"{pre}bn/var_shift/{self.names[i]}") for i in self.bn_index}
        self._bn_layout_cache: tuple[Any, tuple[np.ndarray, ...]] | None = None
        self._handles: list[Any] = []
        self._hooks = [self._make_hook(i) for i in range(len(self.modules))]
        self._scratch_buffers: dict[torch.dtype, Tensor] = {}
        # module index -> (channel dim, channels) of the batch-norm layer its output fed in an earlier collection
        self._feeds_bn: dict[int, tuple[int, int]] = {}
        self._keys: list[tuple[int, list[tuple[str, str]]]] | None = None
        self.histograms = False
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._slots: list[int] = []
        # the last output summarized: (weakref, version, summary, producer, channel sums or None, channel dim)
        self._recent: dict[int, tuple] = {}
        self._summaries: list[Tensor | list[float]] = []  # rows read back on the CPU are lists
        self._hist: dict[int, Tensor] = {}
        # batch-norm layers: per forward (layer, (2, C) channel sums and sums of squares, values per channel)
        self._bn_moments: list[tuple[int, Tensor, float]] = []
        self._bn_snapshot: Tensor | None = None  # running means, then running variances, of every layer, at attach
        self._order: list[int] = []
        self._ordered: set[int] = set()
        # parameter figures: (parameter indices, one 0-d tensor per index) per call
        self._weight_norm: list[tuple[list[int], list[Tensor]]] = []
        self._grad_norm: list[tuple[list[int], list[Tensor]]] = []
        self._grad_abs_max: dict[int, Tensor] = {}
        self._update_norm: list[tuple[list[int], list[Tensor]]] = []
        self._before: tuple[list[int], list[Tensor]] | None = None
        self._param_hist: dict[tuple[str, int], Tensor] = {}
        self._dev: torch.device | None = None  # the device of the first tensor summarized
        self.forwards = 0  # forward hook calls counted this collection (for tests and diagnostics)
        self.summaries = 0  # tensors summarized this collection (a norm input that was just summarized is not again)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

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
        self._reset()
        self.histograms = bool(histograms)
        try:
            if self.batch_norm and self.bn_index:
                with torch.no_grad():
                    mods = [self.modules[i][1] for i in self.bn_index]
                    running = [_running(m) for m in mods]
                    dev = running[0][0].device
                    buffers = [mean.to(dev) for mean, _ in running] + [var.to(dev) for _, var in running]
                    self._bn_snapshot = torch.cat(buffers).to(self.dtype)  # cat copies: later updates do not show
            for i, (_, module) in enumerate(self.modules):
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

    def _make_hook(self, i: int) -> Any:
        out_slot, in_slot = 3 * i + _OUT, 3 * i + _IN
        norm, bn = self.is_norm[i], i in self.bn_index
        grad_hook = self._make_grad_hook(i)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if type(output) is Tensor:
                outputs = [output] if output.is_floating_point() else []
            else:
                outputs = list(_float_tensors(output))
            if not in_backward_pass():
                self.forwards += 1
                if i not in self._ordered:
                    self._ordered.add(i)
                    self._order.append(i)
                x = args[0] if args and isinstance(args[0], Tensor) else None
                sums = None  # the input's channel sums, when its producer computed them with its summary
                if self.activations:
                    # the input first: it is usually the previous watched output, still in the one-entry cache
                    if norm and x is not None:
                        entry = self._add_summary(in_slot, x)
                        if bn and entry is not None and entry[3] is not None:
                            # from the next collection on, the producer computes the channel sums of its output
                            # along with its summary (they give its sum and sum of squares) and this layer reuses them
                            self._feeds_bn[entry[3]] = (self._channel_dim(module, x), _running(module)[0].numel())
                            sums = entry[4] if entry[5] == self._channel_dim(module, x) else None
                    for t in outputs:
                        self._add_summary(out_slot, t, producer=i)
                        if self.histograms:
                            self._add_hist(i, t)
                if bn and self.batch_norm and x is not None:
                    self._add_bn_moments(i, module, x, sums)
            if self.activation_grads:
                for t in outputs:
                    if t.requires_grad:
                        t.register_hook(grad_hook)

        return hook

    def _make_grad_hook(self, i: int) -> Any:
        slot = 3 * i + _GRAD

        def grad_hook(grad: Tensor) -> None:
            # gradients: RMS, max and non-finite fraction only (ACTIVATION_GRAD_STATS), no sum or zeros
            self._summaries.append(summary_row(grad, self.zero_tol, full=False))
            self._slots.append(slot)
            if self._dev is None or self._dev.type == "cpu":
                self._dev = grad.device
            self.summaries += 1

        return grad_hook

    def _add_summary(self, slot: int, t: Tensor, producer: int | None = None) -> tuple | None:
        """Summarize ``t`` into ``slot``; returns the cache entry when ``t`` was the output just summarized."""
        # A norm's input is usually the previous watched module's output: the same tensor, summarized once.
        key = id(t)
        version = None if t.is_inference() else t._version  # inference tensors have no version counter
        cached = self._recent.get(key)
        if version is not None and cached is not None and cached[0]() is t and cached[1] == version:
            summary, entry = cached[2], cached
        else:
            entry, sums, cdim = None, None, None
            if producer is not None and producer in self._feeds_bn:
                cdim, channels = self._feeds_bn[producer]
                sums = self._channel_sums(t, cdim, channels)
            totals = None if sums is None else sums.sum(1)
            summary = summary_row(t, self.zero_tol, scratch=self._scratch(t), totals=totals)
            self.summaries += 1
            if self._dev is None or self._dev.type == "cpu":  # an accelerator's, if any tensor is on one
                self._dev = t.device
            if producer is not None and version is not None:
                self._recent = {key: (weakref.ref(t), version, summary, producer, sums, cdim)}
        self._slots.append(slot)
        self._summaries.append(summary)
        return entry

    def _add_hist(self, i: int, t: Tensor) -> None:
        counts = bin_counts(t, self.bins, self.dtype)
        self._hist[i] = counts if i not in self._hist else self._hist[i] + counts

    @staticmethod
    def _channel_dim(module: nn.Module, x: Tensor) -> int:
        return 1 if getattr(module, "layout", "channels_first") == "channels_first" else x.dim() - 1

    def _add_bn_moments(self, i: int, module: nn.Module, x: Tensor, sums: Tensor | None = None) -> None:
        channels = _running(module)[0].numel()
        if sums is None or sums.shape[-1] != channels:
            sums = self._channel_sums(x, self._channel_dim(module, x), channels)
        if sums is not None:
            self._bn_moments.append((i, sums, x.numel() / sums.shape[-1]))

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

        Args:
            params: only these parameters (e.g. those of the optimizer stepping now); default every watched one.
            histograms: also bin weights and gradients (default: as chosen at ``attach``).
        """
        if not self.params:
            return
        wanted = None if params is None else {id(p) for p in params}
        hist = self.histograms if histograms is None else histograms
        chosen = [(k, p) for k, (_, p) in enumerate(self.param_list) if wanted is None or id(p) in wanted]
        if not chosen:
            return
        with torch.no_grad():
            # One foreach kernel per figure over every parameter instead of one reduction per parameter.
            keys, weights = [k for k, _ in chosen], [p.detach() for _, p in chosen]
            self._weight_norm.append((keys, _norms(weights)))
            snapshot = torch._foreach_mul(weights, 1.0)  # one copy of every weight
            if self._before is None:
                self._before = (keys, list(snapshot))
            else:  # a second optimizer: add its parameters
                self._before = (self._before[0] + keys, self._before[1] + list(snapshot))
            graded = [(k, p.grad.detach()) for k, p in chosen if p.grad is not None]
            grad_keys, grads = [k for k, _ in graded], [g for _, g in graded]
            if grads:
                self._grad_norm.append((grad_keys, _norms(grads)))
            if hist:
                for k, w in zip(keys, weights):
                    self._param_hist[("param", k)] = bin_counts(w, self.bins, self.dtype)
                for k, g in graded:
                    # gradient maxima: the outer edges of the gradient histograms
                    self._grad_abs_max[k] = g.abs().amax().to(self.dtype) if g.numel() else g.new_zeros(())
                    self._param_hist[("grad", k)] = bin_counts(g, self.bins, self.dtype)

    def record_updates(self) -> None:
        """After the optimizer step: ``||w_after - w_before||`` for each parameter snapshotted by ``record_params``."""
        if self._before is None:
            return
        with torch.no_grad():
            keys, before = self._before
            after = [self.param_list[k][1].detach() for k in keys]
            torch._foreach_sub_(before, after)  # before - after, in the snapshot's memory: the norm is the same
            self._update_norm.append((keys, _norms(before)))
        self._before = None

    # ------------------------------------------------------------------ reduction
    def _bn_figures(
        self,
        out: LayerStats,
        host: np.ndarray,
        pos: int,
        bns: list[int],
        mods: list[nn.Module],
        sizes: list[int],
        spread_part: bool,
    ) -> int:
        """Batch-norm figures of every layer from the reduced block (laid out in ``finalize``); returns the new pos."""
        total, count = sum(sizes), len(sizes)
        running = 3 * total if spread_part else 0
        size = 5 * total + running + 2 * count
        chunk = host[pos : pos + size]
        moments = chunk[: 3 * total].reshape(3, total)
        snap_mean, snap_var = chunk[3 * total : 4 * total], chunk[4 * total : 5 * total]
        seen, procs = chunk[5 * total + running : 5 * total + running + count], chunk[5 * total + running + count :]
        layer, starts, eps, n = self._bn_layout(mods, sizes)
        if spread_part:
            rm_sum, rm_sq, rv_sum = (chunk[(5 + k) * total : (6 + k) * total] for k in range(3))
            rm_mean, rv_mean = rm_sum / procs[layer], rv_sum / procs[layer]
            rm_var = np.clip(rm_sq / procs[layer] - rm_mean * rm_mean, 0.0, None)
            spread = (np.add.reduceat(np.sqrt(rm_var) / np.sqrt(rv_mean + eps), starts) / n).tolist()
        else:  # one process: the running statistics do not spread
            spread = [0.0] * count
        mu_b, var_b = mean_var(moments, unbiased=True)  # in numpy, on the host
        seen_safe = np.maximum(seen, 1.0)[layer]  # layers not seen are skipped below
        ref_mean, ref_var = snap_mean / seen_safe, snap_var / seen_safe
        mean_shift = (np.add.reduceat(np.abs(mu_b - ref_mean) / np.sqrt(ref_var + eps), starts) / n).tolist()
        var_shift = (np.add.reduceat(np.abs(np.log((var_b + eps) / (ref_var + eps))), starts) / n).tolist()
        for b, i in enumerate(bns):
            spread_key, mean_key, var_key = self._bn_keys[i]
            out.scalars[spread_key] = spread[b]
            if seen[b] > 0:
                out.scalars[mean_key] = mean_shift[b]
                out.scalars[var_key] = var_shift[b]
        return pos + size

    def _bn_layout(self, mods: list[nn.Module], sizes: list[int]) -> tuple[np.ndarray, ...]:
        """Channel -> layer index, layer starts, eps per channel and channels per layer (built once per layout)."""
        key = (tuple(sizes), tuple(float(getattr(m, "eps", 1e-5)) for m in mods))
        if self._bn_layout_cache is None or self._bn_layout_cache[0] != key:
            layout = (np.repeat(np.arange(len(sizes)), sizes), np.cumsum([0] + sizes[:-1]),
                      np.repeat(np.asarray(key[1]), sizes), np.asarray(sizes, dtype=np.float64))
            self._bn_layout_cache = (key, layout)
        return self._bn_layout_cache[1]

    def _row_keys(self) -> list[tuple[int, list[tuple[str, str]]]]:
        """``(summary row, [(statistic, metric key), ...])`` in the order the keys are written (built once)."""
        if self._keys is None:
            pre, rows = self.prefix, []
            for i, name in enumerate(self.names):
                if self.activations:
                    rows.append((3 * i + _OUT, [(s, f"{pre}act/{s}/{name}") for s in ACTIVATION_STATS]))
                if self.activations and self.is_norm[i]:
                    rows.append((3 * i + _IN, [(s, f"{pre}act_in/{s}/{name}") for s in ACTIVATION_STATS]))
                if self.activation_grads:
                    rows.append((3 * i + _GRAD, [(s, f"{pre}act_grad/{s}/{name}") for s in ACTIVATION_GRAD_STATS]))
            self._keys = rows
        return self._keys

    def _device(self) -> torch.device:
        if self._dev is not None:
            return self._dev
        for t in self._summaries:
            if isinstance(t, Tensor):
                return t.device
        for _, m in self.modules:
            for t in m.parameters(recurse=False):
                return t.device
            for t in m.buffers(recurse=False):
                return t.device
        return torch.device("cpu")

    def _summary_table(self, dev: torch.device) -> Tensor:
        """The ``(3 * modules, 6)`` summary rows, flat: sums per slot, maxima where ``abs_max`` is."""
        dt, n_rows = self.dtype, 3 * len(self.modules)
        if self._summaries and dev.type == "cpu" and all(type(s) is list for s in self._summaries):
            # read back already (CPU): one array on the host; a slot met twice (micro-batches) sums, its maxima max
            rows, slots = np.asarray(self._summaries, dtype=np.float64), np.asarray(self._slots)
            table = np.zeros((n_rows, _NF))
            if len(set(self._slots)) == len(self._slots):
                table[slots] = rows
            else:
                np.add.at(table, slots, rows)
                amax = np.zeros(n_rows)
                np.maximum.at(amax, slots, rows[:, _ABS_MAX])
                table[:, _ABS_MAX] = amax
            return torch.from_numpy(table.reshape(-1)).to(dt)
        summ = torch.zeros(n_rows, _NF, dtype=dt, device=dev)
        if self._summaries:
            stacked = torch.stack([torch.as_tensor(s).to(dev, dt) for s in self._summaries])
            index = torch.tensor(self._slots, device=dev)
            summ = summ.index_add(0, index, stacked)
            summ[:, _ABS_MAX] = torch.zeros(n_rows, dtype=dt, device=dev).scatter_reduce(
                0, index, stacked[:, _ABS_MAX], "amax", include_self=True
            )
        return summ.reshape(-1)

    def _bn_block(
        self, bns: list[int], mods: list[nn.Module], sizes: list[int], dev: torch.device, spread_part: bool
    ) -> list[Tensor]:
        """The batch-norm part of the reduced buffer, in the layout ``_bn_figures`` reads.

        ``spread_part``: include the running means, their squares and the running variances, whose spread across
        processes is ``bn/running_spread`` (left out for one process, where the spread is 0).
        """
        dt, total = self.dtype, sum(sizes)
        where = {i: b for b, i in enumerate(bns)}
        sums: dict[int, Tensor] = {}
        counts = [0.0] * len(bns)
        for i, part, count in self._bn_moments:
            b = where[i]
            sums[b] = part if b not in sums else sums[b].to(dt) + part.to(dt)  # micro-batches add up in float64
            counts[b] += count
        seen = np.asarray([float(b in sums) for b in range(len(bns))])
        if len(sums) == len(bns) and len({t.dtype for t in sums.values()}) == 1:  # the usual case: one cat, one cast
            moment_sums = torch.cat([_on(sums[b], dev) for b in range(len(bns))], dim=1).to(dt)
        else:
            moment_sums = torch.cat([_on(sums[b], dev).to(dt) if b in sums else torch.zeros(2, c, dtype=dt, device=dev)
                                     for b, c in enumerate(sizes)], dim=1)
        # counts per channel | 1 where the layer ran, per channel, twice (masks the snapshot) | seen | 1 per layer
        seen_channels = np.repeat(seen, sizes)
        host = np.concatenate([np.repeat(np.asarray(counts), sizes), seen_channels, seen_channels, seen,
                               np.ones(len(bns))])
        host_part = torch.from_numpy(host).to(dev, dt)
        channel_counts, snapshot_mask, flags = host_part[:total], host_part[total : 3 * total], host_part[3 * total :]
        # the snapshot counts only where the layer ran (the processes that saw it divide it on the host)
        snapshot = self._bn_snapshot if self._bn_snapshot is not None else torch.zeros(2 * total, dtype=dt)
        snapshot = _on(snapshot, dev) * snapshot_mask
        moments = torch.cat([channel_counts, moment_sums.reshape(-1)])  # (3, S) flat: count, sum, sum of squares
        if not spread_part:
            return [moments, snapshot, flags]
        running = [_running(m) for m in mods]
        now = torch.cat([_on(mean.detach(), dev) for mean, _ in running]
                        + [_on(var.detach(), dev) for _, var in running]).to(dt)
        running_mean, running_var = now[:total], now[total:]
        return [moments, snapshot, running_mean, running_mean * running_mean, running_var, flags]

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
        dev, dt = self._device(), self.dtype
        n_mod = len(self.modules)
        parts = [self._summary_table(dev)]
        # Batch-norm layers, all at once: moments (3, S) | running-mean and -var snapshots | running mean, its square
        # and running var now | seen per layer | 1 per layer (counts the processes); S = channels of every layer.
        bns = self.bn_index if self.batch_norm else []
        world = distributed_world_size(group) if reduce else 1
        spread_part = world > 1
        bn_mods = [self.modules[i][1] for i in bns]
        bn_sizes = [_running(m)[0].numel() for m in bn_mods]
        if bns:
            parts += self._bn_block(bns, bn_mods, bn_sizes, dev, spread_part)
        hist_mods = list(range(n_mod)) if (self.histograms and self.activations) else []
        nb = self.bins.num_bins
        for i in hist_mods:
            parts.append(self._hist.get(i, torch.zeros(nb, dtype=dt, device=dev)))
        reduced = torch.cat(parts) if len(parts) > 1 else parts[0]
        if world > 1:
            max_mask = torch.zeros(reduced.numel(), dtype=torch.bool, device=dev)
            max_mask[_ABS_MAX : 3 * n_mod * _NF : _NF] = True
            reduced = reduce_across_processes(reduced, max_mask, group)

        # Local part: parameters are the same on every process (DDP) and their gradients already averaged.
        n_par = len(self.param_list)
        local = []
        figures = []
        for store in (self._weight_norm, self._grad_norm, self._update_norm):
            merged: dict[int, Tensor] = {}
            for keys, values in store:
                merged.update(zip(keys, values))
            figures.append(sorted(merged))
            if merged:
                local.append(torch.stack([_on(merged[k], dev) for k in figures[-1]]))
        param_keys, grad_keys, update_keys = figures
        abs_keys = sorted(self._grad_abs_max)
        if abs_keys:
            local.append(torch.stack([_on(self._grad_abs_max[k], dev) for k in abs_keys]))
        gammas = [(i, w) for i in (self.bn_index if self.batch_norm else [])
                  if isinstance(w := self.modules[i][1].weight, Tensor)]
        gamma_bns, gamma_sizes = [i for i, _ in gammas], [w.numel() for _, w in gammas]
        if gammas:  # |gamma| of every layer; the thresholding is done on the host
            local.append(torch.cat([_on(w.detach(), dev).reshape(-1) for _, w in gammas]).abs())
        hist_keys = sorted(self._param_hist)
        for key in hist_keys:
            local.append(self._param_hist[key])
            if key[0] == "param":
                local.append(self.param_list[key[1]][1].detach().abs().amax().reshape(1))
        full = torch.cat([reduced] + [t.reshape(-1).to(dt) for t in local]) if local else reduced
        host = full.cpu().numpy()  # the one transfer to the host

        out = LayerStats(order=[self.names[i] for i in self._order])
        pre = self.prefix
        pos = 3 * n_mod * _NF
        table = host[:pos].reshape(3 * n_mod, _NF).copy()
        grad_rows = slice(_GRAD, None, 3)
        s = float(act_grad_scale)
        table[grad_rows, SUMMARY_FIELDS.index("sum")] *= s
        table[grad_rows, SUMMARY_FIELDS.index("sum_sq")] *= s * s
        table[grad_rows, _ABS_MAX] *= abs(s)
        figs = {k: v.tolist() for k, v in summary_to_figures(table).items()}  # in numpy, on the host
        seen_rows = (table[:, 0] + table[:, SUMMARY_FIELDS.index("nonfinite")] > 0).tolist()
        for row, row_keys in self._row_keys():
            if seen_rows[row]:
                for stat, metric in row_keys:
                    out.scalars[metric] = figs[stat][row]
        abs_max_out = table[_OUT::3, _ABS_MAX]

        if bns:
            pos = self._bn_figures(out, host, pos, bns, bn_mods, bn_sizes, spread_part)
        for i in hist_mods:
            counts = host[pos : pos + nb]
            pos += nb
            if counts.sum() > 0:
                edges = histogram_edges(self.bins, float(abs_max_out[i]))
                tag = f"{pre}act/hist/{self.names[i]}"
                out.histograms[tag] = trim_histogram(edges, counts)
                row = table[3 * i + _OUT]
                out.histogram_exact[tag] = {"sum": float(row[1]), "sum_squares": float(row[2])}

        # local part
        def take(n: int) -> np.ndarray:
            nonlocal pos
            chunk = host[pos : pos + n]
            pos += n
            return chunk

        w_norm = dict(zip(param_keys, take(len(param_keys)).tolist()))
        g_norm = dict(zip(grad_keys, take(len(grad_keys)).tolist()))
        u_norm = dict(zip(update_keys, take(len(update_keys)).tolist()))
        g_abs = dict(zip(abs_keys, take(len(abs_keys)).tolist()))  # gradient maxima: outer histogram edges
        for k in range(n_par):
            norm_key, grad_key, ratio_key, update_key = self._param_keys[k]
            weight = w_norm.get(k, 0.0)
            if k in w_norm:
                out.scalars[norm_key] = weight
            if k in g_norm:
                out.scalars[grad_key] = g_norm[k]
                if weight > 0:  # a ratio to a zero weight (a bias at init) is left out, not inf
                    out.scalars[ratio_key] = g_norm[k] / weight
            if k in u_norm and weight > 0:
                out.scalars[update_key] = u_norm[k] / weight
        if gamma_bns:
            small = np.add.reduceat(take(sum(gamma_sizes)) < self.gamma_tol, np.cumsum([0] + gamma_sizes[:-1]))
            for i, count, size in zip(gamma_bns, small.tolist(), gamma_sizes):
                out.scalars[f"{pre}bn/frac_small_gamma/{self.names[i]}"] = count / size
        for key in hist_keys:
            counts = take(nb)
            kind, k = key
            if kind == "param":
                abs_max = take(1)[0]
            else:
                abs_max = g_abs[k]
            if counts.sum() > 0:
                out.histograms[f"{pre}{kind}/hist/{self.param_list[k][0]}"] = trim_histogram(
                    histogram_edges(self.bins, float(abs_max)), counts
                )
        return out

