"""Training runs of the study: the examples' CNN and transformer under a Trainer, measured by our callbacks."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from examples import cnn as cnn_example
from examples import transformer as tf_example
from lightning_bn.recalibrate import recalibrate_bn

__all__ = ["CurveRecorder", "EvalBothStats", "RunResult", "quiet", "set_bn_option", "train_cnn", "train_transformer"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within the block: Lightning's per-run banners and the warnings that every short run repeats are silenced.

    The warning filters and logger levels are those of before once the block ends: importing or running the study
    changes no process-wide state.
    """
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        for category in (UserWarning, DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@dataclass
class RunResult:
    """What one training run gave: validation curve, final figures, divergence, cost."""

    curve: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, validation metric)
    final: float = float("nan")
    diverged: bool = False
    steps: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class CurveRecorder(Callback):
    """Validation metric after every validation run; stops training once the training loss is not finite."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.curve: list[tuple[int, float]] = []
        self.diverged = False

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and not trainer.sanity_checking:
            self.curve.append((trainer.global_step, float(value)))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all()):
            self.diverged = True
            trainer.should_stop = True


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Accuracy of ``model`` in eval mode (a copy, so the caller's modes stay as they are)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


class EvalBothStats(Callback):
    """At each training epoch's end: validation accuracy with the moving-average running statistics and with the
    population statistics of :func:`lightning_bn.recalibrate_bn` (on a copy; the trained model is not touched)."""

    def __init__(self, train_x: Tensor, val_x: Tensor, val_y: Tensor, batch_size: int = 256) -> None:
        self.train_batches = list(train_x.split(batch_size))
        self.val_x, self.val_y = val_x, val_y
        self.rows: list[dict[str, float]] = []

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = accuracy(pl_module, self.val_x, self.val_y)
        recal = copy.deepcopy(pl_module)
        report = recalibrate_bn(recal, self.train_batches)
        shifts = [layer.mean_shift for layer in report.layers.values()]
        self.rows.append({
            "epoch": trainer.current_epoch + 1,
            "step": trainer.global_step,
            "ema_acc": ema,
            "recal_acc": accuracy(recal, self.val_x, self.val_y),
            "mean_shift": sum(shifts) / max(len(shifts), 1),
        })


def set_bn_option(model: nn.Module, **options: Any) -> int:
    """Set attributes (``momentum``, ``virtual_batch_size``, ``warmup_steps``) on every module that has them."""
    changed = 0
    for module in model.modules():
        for name, value in options.items():
            if hasattr(module, name) and not isinstance(getattr(module, name), (Tensor, nn.Module)):
                setattr(module, name, value)
                changed += 1
    return changed


def _trainer(callbacks: Sequence[Callback], **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs,
    )


def train_cnn(
    norm: str,
    *,
    seed: int,
    lr: float = 0.05,
    batch_size: int = 64,
    epochs: int = 3,
    width: int = 16,
    val_every: int | None = None,
    limit_train_batches: int | None = None,
    callbacks: Sequence[Callback] = (),
    configure: Callable[[nn.Module, int], None] | None = None,
    validate: bool = True,
) -> RunResult:
    """Train ``examples.cnn.CNN(norm=norm)`` on the digits; validation accuracy every ``val_every`` steps or epoch.

    ``configure(model, steps_per_epoch)`` may change the model's layers before training (momentum, warm-up ...).
    """
    L.seed_everything(seed, verbose=False)
    data = cnn_example.DigitsDataModule(batch_size=batch_size)
    model = cnn_example.CNN(norm=norm, width=width, lr=lr)
    data.setup("fit")
    assert data.train_set is not None
    steps_per_epoch = len(data.train_set) // batch_size
    if limit_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, limit_train_batches)
    if configure is not None:
        configure(model, steps_per_epoch)
    recorder = CurveRecorder("val/acc")
    interval: Any = 1.0
    if val_every is not None:
        interval = min(val_every, steps_per_epoch)
    trainer = _trainer(
        [*callbacks, recorder], max_epochs=epochs, limit_train_batches=limit_train_batches,
        val_check_interval=interval, limit_val_batches=1.0 if validate else 0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    result = RunResult(curve=recorder.curve, diverged=recorder.diverged, steps=trainer.global_step,
                       seconds=time.perf_counter() - start)
    result.final = recorder.curve[-1][1] if recorder.curve else float("nan")
    if recorder.diverged:
        result.final = float("nan")
    result.extra["model"] = model
    result.extra["data"] = data
    return result


def train_transformer(
    norm: str,
    *,
    seed: int,
    steps: int,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    block_size: int = 64,
    batch_size: int = 32,
    lr: float = 3e-3,
    val_batches: int = 20,
    callbacks: Sequence[Callback] = (),
    task: str = "windows",
    mask_padding: bool = True,
    norm_options: dict[str, Any] | None = None,
) -> RunResult:
    """Train ``examples.transformer.CharTransformer(norm=norm)`` for ``steps`` steps; validation bits per character.

    ``task="padded"`` trains on the padded sequences, with batch statistics over real tokens only when
    ``mask_padding`` (else padding counted too); ``extra["padding"]`` is then the share of padded positions in the
    training batches.
    """
    L.seed_everything(seed, verbose=False)
    data = tf_example.PydocTextDataModule(block_size=block_size, batch_size=batch_size,
                                          samples_per_epoch=steps * batch_size, seed=seed, task=task)
    model = tf_example.CharTransformer(norm=norm, vocab_size=data.vocab_size, block_size=block_size, n_layer=n_layer,
                                       n_head=n_head, n_embd=n_embd, lr=lr, warmup_steps=max(1, steps // 10),
                                       mask_padding=mask_padding, norm_options=norm_options)
    recorder = CurveRecorder("val/bpc")
    trainer = _trainer([*callbacks, recorder], max_epochs=1, max_steps=steps, limit_val_batches=val_batches,
                       val_check_interval=max(1, steps // 4))
    start = time.perf_counter()
    trainer.fit(model, data)
    result = RunResult(curve=recorder.curve, diverged=recorder.diverged, steps=trainer.global_step,
                       seconds=time.perf_counter() - start)
    result.final = recorder.curve[-1][1] if recorder.curve and not recorder.diverged else float("nan")
    if task == "padded":
        masks = [batch["attention_mask"] for batch in data.train_dataloader()]
        result.extra["padding"] = 1.0 - float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)
    return result


def finite_mean(values: Sequence[float]) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return sum(ok) / len(ok) if ok else float("nan")
