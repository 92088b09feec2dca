"""The figures of one collection: a pure function of the reduced, named fields (numpy arrays on the host).

:func:`compute_figures` turns the fields of a :class:`~lightning_bn.stats._fields.Layout` (after the reduction
across processes and the one transfer) into metric keys and values. Everything it needs besides the fields is in a
:class:`FigureSpec`: the module and parameter names, the precomputed keys, batch-norm channel counts and eps, and
which parameters were recorded. It reads no module, tensor or collector state, so a test can call it on hand-made
fields.

Fields read (``<area>`` is ``act``, ``act_in`` or ``act_grad``; one entry per watched module unless said):

* ``<area>.<field>`` for the :data:`~lightning_bn.stats._fields.TENSOR_FIELDS` the area's statistics need;
* ``act.hist`` (histogram modules x bins);
* ``bn.count``, ``bn.sum``, ``bn.sum_sq`` (per channel of every batch-norm layer): the batches' channel moments;
  ``bn.ref_mean``, ``bn.ref_var`` (per channel): the running statistics at ``attach``, counted where the layer ran;
  ``bn.seen`` (per layer): processes that ran it; with more than one process also ``bn.running_mean``,
  ``bn.running_mean_sq``, ``bn.running_var`` (per channel) and ``bn.processes`` (per layer) for the spread;
* local: ``bn.gamma_abs`` (per channel), ``param.norm``, ``grad.norm``, ``update.norm``, ``grad.abs_max``,
  ``param.abs_max`` (per recorded parameter), ``param.hist`` (per histogram row x bins);
* reduced, of sharded parameters (DTensor), their counterparts in
  :data:`~lightning_bn.stats._fields.SHARDED_PARAM_FIELDS`: ``param.norm_sq``, ``grad.norm_sq``,
  ``update.norm_sq`` (sums of squares of the full tensors), ``param.abs_max_shard``, ``grad.abs_max_shard``,
  ``param.hist_shard`` and ``bn.gamma_small_shard`` (per layer, channels with a small scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lightning_bn.moments import mean_var
from lightning_bn.stats import _fields
from lightning_bn.stats._fields import SHARDED_PARAM_FIELDS, TensorStat
from lightning_bn.stats._histogram import LogBins, histogram_edges, trim_histogram

__all__ = ["AREAS", "FigureSpec", "LayerStats", "area_stats", "compute_figures", "tensor_keys"]

# What is summarized of a watched module: its output, a normalization layer's input, the output's gradient.
AREAS = ("act", "act_in", "act_grad")


@dataclass
class LayerStats:
    """Figures of one collection: scalars by metric key, histograms by tag, watched modules in forward order."""

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    histogram_exact: dict[str, dict[str, float]] = field(default_factory=dict)  # true sum, sum_squares per tag
    order: list[str] = field(default_factory=list)


def area_stats(area: str) -> tuple[TensorStat, ...]:
    """The statistics logged for ``area``: all of them, or for gradients those marked ``gradients``."""
    return tuple(s for s in _fields.TENSOR_STATS if area != "act_grad" or s.gradients)


def tensor_keys(prefix: str, area: str, name: str) -> tuple[tuple[TensorStat, str], ...]:
    """``((statistic, metric key), ...)`` of one module in ``area``, e.g. ``(std, "act/std/layer1.conv1")``."""
    return tuple((s, f"{prefix}{area}/{s.name}/{name}") for s in area_stats(area))


@dataclass(frozen=True)
class FigureSpec:
    """What :func:`compute_figures` needs besides the fields.

    ``keys[area][i]``: the keys of module ``i`` in ``area`` (empty where the area is not collected, e.g. the input
    of a layer that is no normalization). ``recorded[name]``: the parameter indices, in field order, of the
    parameter field ``name`` (local, or its sharded counterpart). ``param_hist``: ``("param" | "grad", parameter
    index)`` per row of ``param.hist``; ``param_hist_shard`` the same for ``param.hist_shard``. ``gamma_shard``:
    the batch-norm layers whose scale is sharded (their channels counted in ``bn.gamma_small_shard``).
    """

    names: tuple[str, ...]
    keys: Mapping[str, tuple[tuple[tuple[TensorStat, str], ...], ...]]
    prefix: str = ""
    order: tuple[int, ...] = ()
    act_grad_scale: float = 1.0
    bn: tuple[int, ...] = ()
    bn_sizes: tuple[int, ...] = ()
    bn_eps: tuple[float, ...] = ()
    gamma: tuple[int, ...] = ()
    gamma_sizes: tuple[int, ...] = ()
    gamma_tol: float = 1e-3
    gamma_shard: tuple[int, ...] = ()
    gamma_shard_sizes: tuple[int, ...] = ()
    params: tuple[str, ...] = ()
    recorded: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    act_hist: tuple[int, ...] = ()
    param_hist: tuple[tuple[str, int], ...] = ()
    param_hist_shard: tuple[tuple[str, int], ...] = ()
    bins: LogBins = field(default_factory=LogBins)


def compute_figures(fields: Mapping[str, np.ndarray], spec: FigureSpec) -> LayerStats:
    """Every figure of one collection from its reduced fields."""
    out = LayerStats(order=[spec.names[i] for i in spec.order])
    act_abs_max = _tensor_figures(out, fields, spec)
    if spec.bn:
        _bn_figures(out, fields, spec)
    if spec.gamma or spec.gamma_shard:
        _gamma_figures(out, fields, spec)
    _param_figures(out, fields, spec)
    _histograms(out, fields, spec, act_abs_max)
    return out


def _tensor_figures(out: LayerStats, fields: Mapping[str, np.ndarray], spec: FigureSpec) -> np.ndarray | None:
    """The per-tensor statistics of every area; returns the outputs' ``abs_max`` (the histograms' outer edges)."""
    act_abs_max = None
    for area in AREAS:
        named = {f.name: fields[f"{area}.{f.name}"] for f in _fields.TENSOR_FIELDS if f"{area}.{f.name}" in fields}
        if not named:
            continue
        if area == "act_grad" and spec.act_grad_scale != 1.0:  # the loss scale and the processes divided out
            scale = float(spec.act_grad_scale)
            factor = {f.name: (abs(scale) if f.reduce == "max" else scale) ** f.degree for f in _fields.TENSOR_FIELDS}
            named = {k: v * factor[k] for k, v in named.items()}
        if area == "act":
            act_abs_max = named.get("abs_max")
        seen = (named["count"] + named["nonfinite"] > 0).tolist()
        values = {s.name: s.figure(named).tolist() for s in area_stats(area)}
        for i, module_keys in enumerate(spec.keys.get(area, ())):
            if seen[i]:
                for stat, key in module_keys:
                    out.scalars[key] = values[stat.name][i]
    return act_abs_max


def _layer_of_channel(sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For fields with one entry per channel of every layer: each channel's layer, and each layer's first channel."""
    return np.repeat(np.arange(len(sizes)), sizes), np.cumsum([0, *sizes[:-1]])


