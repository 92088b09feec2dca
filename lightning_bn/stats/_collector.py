"""Collect per-layer statistics on demand into one on-device buffer; one reduction, one transfer to the host.

A :class:`LayerStatsCollector` watches a fixed list of modules. Between :meth:`~LayerStatsCollector.attach` and
:meth:`~LayerStatsCollector.detach` it holds forward hooks (and, on batch-norm layers, a forward pre-hook) that add
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
    """The floating-point tensors of a module output: a tensor, or those inside tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _float_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _float_tensors(item)


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
        self._handles: list[Any] = []
        self._keys: list[tuple[int, list[tuple[str, str]]]] | None = None
        self.histograms = False
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self) -> None:
        self._slots: list[int] = []
        self._recent: dict[int, tuple[Any, int, Tensor | list[float]]] = {}  # the last output summarized (weakref)
        self._summaries: list[Tensor | list[float]] = []  # rows read back on the CPU are lists
        self._hist: dict[int, Tensor] = {}
        self._bn_moments: dict[int, Tensor] = {}
        self._bn_running: dict[int, Tensor] = {}
        self._order: list[int] = []
        self._ordered: set[int] = set()
        self._weight_norm: dict[int, Tensor] = {}
        self._grad_norm: dict[int, Tensor] = {}
        self._grad_abs_max: dict[int, Tensor] = {}
        self._update_norm: dict[int, Tensor] = {}
        self._before: dict[int, Tensor] = {}
        self._param_hist: dict[tuple[str, int], Tensor] = {}
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

        Raises:
            RuntimeError: already attached.
        """
        if self.attached:
            raise RuntimeError("LayerStatsCollector.attach() called while already attached; call detach() first")
        self._reset()
        self.histograms = bool(histograms)
        try:
            for i, (_, module) in enumerate(self.modules):
                if self.batch_norm and i in self.bn_index:
                    self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(i)))
                self._handles.append(module.register_forward_hook(self._make_hook(i)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Remove every hook (idempotent). The collected figures stay until the next ``attach``."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _make_pre_hook(self, i: int) -> Any:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if i not in self._bn_running and not in_backward_pass():
                self._bn_running[i] = torch.cat([module.running_mean, module.running_var]).detach().to(self.dtype)

        return pre_hook

    def _make_hook(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            recomputed = in_backward_pass()
            outputs = list(_float_tensors(output))
            if not recomputed:
                self.forwards += 1
                if i not in self._ordered:
                    self._ordered.add(i)
                    self._order.append(i)
                if self.activations:
                    # the input first: it is usually the previous watched output, still in the one-entry cache
                    if self.is_norm[i] and args and isinstance(args[0], Tensor):
                        self._add_summary(3 * i + _IN, args[0])
                    for t in outputs:
                        self._add_summary(3 * i + _OUT, t)
                        if self.histograms:
                            self._add_hist(i, t)
                if self.batch_norm and i in self._bn_running and args and isinstance(args[0], Tensor):
                    self._add_bn_moments(i, module, args[0])
            if self.activation_grads:
                for t in outputs:
                    if t.requires_grad:
                        t.register_hook(self._make_grad_hook(i))

        return hook

    def _make_grad_hook(self, i: int) -> Any:
        slot = 3 * i + _GRAD

        def grad_hook(grad: Tensor) -> None:
            self._add_summary(slot, grad)

        return grad_hook

    def _add_summary(self, slot: int, t: Tensor) -> None:
        # A norm's input is usually the previous watched module's output: the same tensor, summarized once.
        key = id(t)
        version = None if t.is_inference() else t._version  # inference tensors have no version counter
        cached = self._recent.get(key)
        if version is not None and cached is not None and cached[0]() is t and cached[1] == version:
            summary = cached[2]
        else:
            # gradients: RMS, max and non-finite fraction only (ACTIVATION_GRAD_STATS), no sum or zeros
            summary = summary_row(t, self.zero_tol, full=slot % 3 != _GRAD)
            self.summaries += 1
            if slot % 3 == _OUT and version is not None:
                self._recent = {key: (weakref.ref(t), version, summary)}
        self._slots.append(slot)
        self._summaries.append(summary)

    def _add_hist(self, i: int, t: Tensor) -> None:
        counts = bin_counts(t, self.bins, self.dtype)
        self._hist[i] = counts if i not in self._hist else self._hist[i] + counts

    def _add_bn_moments(self, i: int, module: nn.Module, x: Tensor) -> None:
        layout = getattr(module, "layout", "channels_first")
        cdim = 1 if layout == "channels_first" else -1
        if x.dim() < 2 or x.shape[cdim] != module.running_mean.numel():
            return
        moments = channel_moments(x.detach(), cdim).to(self.dtype)  # float32 sums for float32 input, as the summaries
        self._bn_moments[i] = moments if i not in self._bn_moments else self._bn_moments[i] + moments

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
            self._weight_norm.update(zip(keys, torch._foreach_norm(weights, 2, dtype=self.dtype)))
            self._before.update(zip(keys, (w.clone() for w in weights)))
            graded = [(k, p.grad.detach()) for k, p in chosen if p.grad is not None]
            grad_keys, grads = [k for k, _ in graded], [g for _, g in graded]
            if grads:
                self._grad_norm.update(zip(grad_keys, torch._foreach_norm(grads, 2, dtype=self.dtype)))
            if hist:
                for k, w in zip(keys, weights):
                    self._param_hist[("param", k)] = bin_counts(w, self.bins, self.dtype)
                for k, g in graded:
                    # gradient maxima: the outer edges of the gradient histograms
                    self._grad_abs_max[k] = g.abs().amax().to(self.dtype) if g.numel() else self._grad_norm[k]
                    self._param_hist[("grad", k)] = bin_counts(g, self.bins, self.dtype)

    def record_updates(self) -> None:
        """After the optimizer step: ``||w_after - w_before||`` for each parameter snapshotted by ``record_params``."""
        if not self._before:
            return
        with torch.no_grad():
            keys = list(self._before)
            after = [self.param_list[k][1].detach() for k in keys]
            deltas = torch._foreach_sub(after, [self._before[k] for k in keys])
            self._update_norm.update(zip(keys, torch._foreach_norm(deltas, 2, dtype=self.dtype)))
        self._before = {}

    # ------------------------------------------------------------------ reduction
    def _bn_figures(
        self, out: LayerStats, host: np.ndarray, pos: int, bns: list[int], mods: list[nn.Module], sizes: list[int]
    ) -> int:
        """Batch-norm figures of every layer from the reduced block (laid out in ``finalize``); returns the new pos."""
        total, count = sum(sizes), len(sizes)
        chunk = host[pos : pos + 8 * total + 2 * count]
        moments = torch.from_numpy(chunk[: 3 * total].reshape(3, total))
        snap_mean, snap_var = chunk[3 * total : 4 * total], chunk[4 * total : 5 * total]
        rm_sum, rm_sq, rv_sum = chunk[5 * total : 6 * total], chunk[6 * total : 7 * total], chunk[7 * total : 8 * total]
        seen, procs = chunk[8 * total : 8 * total + count], chunk[8 * total + count :]
        layer = np.repeat(np.arange(count), sizes)  # channel -> layer
        starts = np.cumsum([0] + sizes[:-1])
        eps = np.repeat([float(getattr(m, "eps", 1e-5)) for m in mods], sizes)
        n = np.asarray(sizes, dtype=np.float64)
        rm_mean, rv_mean = rm_sum / procs[layer], rv_sum / procs[layer]
        rm_var = np.clip(rm_sq / procs[layer] - rm_mean * rm_mean, 0.0, None)
        spread = (np.add.reduceat(np.sqrt(rm_var) / np.sqrt(rv_mean + eps), starts) / n).tolist()
        mu_b, var_b = (t.numpy() for t in mean_var(moments, unbiased=True))
        seen_safe = np.maximum(seen, 1.0)[layer]  # layers not seen are skipped below
        ref_mean, ref_var = snap_mean / seen_safe, snap_var / seen_safe
        mean_shift = (np.add.reduceat(np.abs(mu_b - ref_mean) / np.sqrt(ref_var + eps), starts) / n).tolist()
        var_shift = (np.add.reduceat(np.abs(np.log((var_b + eps) / (ref_var + eps))), starts) / n).tolist()
        pre = self.prefix
        for b, i in enumerate(bns):
            name = self.names[i]
            out.scalars[f"{pre}bn/running_spread/{name}"] = spread[b]
            if seen[b] > 0:
                out.scalars[f"{pre}bn/mean_shift/{name}"] = mean_shift[b]
                out.scalars[f"{pre}bn/var_shift/{name}"] = var_shift[b]
        return pos + 8 * total + 2 * count

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
        for t in self._summaries:
            if isinstance(t, Tensor):
                return t.device
        for _, m in self.modules:
            for t in m.parameters(recurse=False):
                return t.device
            for t in m.buffers(recurse=False):
                return t.device
        return torch.device("cpu")

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
        summ = torch.zeros(3 * n_mod, _NF, dtype=dt, device=dev)
        if self._summaries:
            if all(isinstance(s, list) for s in self._summaries):  # read back already (CPU): one tensor from them all
                stacked = torch.tensor(self._summaries, dtype=dt, device=dev)
            else:
                stacked = torch.stack([torch.as_tensor(s).to(dev, dt) for s in self._summaries])
            index = torch.tensor(self._slots, device=dev)
            summ = summ.index_add(0, index, stacked)
            amax = torch.zeros(3 * n_mod, dtype=dt, device=dev).scatter_reduce(
                0, index, stacked[:, _ABS_MAX], "amax", include_self=True
            )
            summ[:, _ABS_MAX] = amax
        parts = [summ.reshape(-1)]
        mask = [torch.zeros(3 * n_mod, _NF, dtype=torch.bool, device=dev)]
        mask[0][:, _ABS_MAX] = True
        # Batch-norm layers, all at once: moments (3, S) | running-mean and -var snapshots | running mean, its square
        # and running var now | seen per layer | 1 per layer (counts the processes); S = channels of every layer.
        bns = self.bn_index if self.batch_norm else []
        bn_mods = [self.modules[i][1] for i in bns]
        bn_sizes = [m.running_mean.numel() for m in bn_mods]
        if bns:
            seen_list = [float(i in self._bn_moments) for i in bns]
            moments = torch.cat([self._bn_moments[i] if i in self._bn_moments
                                 else torch.zeros(3, c, dtype=dt, device=dev) for i, c in zip(bns, bn_sizes)], dim=1)
            snaps = [self._bn_running[i].to(dev, dt) if seen and i in self._bn_running
                     else torch.zeros(2 * c, dtype=dt, device=dev) for i, c, seen in zip(bns, bn_sizes, seen_list)]
            rm = torch.cat([m.running_mean.detach() for m in bn_mods]).to(dev, dt)
            rv = torch.cat([m.running_var.detach() for m in bn_mods]).to(dev, dt)
            parts += [moments.reshape(-1), torch.cat([sn[:c] for sn, c in zip(snaps, bn_sizes)]),
                      torch.cat([sn[c:] for sn, c in zip(snaps, bn_sizes)]), rm, rm * rm, rv,
                      torch.tensor(seen_list + [1.0] * len(bns), dtype=dt, device=dev)]
        hist_mods = list(range(n_mod)) if (self.histograms and self.activations) else []
        nb = self.bins.num_bins
        for i in hist_mods:
            parts.append(self._hist.get(i, torch.zeros(nb, dtype=dt, device=dev)))
        reduced = torch.cat(parts)
        max_mask = torch.cat([mask[0].reshape(-1), torch.zeros(reduced.numel() - 3 * n_mod * _NF, dtype=torch.bool,
                                                               device=dev)])
        if reduce:
            reduced = reduce_across_processes(reduced, max_mask, group)

        # Local part: parameters are the same on every process (DDP) and their gradients already averaged.
        n_par = len(self.param_list)
        local = []
        param_keys = sorted(self._weight_norm)
        grad_keys = sorted(self._grad_norm)
        abs_keys = sorted(self._grad_abs_max)
        update_keys = sorted(self._update_norm)
        for keys, store in ((param_keys, self._weight_norm), (grad_keys, self._grad_norm),
                            (abs_keys, self._grad_abs_max), (update_keys, self._update_norm)):
            if keys:
                local.append(torch.stack([store[k].to(dev, dt) for k in keys]))
        gamma_bns = [i for i in (self.bn_index if self.batch_norm else []) if self.modules[i][1].weight is not None]
        for i in gamma_bns:
            w = self.modules[i][1].weight.detach()
            local.append((w.abs() < self.gamma_tol).sum().to(dt).reshape(1))
        hist_keys = sorted(self._param_hist)
        for key in hist_keys:
            local.append(self._param_hist[key])
            if key[0] == "param":
                local.append(self.param_list[key[1]][1].detach().abs().amax().to(dt).reshape(1))
        full = torch.cat([reduced] + [t.reshape(-1).to(dev, dt) for t in local]) if local else reduced
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
        figs = {k: v.tolist() for k, v in summary_to_figures(torch.from_numpy(table)).items()}
        seen_rows = (table[:, 0] + table[:, SUMMARY_FIELDS.index("nonfinite")] > 0).tolist()
        for row, row_keys in self._row_keys():
            if seen_rows[row]:
                for stat, metric in row_keys:
                    out.scalars[metric] = figs[stat][row]
        abs_max_out = table[_OUT::3, _ABS_MAX]

        if bns:
            pos = self._bn_figures(out, host, pos, bns, bn_mods, bn_sizes)
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
        g_abs = dict(zip(abs_keys, take(len(abs_keys)).tolist()))  # gradient maxima: outer histogram edges
        u_norm = dict(zip(update_keys, take(len(update_keys)).tolist()))
        for k in range(n_par):
            pname = self.param_list[k][0]
            if k in w_norm:
                out.scalars[f"{pre}param/norm/{pname}"] = float(w_norm[k])
            if k in g_norm:
                out.scalars[f"{pre}grad/norm/{pname}"] = float(g_norm[k])
                if w_norm.get(k, 0.0) > 0:  # a ratio to a zero weight (a bias at init) is left out, not inf
                    out.scalars[f"{pre}grad/ratio/{pname}"] = float(g_norm[k] / w_norm[k])
            if k in u_norm and w_norm.get(k, 0.0) > 0:
                out.scalars[f"{pre}update/ratio/{pname}"] = float(u_norm[k] / w_norm[k])
        for i in gamma_bns:
            small = take(1)[0]
            out.scalars[f"{pre}bn/frac_small_gamma/{self.names[i]}"] = float(small / self.modules[i][1].weight.numel())
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

