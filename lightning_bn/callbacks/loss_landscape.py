"""LossLandscapeProbe: loss variation, gradient predictiveness and effective beta-smoothness along the gradient."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_bn._checks import check_positive_int
from lightning_bn.callbacks._training_step import logging_muted
from lightning_bn.callbacks.layer_stats_monitor import LayerStatsMonitor
from lightning_bn.moments import distributed_world_size, reduce_across_processes

__all__ = ["LandscapeMeasurement", "LossLandscapeProbe", "measure_landscape"]

LossFn = Callable[["pl.LightningModule", Any], Tensor]


@dataclass
class LandscapeMeasurement:
    """One probe at weights ``w`` along ``g = grad L(w)``.

    Attributes:
        step_sizes: the step sizes ``eta`` probed.
        loss: ``L(w)``.
        losses: ``L(w - eta * g)`` per step size.
        grad_norm: ``||g||``.
        grad_diffs: ``||g - grad L(w - eta * g)||`` per step size.
        loss_range: ``max - min`` of ``losses`` (the loss at ``w`` is not included unless 0 is a step size).
        grad_pred: the largest of ``grad_diffs`` (gradient predictiveness: small is predictive).
        beta_smooth: the largest of ``grad_diffs[i] / (eta_i * ||g||)`` (effective beta-smoothness; 0 when g = 0).
    """

    step_sizes: list[float]
    loss: float
    losses: list[float]
    grad_norm: float
    grad_diffs: list[float]
    loss_range: float = field(init=False)
    grad_pred: float = field(init=False)
    beta_smooth: float = field(init=False)

    def __post_init__(self) -> None:
        self.loss_range = max(self.losses) - min(self.losses)
        self.grad_pred = max(self.grad_diffs)
        ratios = [
            d / (eta * self.grad_norm) for eta, d in zip(self.step_sizes, self.grad_diffs) if eta > 0 and self.grad_norm
        ]
        self.beta_smooth = max(ratios) if ratios else 0.0

    def metrics(self, prefix: str = "landscape/") -> dict[str, float]:
        """The logged scalars (see :class:`LossLandscapeProbe`)."""
        return {
            f"{prefix}loss_range": self.loss_range,
            f"{prefix}grad_pred": self.grad_pred,
            f"{prefix}beta_smooth": self.beta_smooth,
            f"{prefix}grad_norm": self.grad_norm,
            f"{prefix}loss": self.loss,
        }


def check_step_sizes(step_sizes: Any) -> list[float]:
    """``step_sizes`` as a list of floats; raises ValueError unless it is a non-empty sequence of finite values >= 0."""
    if isinstance(step_sizes, (int, float)) and not isinstance(step_sizes, bool):
        step_sizes = [step_sizes]
    try:
        values = [float(s) for s in step_sizes]
    except (TypeError, ValueError):
        values = []
    if not values or any(not math.isfinite(v) or v < 0 for v in values) or not any(v > 0 for v in values):
        raise ValueError(
            f"`step_sizes` must be a non-empty sequence of finite floats >= 0 with at least one > 0, got {step_sizes!r}"
        )
    return values


def _cuda_devices() -> list[int]:
    """Every CUDA device once CUDA is in use (none before: asking for their RNG state would initialize CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def measure_landscape(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    step_sizes: Sequence[float],
    *,
    modules: nn.Module | None = None,
    group: dist.ProcessGroup | None = None,
) -> LandscapeMeasurement:
    """Probe the loss along the gradient direction, leaving parameters, gradients, buffers, modes and RNG as they were.

    ``g = grad L(w)`` is computed with ``torch.autograd.grad`` (no ``.grad`` is touched); then for each ``eta`` the
    parameters are set to ``w - eta * g`` and ``L`` and its gradient are evaluated there. Every evaluation starts from
    the same RNG state and the same buffers (batch-norm running statistics, ``num_batches_tracked``) of ``modules``,
    so dropout masks are identical and running statistics do not drift; modules run in the modes they are in. Under
    a process group, the loss and the gradient of each evaluation are averaged over the processes (one
    :func:`lightning_bn.moments.reduce_across_processes` per evaluation, on every process), as DDP averages the
    training gradient; every process must call this function.

    Args:
        loss_fn: evaluates the (scalar) loss at the current parameters, differentiably.
        params: the parameters ``w`` (those without ``requires_grad`` are left out).
        step_sizes: the step sizes ``eta``.
        modules: a module whose buffers and training modes are saved and restored (usually the whole model).
        group: the process group to average over (default: the world when initialized).

    Raises:
        ValueError: bad ``step_sizes``, no parameter that requires grad, or a non-scalar loss.
    """
    etas = check_step_sizes(step_sizes)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("`params` holds no tensor that requires grad: there is no gradient direction to probe")
    world = distributed_world_size(group)
    buffers = [b for b in modules.buffers()] if modules is not None else []
    modes = [(m, m.training) for m in modules.modules()] if modules is not None else []
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    devices = _cuda_devices()

    def evaluate() -> tuple[float, list[Tensor]]:
        with torch.no_grad():
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
        # Each evaluation draws from the RNG state the probe started with, which is also left as it was.
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = loss_fn()
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"the probe's loss must be a scalar tensor, got {loss!r:.200}")
            raw = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, raw)]
        flat = torch.cat([loss.detach().reshape(1).double()] + [g.reshape(-1).double() for g in grads])
        flat = reduce_across_processes(flat, group=group) / world
        out, offset = [], 1
        for p in params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return float(flat[0]), out

    try:
        loss0, g = evaluate()
        grad_norm = math.sqrt(sum(float(t.square().sum()) for t in g))
        losses, diffs = [], []
        for eta in etas:
            with torch.no_grad():
                for p, w, gp in zip(params, saved_params, g):
                    p.copy_(w - eta * gp.to(w.dtype))
            loss_eta, g_eta = evaluate()
            losses.append(loss_eta)
            diffs.append(math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(g, g_eta))))
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved_params):
                p.copy_(w)
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
        for m, training in modes:
            m.training = training
    return LandscapeMeasurement(etas, loss0, losses, grad_norm, diffs)


