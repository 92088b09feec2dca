"""LayerStatsMonitor: per-layer activation, gradient and batch-norm statistics on logging steps, exact under DDP."""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_bn._checks import check_positive_int
from lightning_bn.moments import distributed_world_size
from lightning_bn.stats import (
    ACTIVATION_GRAD_STATS,
    ACTIVATION_STATS,
    ALERT_KINDS,
    AlertThresholds,
    LayerStats,
    LayerStatsCollector,
    LogBins,
    find_alerts,
    select_modules,
)

__all__ = ["LayerStatsMonitor"]

_BN_STATS = ("mean_shift", "var_shift", "running_spread", "frac_small_gamma")
_PARAM_CHARTS = ("param/norm", "grad/norm", "grad/ratio", "update/ratio")


def metric_charts(prefixes: Sequence[str] = ("",)) -> dict[str, list[str]]:
    """One chart per statistic holding every layer's curve: ``{"act/std": ["^act/std/.*"], ...}``."""
    names = [f"act/{s}" for s in ACTIVATION_STATS] + [f"act_in/{s}" for s in ACTIVATION_STATS]
    names += [f"act_grad/{s}" for s in ACTIVATION_GRAD_STATS] + list(_PARAM_CHARTS)
    names += [f"bn/{s}" for s in _BN_STATS] + ["alerts"]
    charts: dict[str, list[str]] = {}
    for prefix in prefixes:
        for name in names:
            charts[f"{prefix}{name}"] = [f"^{re.escape(prefix + name)}/.*"]
    return charts


def heatmap_matrix(
    history: Sequence[tuple[int, dict[str, float]]], stat: str, order: Sequence[str]
) -> tuple[np.ndarray, list[str], list[int]]:
    """``(values, layers, steps)`` for a heatmap of ``stat`` (e.g. ``"act/std"``): layers x steps, NaN where absent.

    Layers are those of ``order`` (forward order) that have the statistic at any step, then any others by name.
    """
    prefix = f"{stat}/"
    keys = set().union(*(scalars.keys() for _, scalars in history))  # most steps share their keys: dedupe first
    present = {k[len(prefix) :] for k in keys if k.startswith(prefix)}
    layers = [name for name in order if name in present] + sorted(present - set(order))
    values = np.full((len(layers), len(history)), np.nan)
    for col, (_, scalars) in enumerate(history):
        for row, name in enumerate(layers):
            value = scalars.get(prefix + name)
            if value is not None:
                values[row, col] = value
    return values, layers, [step for step, _ in history]


def _check_every(name: str, value: int | None, allow_none: bool = True) -> int | None:
    return check_positive_int(name, value, allow_none=allow_none)