def _per_layer_mean(per_channel: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> list[float]:
    return (np.add.reduceat(per_channel, starts) / sizes).tolist()


def _bn_figures(out: LayerStats, fields: Mapping[str, np.ndarray], spec: FigureSpec) -> None:
    layer, starts = _layer_of_channel(spec.bn_sizes)
    sizes = np.asarray(spec.bn_sizes, dtype=np.float64)
    eps = np.repeat(np.asarray(spec.bn_eps, dtype=np.float64), spec.bn_sizes)
    seen = fields["bn.seen"]
    mu_batch, var_batch = mean_var(np.stack([fields["bn.count"], fields["bn.sum"], fields["bn.sum_sq"]]),
                                   unbiased=True)
    seen_by = np.maximum(seen, 1.0)[layer]  # the reference counts once per process that ran the layer
    ref_mean, ref_var = fields["bn.ref_mean"] / seen_by, fields["bn.ref_var"] / seen_by
    mean_shift = _per_layer_mean(np.abs(mu_batch - ref_mean) / np.sqrt(ref_var + eps), starts, sizes)
    var_shift = _per_layer_mean(np.abs(np.log((var_batch + eps) / (ref_var + eps))), starts, sizes)
    if "bn.running_mean" in fields:  # several processes: how far their running means are apart
        processes = fields["bn.processes"][layer]
        mean_of_means = fields["bn.running_mean"] / processes
        spread_var = np.clip(fields["bn.running_mean_sq"] / processes - mean_of_means**2, 0.0, None)
        mean_var_running = fields["bn.running_var"] / processes
        spread = _per_layer_mean(np.sqrt(spread_var) / np.sqrt(mean_var_running + eps), starts, sizes)
    else:
        spread = [0.0] * len(spec.bn)
    pre = spec.prefix
    for b, i in enumerate(spec.bn):
        name = spec.names[i]
        out.scalars[f"{pre}bn/running_spread/{name}"] = spread[b]
        if seen[b] > 0:
            out.scalars[f"{pre}bn/mean_shift/{name}"] = mean_shift[b]
            out.scalars[f"{pre}bn/var_shift/{name}"] = var_shift[b]


def _gamma_figures(out: LayerStats, fields: Mapping[str, np.ndarray], spec: FigureSpec) -> None:
    small: list[float] = []
    if spec.gamma:
        _, starts = _layer_of_channel(spec.gamma_sizes)
        small = np.add.reduceat(fields["bn.gamma_abs"] < spec.gamma_tol, starts).tolist()
    if spec.gamma_shard:
        small += fields[SHARDED_PARAM_FIELDS["bn.gamma_abs"][0]].tolist()
    layers = zip(spec.gamma + spec.gamma_shard, small, spec.gamma_sizes + spec.gamma_shard_sizes)
    for i, count, size in layers:
        out.scalars[f"{spec.prefix}bn/frac_small_gamma/{spec.names[i]}"] = count / size


def _recorded(fields: Mapping[str, np.ndarray], spec: FigureSpec, name: str) -> dict[int, float]:
    """The figure ``name`` by parameter index: local fields of plain parameters, reduced ones of sharded ones."""
    out = dict(zip(spec.recorded.get(name, ()), fields[name].tolist())) if name in fields else {}
    sharded = SHARDED_PARAM_FIELDS[name][0]
    if sharded in fields:
        values = fields[sharded]
        if name.endswith(".norm"):  # the reduced sum of squares of the full tensor
            values = np.sqrt(np.maximum(values, 0.0))
        out.update(zip(spec.recorded.get(sharded, ()), values.tolist()))
    return out


def _param_figures(out: LayerStats, fields: Mapping[str, np.ndarray], spec: FigureSpec) -> None:
    weight, grad, update = (_recorded(fields, spec, n) for n in ("param.norm", "grad.norm", "update.norm"))
    pre = spec.prefix
    for k, name in enumerate(spec.params):
        w = weight.get(k, 0.0)
        if k in weight:
            out.scalars[f"{pre}param/norm/{name}"] = w
        if k in grad:
            out.scalars[f"{pre}grad/norm/{name}"] = grad[k]
            if w > 0:  # a ratio to a zero weight (a bias at init) is left out, not inf
                out.scalars[f"{pre}grad/ratio/{name}"] = grad[k] / w
        if k in update and w > 0:
            out.scalars[f"{pre}update/ratio/{name}"] = update[k] / w


def _histograms(
    out: LayerStats, fields: Mapping[str, np.ndarray], spec: FigureSpec, act_abs_max: np.ndarray | None
) -> None:
    pre = spec.prefix
    if spec.act_hist:
        counts = fields["act.hist"]
        for row, i in enumerate(spec.act_hist):
            if counts[row].sum() > 0:
                outer = float(act_abs_max[i]) if act_abs_max is not None else 0.0
                tag = f"{pre}act/hist/{spec.names[i]}"
                out.histograms[tag] = trim_histogram(histogram_edges(spec.bins, outer), counts[row])
                exact = {"sum": float(fields["act.sum"][i]), "sum_squares": float(fields["act.sum_sq"][i])}
                out.histogram_exact[tag] = exact
    if spec.param_hist or spec.param_hist_shard:
        maxima = {"param": _recorded(fields, spec, "param.abs_max"), "grad": _recorded(fields, spec, "grad.abs_max")}
        for field_name, rows in (("param.hist", spec.param_hist),
                                 (SHARDED_PARAM_FIELDS["param.hist"][0], spec.param_hist_shard)):
            if not rows:
                continue
            counts = fields[field_name]
            for row, (kind, k) in enumerate(rows):
                if counts[row].sum() > 0:
                    edges = histogram_edges(spec.bins, maxima[kind].get(k, 0.0))
                    out.histograms[f"{pre}{kind}/hist/{spec.params[k]}"] = trim_histogram(edges, counts[row])