class LossLandscapeProbe(Callback):
    r"""Every ``every_n_steps`` optimizer steps, probe the loss landscape along the gradient (Santurkar et al., 2018).

    At the current weights ``w`` and on the step's own batch, the probe computes ``g = grad L(w)`` and, for each step
    size ``eta``, the loss ``L(w - eta g)`` and the gradient there. It logs the range of the loss over the step sizes
    ("loss landscape" variation), the gradient predictiveness ``max ||g - grad L(w - eta g)||`` and the effective
    beta-smoothness ``max ||g - grad L(w - eta g)|| / ||eta g||`` (section 3.1 of "How Does Batch Normalization
    Help Optimization?").

    It runs in ``on_train_batch_start``, before the training step's forward, on the batch about to be trained on, with
    every module in the mode training uses (batch norm normalizes with batch statistics). Each evaluation starts from
    the same RNG state and buffers, so ``g`` is the gradient the training step then computes (the same dropout mask,
    the same batch statistics). Afterwards parameters, ``.grad``, buffers (running statistics do not drift), modes and
    the RNG state are exactly as before, also when an exception passes. Under DDP the loss and gradients are averaged
    over the processes through :func:`lightning_bn.moments.reduce_across_processes`, as DDP averages the training
    gradient; figures are computed on every rank and written by rank zero to every logger of the trainer at
    ``step = trainer.global_step``. Each probe costs ``1 + len(step_sizes)`` forward and backward passes.

    On a ``torch.compile``'d model (``trainer.fit(torch.compile(model))``, ``self.net = torch.compile(self.net)``
    or ``module.compile()``) the probe's passes run the training step's compiled graph: it changes parameter and
    buffer values in place, never modes or shapes, so dynamo's guards hold and nothing recompiles; the figures are
    those of the eager model.

    Place it before :class:`~lightning_bn.callbacks.LayerStatsMonitor` in the callbacks list: the monitor's hooks are
    attached in its own ``on_train_batch_start`` and would count the probe's forwards.

    Logged metrics::

        landscape/loss_range   max - min over step sizes of L(w - eta g)
        landscape/grad_pred    max over step sizes of ||g - grad L(w - eta g)||
        landscape/beta_smooth  max over step sizes of ||g - grad L(w - eta g)|| / (eta ||g||)
        landscape/grad_norm    ||g||
        landscape/loss         L(w)

    Args:
        every_n_steps: probe on optimizer steps ``0, n, 2n, ...``.
        step_sizes: the step sizes ``eta`` (absolute, or multiples of the learning rate with ``relative_to_lr``).
        relative_to_lr: multiply the step sizes by the first optimizer's first parameter group's current ``lr``.
        loss_fn: ``loss_fn(pl_module, batch) -> loss``; by default the module's ``training_step(batch, batch_idx)``
            (its tensor, or the ``"loss"`` entry of its dict) with ``self.log`` and ``self.log_dict`` muted while it
            runs.
        process_group: the group to average over (default: the world).

    Raises:
        ValueError: ``every_n_steps`` not a positive int, bad ``step_sizes``, or (at setup) the default ``loss_fn``
            with manual optimization (its ``training_step`` would step the optimizer).
        TypeError: ``loss_fn`` that is not callable.

    Example::

        import lightning as L
        from lightning_bn.callbacks import LossLandscapeProbe

        trainer = L.Trainer(max_steps=100, callbacks=[LossLandscapeProbe(every_n_steps=10)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        step_sizes: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
        *,
        relative_to_lr: bool = False,
        loss_fn: LossFn | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps: int = check_positive_int("every_n_steps", every_n_steps)
        self.step_sizes = check_step_sizes(step_sizes)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(pl_module, batch) or None, got {loss_fn!r}")
        self.relative_to_lr = bool(relative_to_lr)
        self.loss_fn = loss_fn
        self.process_group = process_group
        self.history: list[tuple[int, LandscapeMeasurement]] = []
        self._last_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, step_sizes=tuple(self.step_sizes), relative_to_lr=self.relative_to_lr
        )

    @staticmethod
    def should_probe(step: int, every: int, last_step: int) -> bool:
        """True on optimizer steps ``0, every, 2 every, ...``, once per step (micro-batches of one step share it)."""
        return step % every == 0 and step != last_step

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "LossLandscapeProbe's default `loss_fn` calls `training_step`, which under manual optimization steps "
                "the optimizer; pass `loss_fn=lambda pl_module, batch: ...` returning the loss, got loss_fn=None"
            )
        callbacks: list[Callback] = list(getattr(trainer, "callbacks", []))
        monitors = [i for i, cb in enumerate(callbacks) if isinstance(cb, LayerStatsMonitor)]
        if monitors and self in callbacks and monitors[0] < callbacks.index(self):
            rank_zero_warn(
                "LossLandscapeProbe comes after LayerStatsMonitor in the callbacks: on steps both act, the monitor "
                "counts the probe's forwards. Put the probe first.",
                category=UserWarning,
            )

    def _loss(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        out = pl_module.training_step(batch, batch_idx)
        if isinstance(out, dict):
            out = out.get("loss")
        if not isinstance(out, Tensor):
            raise ValueError(
                f"LossLandscapeProbe: `training_step` returned {type(out).__name__}, not a loss tensor (or a dict "
                "with 'loss'); pass `loss_fn`"
            )
        return out

    def _step_sizes(self, trainer: pl.Trainer) -> list[float]:
        if not self.relative_to_lr:
            return list(self.step_sizes)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        return [s * lr for s in self.step_sizes]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.should_probe(step, self.every_n_steps, self._last_step):
            return
        self._last_step = step
        muted = logging_muted(pl_module) if self.loss_fn is None else nullcontext()
        context = trainer.precision_plugin.train_step_context() if trainer.precision_plugin else nullcontext()
        with muted, context:
            measurement = measure_landscape(
                lambda: self._loss(pl_module, batch, batch_idx),
                list(pl_module.parameters()),
                self._step_sizes(trainer),
                modules=pl_module,
                group=self.process_group,
            )
        self.history.append((step, measurement))
        if trainer.is_global_zero:
            metrics = measurement.metrics()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