class LayerStatsMonitor(Callback):
    r"""Per-layer activation, gradient, parameter and batch-norm statistics, logged on logging steps.

    Hooks exist only on logging steps (``global_step % log_every_n_steps == 0``, and on histogram steps) and fire on
    no other step. Every figure is reduced from sufficient statistics in one collective per logging step and
    brought to the host in one transfer, so activation figures are exact for the union of all processes' batches
    (and of all micro-batches under gradient accumulation). Parameter gradients are read at the optimizer step,
    after DDP averaging and mixed-precision unscaling; activation gradients are those of the loss DDP optimizes (the
    mean of the processes' losses) and are unscaled by the AMP loss scale. Activation checkpointing: a forward
    recomputed during the backward pass is not counted again. Rank zero writes to every attached logger through
    :func:`lightning_bn.sinks.sinks_for_loggers` (scalars everywhere; on TensorBoard also a custom-scalars layout
    with one chart per statistic, raw histograms and heatmap images; on W&B histograms and images).

    Watched modules (default: every normalization, conv and linear layer) are chosen when training (or
    validation) starts, after callbacks such as :class:`~lightning_bn.callbacks.NormSwap` changed the model.

    ``torch.compile``: ``trainer.fit(torch.compile(model))``, ``self.net = torch.compile(self.net)`` and
    ``module.compile()`` give the same figures and keys as the eager model (no ``_orig_mod`` in a name). A logging
    step's forward and backward run eagerly, under ``torch.compiler.set_stance("force_eager")`` (restored at its
    optimizer step, and when an exception passes), so every hook fires and nothing is traced or recompiled with the
    hooks; the other steps run the compiled graphs of a run without the monitor. Modules that run as TorchScript get
    a one-time warning naming the figures they lack.

    Padded sequences: where the LightningModule runs its forward under :func:`lightning_bn.padding_mask` (or
    :func:`lightning_bn.set_padding_mask_from`), the ``act``, ``act_in``, ``act_grad`` and ``bn`` figures of
    channels-last tensors that fit the mask (``(N, T, C)`` for an ``(N, T)`` mask) count real tokens only, so
    ``act/frac_zero`` does not report padding as dead units; other tensors are summarized whole.

    Logged metrics (``<module>`` is a watched module's name, ``<param>`` one of its own parameters' names)::

        act/mean/<module>             mean of the module's output (all floating tensors of a tuple/list/dict output)
        act/std/<module>              standard deviation of the output
        act/rms/<module>              root mean square of the output
        act/abs_max/<module>          largest |value| of the output
        act/frac_zero/<module>        fraction of output values with |x| <= zero_tol (dead units)
        act/frac_nonfinite/<module>   fraction of NaN or Inf output values
        act_in/<stat>/<module>        the same six statistics of a normalization layer's input
        act_grad/rms/<module>         RMS of the gradient of the loss with respect to the output
        act_grad/abs_max/<module>     largest |value| of that gradient
        act_grad/frac_nonfinite/<module>  fraction of NaN or Inf in that gradient (fp16 overflow); the RMS and
                                      maximum are of the finite values
        param/norm/<param>            ||w||
        grad/norm/<param>             ||dL/dw|| at the optimizer step (averaged, unscaled)
        grad/ratio/<param>            ||dL/dw|| / ||w||   (left out while ||w|| = 0)
        update/ratio/<param>          ||w_after - w_before|| / ||w_before|| over the optimizer step
        bn/mean_shift/<module>        mean over channels of |mu_batch - mu_running| / sqrt(var_running + eps)
        bn/var_shift/<module>         mean over channels of |log((var_batch + eps) / (var_running + eps))|
        bn/running_spread/<module>    mean over channels of the std across processes of the running mean
                                      / sqrt(mean running var + eps) (0 on one process)
        bn/frac_small_gamma/<module>  fraction of channels with |gamma| < gamma_tol
        alerts/<kind>                 layers flagged on this step, kind in nonfinite, dead, std_collapse,
                                      std_explode, grad_vanishing, grad_exploding
        act/hist/<module>             (histogram steps) histogram of the output
        param/hist/<param>            (histogram steps) histogram of the weights
        grad/hist/<param>             (histogram steps) histogram of the gradients
        heatmap/<stat>                (every heatmap_every_n_logs logs) image, layers x logged steps, for each
                                      statistic in heatmap_stats, e.g. heatmap/act/std

    With ``log_validation=True`` each validation epoch (not the sanity check) adds ``val_act/<stat>/<module>``,
    ``val_act_in/<stat>/<module>``, ``val_bn/mean_shift/<module>``, ``val_bn/var_shift/<module>``,
    ``val_bn/running_spread/<module>``, ``val_bn/frac_small_gamma/<module>`` and ``val_alerts/<kind>``, over every
    validation batch, at ``trainer.global_step``. Batch-norm statistics compare the batch's mean and unbiased
    variance (over the union of processes and micro-batches) with the running ones as they were before the step's
    first forward. Scalars are logged at ``step`` = the optimizer step measured (``trainer.global_step`` before it).

    Args:
        log_every_n_steps: collect on optimizer steps ``0, n, 2n, ...``; default the trainer's ``log_every_n_steps``.
        include: module classes and name globs to watch (e.g. ``[nn.Conv2d, "layer1.*"]``); default every
            normalization, conv and linear layer.
        exclude: classes and name globs not to watch.
        activations: output (and normalization-input) statistics.
        activation_grads: statistics of the gradient with respect to each output.
        params: weight, gradient and update norms of the watched modules' own parameters.
        batch_norm: batch-versus-running statistics of batch-norm layers.
        histogram_every_n_steps: also histograms on steps ``0, n, 2n, ...``; None: never.
        heatmap_every_n_logs: a heatmap per statistic every this many logging steps; None: never.
        heatmap_stats: statistics drawn as heatmaps, among the ``<area>/<stat>`` names above.
        heatmap_max_steps: columns kept for the heatmaps (the oldest are dropped).
        log_validation: also collect over validation epochs (prefix ``val_``).
        zero_tol: ``|x| <= zero_tol`` counts as zero.
        gamma_tol: ``|gamma| < gamma_tol`` counts as a small batch-norm scale.
        bins_per_decade: histogram resolution (log-magnitude bins from 1e-6 to 1e6, see
            :class:`lightning_bn.stats.LogBins`).
        alert_thresholds: :class:`lightning_bn.stats.AlertThresholds` (or a dict of its fields).
        process_group: the group to reduce over (default: the world).

    Sharded training (Lightning's ``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): parameters
    and gradients are DTensors; ``param/*``, ``grad/*``, ``update/*``, ``bn/frac_small_gamma`` and the parameter
    and gradient histograms are those of the full, unsharded tensors, from each shard's sums of squares, maxima and
    bin counts (bin edges are fixed, so counts add up), reduced in the same one collective; full parameters are never
    gathered. Activation figures are reduced over the data-parallel processes as under DDP, so every figure equals
    that of the same run under DDP. Only a 1-D data-parallel mesh is supported (see :meth:`check_strategy`).
    That strategy never calls a ``LayerSync`` plugin, so when training starts the monitor warns (once, on rank zero)
    naming the batch-norm layers that nothing synchronizes (:meth:`unsynchronized_batch_norms`).

    Raises:
        ValueError: an ``*_every_n_*`` argument that is not a positive int (or None where allowed), an unknown
            statistic in ``heatmap_stats``, a negative tolerance, or bad alert thresholds; at setup, a
            ``ModelParallelStrategy`` with ``tensor_parallel_size`` > 1 (a 2-D mesh).
        TypeError: an entry of ``include``/``exclude`` that is neither a module class nor a str.

    Example::

        import lightning as L
        from lightning_bn.callbacks import LayerStatsMonitor

        trainer = L.Trainer(max_steps=100, callbacks=[LayerStatsMonitor(log_every_n_steps=50)])
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: Sequence[type | str] | type | str | None = None,
        exclude: Sequence[type | str] | type | str | None = None,
        *,
        activations: bool = True,
        activation_grads: bool = True,
        params: bool = True,
        batch_norm: bool = True,
        histogram_every_n_steps: int | None = None,
        heatmap_every_n_logs: int | None = 50,
        heatmap_stats: Sequence[str] = ("act/std", "act/frac_zero", "act_grad/rms"),
        heatmap_max_steps: int = 200,
        log_validation: bool = False,
        zero_tol: float = 0.0,
        gamma_tol: float = 1e-3,
        bins_per_decade: int = 4,
        alert_thresholds: AlertThresholds | dict[str, float] | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.log_every_n_steps = _check_every("log_every_n_steps", log_every_n_steps)
        self.histogram_every_n_steps = _check_every("histogram_every_n_steps", histogram_every_n_steps)
        self.heatmap_every_n_logs = _check_every("heatmap_every_n_logs", heatmap_every_n_logs)
        self.heatmap_max_steps = _check_every("heatmap_max_steps", heatmap_max_steps, allow_none=False)
        known = [c for c in metric_charts() if c != "alerts"]
        if isinstance(heatmap_stats, str):
            heatmap_stats = [heatmap_stats]
        for stat in heatmap_stats:
            if stat not in known:
                raise ValueError(f"`heatmap_stats` takes statistics among {', '.join(known)}, got {stat!r}")
        self.heatmap_stats = list(heatmap_stats)
        if zero_tol < 0:
            raise ValueError(f"`zero_tol` must be >= 0, got {zero_tol!r}")
        if gamma_tol < 0:
            raise ValueError(f"`gamma_tol` must be >= 0, got {gamma_tol!r}")
        if isinstance(alert_thresholds, dict):
            alert_thresholds = AlertThresholds(**alert_thresholds)
        elif alert_thresholds is not None and not isinstance(alert_thresholds, AlertThresholds):
            raise TypeError(f"`alert_thresholds` must be an AlertThresholds, a dict or None, got {alert_thresholds!r}")
        self.alert_thresholds = alert_thresholds or AlertThresholds()
        select_modules(nn.Module(), include, exclude)  # validates the selectors now, not at setup
        self.include, self.exclude = include, exclude
        self.activations, self.activation_grads = activations, activation_grads
        self.params, self.batch_norm = params, batch_norm
        self.log_validation = log_validation
        self.zero_tol, self.gamma_tol = float(zero_tol), float(gamma_tol)
        self.bins = LogBins(bins_per_decade)
        self.process_group = process_group

        # Results, readable on every rank (figures are computed on every rank, written on rank zero).
        self.last_metrics: dict[str, float] = {}
        self.last_stats: LayerStats | None = None
        self.collected_steps: list[int] = []
        self.hook_calls = 0
        self.alert_counts: dict[str, int] = {kind: 0 for kind in ALERT_KINDS}
        self.history: list[tuple[int, dict[str, float]]] = []
        self._warned: set[str] = set()
        self._train: LayerStatsCollector | None = None
        self._val: LayerStatsCollector | None = None
        self._step: int | None = None
        self._stepped = False
        self._loss_scale = 1.0
        self._sinks: list[Any] | None = None
        self._logs = 0
        self._eager: ExitStack | None = None  # the compiler's stance while a collection runs eagerly

    # ------------------------------------------------------------------ pure logic
    @staticmethod
    def should_collect(step: int, every: int | None, histogram_every: int | None) -> tuple[bool, bool]:
        """``(collect, histograms)`` for optimizer step ``step``."""
        hist = histogram_every is not None and step % histogram_every == 0
        return hist or (every is not None and step % every == 0), hist

    def _collector(self, pl_module: pl.LightningModule, validation: bool) -> LayerStatsCollector:
        modules = select_modules(pl_module, self.include, self.exclude)
        if not modules:
            self._warn_once(
                "no_modules",
                f"LayerStatsMonitor watches no module of {type(pl_module).__name__} "
                f"(include={self.include!r}, exclude={self.exclude!r}); nothing will be logged.",
            )
        collector = LayerStatsCollector(
            modules,
            activations=self.activations,
            activation_grads=self.activation_grads and not validation,
            batch_norm=self.batch_norm,
            params=self.params and not validation,
            zero_tol=self.zero_tol,
            gamma_tol=self.gamma_tol,
            bins=self.bins,
            prefix="val_" if validation else "",
        )
        missing = unseen_figures(collector)
        if missing:
            self._warn_once(
                "torchscript",
                f"LayerStatsMonitor: {', '.join(collector.unhooked)} run as TorchScript, where Python hooks do not "
                f"fire: their {', '.join(missing)} figures are missing (their parameter figures are logged).",
            )
        return collector

    def _run_eagerly(self) -> None:
        """Until :meth:`_compile_again`, every ``torch.compile``'d region runs eagerly, its hooks included."""
        if self._eager is None and hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
            stack = ExitStack()
            stack.enter_context(torch.compiler.set_stance("force_eager"))  # restores the stance it found
            self._eager = stack

    def _compile_again(self) -> None:
        stack, self._eager = self._eager, None
        if stack is not None:
            stack.close()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    def _detach_all(self) -> None:
        self._compile_again()
        for collector in (self._train, self._val):
            if collector is not None:
                collector.detach()
        self._step, self._stepped = None, False

    @staticmethod
    def check_strategy(strategy: Any) -> None:
        """Refuse a ``ModelParallelStrategy`` whose mesh has a tensor-parallel dimension of more than one process.

        Under a 1-D (data-parallel) mesh every figure is exact: sharded parameters give the figures of their full
        tensors and activations are reduced over the data-parallel processes, as under DDP. On a 2-D mesh (data
        parallel x tensor parallel) the processes of a tensor-parallel group see the same batch, their outputs are
        shards or copies depending on the layer's plan, and the loss is not averaged over them; the activation and
        batch-norm figures reduced over every process would count a batch once per tensor-parallel process and the
        activation gradients would be scaled by the wrong count. That case is not implemented.

        Raises:
            ValueError: the strategy's mesh has ``tensor_parallel`` of size > 1 (the message names the mesh).
        """
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(strategy, ModelParallelStrategy):
            return
        mesh = strategy.device_mesh
        names = tuple(mesh.mesh_dim_names or ())
        sizes = dict(zip(names, mesh.mesh.shape))
        if sizes.get("tensor_parallel", 1) > 1:
            shape = " x ".join(f"{name}={size}" for name, size in sizes.items())
            raise ValueError(
                f"LayerStatsMonitor supports ModelParallelStrategy on a 1-D data-parallel mesh only, got a mesh of "
                f"{shape}: with tensor parallelism the activation, batch-norm and activation-gradient figures are not "
                "those of the model. Use ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1) "
                "with fully_shard over device_mesh['data_parallel'], or leave the monitor out."
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(getattr(trainer, "strategy", None))

    # ------------------------------------------------------------------ training
    @staticmethod
    def unsynchronized_batch_norms(strategy: Any, model: nn.Module) -> list[str]:
        """Under ``ModelParallelStrategy`` with several processes: the batch-norm layers of ``model`` that nothing
        synchronizes. That strategy never calls a ``LayerSync`` plugin (``SyncNormPlugin``, ``sync_batchnorm=True``),
        so such a plugin does nothing there, and cannot say so itself."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from lightning_bn.taxonomy import find_norms

        if not isinstance(strategy, ModelParallelStrategy) or getattr(strategy, "world_size", 1) < 2:
            return []
        # batch renorm and ghost batch norm synchronize where sync_stats is switched on
        return [
            name
            for name, module, info in find_norms(model)
            if info.batch_stats and info.kind != "sync_batch" and not getattr(module, "sync_stats", False)
        ]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unsynced = self.unsynchronized_batch_norms(getattr(trainer, "strategy", None), pl_module)
        if unsynced:
            self._warn_once(
                "unsynchronized_bn",
                f"LayerStatsMonitor: under ModelParallelStrategy the batch-norm layers {', '.join(unsynced[:5])}"
                f"{', ...' if len(unsynced) > 5 else ''} are not synchronized: this strategy never calls a LayerSync "
                "plugin (plugins=[SyncNormPlugin()], sync_batchnorm=True), so each process keeps its own running "
                "statistics (see bn/running_spread). To synchronize, call SyncNormPlugin().apply(module) in "
                "configure_model before fully_shard.",
            )
        self._train = self._collector(pl_module, validation=False)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._train is None or self._train.attached:
            return  # a later micro-batch of a step being collected
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50)  # set by the Trainer
        collect, hist = self.should_collect(trainer.global_step, every, self.histogram_every_n_steps)
        if collect:
            self._run_eagerly()  # from the step's first micro-batch to its optimizer step
            self._train.attach(histograms=hist)
            self._step, self._stepped = trainer.global_step, False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._train is None or not self._train.attached:
            return
        # Lightning calls this hook after the closure: gradients are averaged across processes and unscaled.
        self._compile_again()  # forward and backward are done: the optimizer step runs as it would without us
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._train.record_params(params)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        enabled = scaler is not None and (not hasattr(scaler, "is_enabled") or scaler.is_enabled())
        self._loss_scale = float(scaler.get_scale()) if enabled and scaler is not None else 1.0
        self._stepped = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        collector = self._train
        if collector is None or not collector.attached or not self._stepped:
            return  # not collecting, or a micro-batch before the optimizer step
        self._compile_again()  # (already, unless a step went by without on_before_optimizer_step)
        collector.record_updates()
        collector.detach()
        step = self._step if self._step is not None else trainer.global_step
        self._step, self._stepped = None, False
        world = distributed_world_size(self.process_group)
        stats = collector.finalize(self.process_group, act_grad_scale=1.0 / (world * self._loss_scale))
        self._after_collection(trainer, collector, stats, step, prefix="")

    # ------------------------------------------------------------------ validation
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.log_validation or trainer.sanity_checking:
            return
        self._val = self._collector(pl_module, validation=True)
        self._run_eagerly()
        self._val.attach(histograms=False)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        collector = self._val
        if collector is None or not collector.attached:
            return
        self._compile_again()
        collector.detach()
        stats = collector.finalize(self.process_group)
        self._after_collection(trainer, collector, stats, trainer.global_step, prefix="val_")

    # ------------------------------------------------------------------ cleanup
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach_all()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach_all()
        for sink in self._sinks or []:
            sink.flush()  # not after every log: a flush waits for the writer thread

    # ------------------------------------------------------------------ writing
    def _after_collection(
        self, trainer: pl.Trainer, collector: LayerStatsCollector, stats: LayerStats, step: int, prefix: str
    ) -> None:
        self.hook_calls += collector.forwards
        self.collected_steps.append(step)
        if collector.forwards == 0 and collector.modules and self.activations:
            self._warn_once(
                "no_forward",
                f"LayerStatsMonitor: no watched module ran a hooked forward on step {step}, so its activation "
                "figures are missing. Modules called other than through nn.Module.__call__ (their forward called "
                "directly, TorchScript, CUDA-graph replays) run no hooks.",
            )
        alerts = find_alerts(stats, self.alert_thresholds, prefix=prefix)
        metrics = dict(stats.scalars)
        for kind, layers in alerts.items():
            metrics[f"{prefix}alerts/{kind}"] = float(len(layers))
            if layers:
                self.alert_counts[kind] = self.alert_counts.get(kind, 0) + 1
                self._warn_once(f"alert_{kind}", _alert_message(kind, layers, step, prefix))
        self.last_metrics, self.last_stats = metrics, stats
        if not prefix:
            self.history.append((step, stats.scalars))
            del self.history[: -int(self.heatmap_max_steps or 1)]
            self._logs += 1
        if trainer.is_global_zero:
            self._write(trainer, stats, metrics, step, heatmaps=not prefix)

    def _write(
        self, trainer: pl.Trainer, stats: LayerStats, metrics: dict[str, float], step: int, heatmaps: bool
    ) -> None:
        from lightning_bn.sinks import sinks_for_loggers

        if self._sinks is None:
            self._sinks = sinks_for_loggers(trainer.loggers)
            charts = metric_charts(("", "val_") if self.log_validation else ("",))
            for sink in self._sinks:
                sink.set_layout(charts)
        for sink in self._sinks:
            sink.log_scalars(metrics, step)
            for tag, (edges, counts) in stats.histograms.items():
                sink.log_histogram(tag, edges, counts, step, exact=_finite(stats.histogram_exact.get(tag)))
        every = self.heatmap_every_n_logs
        if heatmaps and every is not None and self._logs % every == 0:
            for stat in self.heatmap_stats:
                values, layers, steps = heatmap_matrix(self.history, stat, stats.order)
                if layers:
                    for sink in self._sinks:
                        sink.log_heatmap(f"heatmap/{stat}", values, layers, steps, step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"alert_counts": dict(self.alert_counts), "warned": sorted(self._warned), "logs": self._logs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alert_counts.update(state_dict.get("alert_counts", {}))
        self._warned = set(state_dict.get("warned", []))
        self._logs = int(state_dict.get("logs", 0))


def unseen_figures(collector: LayerStatsCollector) -> list[str]:
    """The figures missing for the collector's TorchScript modules (``collector.unhooked``), as key globs.

    A scripted module is no instance of its torch class (``torch.jit.script(nn.BatchNorm2d(8))`` is a
    ``RecursiveScriptModule``), so it is watched as a plain module: the output and gradient figures are those it lacks.
    """
    if not collector.unhooked:
        return []
    missing = [f"{collector.prefix}act/*"] if collector.activations else []
    return missing + ([f"{collector.prefix}act_grad/*"] if collector.activation_grads else [])


def _finite(exact: dict[str, float] | None) -> dict[str, float] | None:
    if not exact:
        return None
    return {k: v for k, v in exact.items() if np.isfinite(v)} or None


def _alert_message(kind: str, layers: list[str], step: int, prefix: str) -> str:
    where = "validation" if prefix else f"step {step}"
    first = layers[0]
    text = {
        "nonfinite": f"the first layer (in forward order) with NaN or Inf values is {first!r}",
        "dead": f"over the dead-unit threshold of zeros: {', '.join(layers)}",
        "std_collapse": f"activation std collapsed in {', '.join(layers)}",
        "std_explode": f"activation std exploded in {', '.join(layers)}",
        "grad_vanishing": "activation gradients vanish towards the input (first vs last watched layer)",
        "grad_exploding": "activation gradients explode towards the input (first vs last watched layer)",
    }[kind]
    return f"LayerStatsMonitor alert `{prefix}alerts/{kind}` at {where}: {text}. (Warned once; counted in the metric.)"
