"""Sizes of the study: ``full`` (the committed report), ``quick`` (CI, about a minute) and ``smoke`` (the test)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SIZES", "StudyConfig"]


@dataclass(frozen=True)
class StudyConfig:
    name: str
    seeds: int
    width: int  # CNN channels of the first stage
    limit_train_batches: int | None  # cap on steps per epoch (smoke only)
    # part 1: learning rate and speed
    lr_norms: tuple[str, ...]
    lrs: tuple[float, ...]
    lr_epochs: int
    lr_val_every: int
    target_acc: float
    # part 2: batch size at matched epochs (lr scaled linearly with the batch, from lr 0.05 at batch 32)
    bs_norms: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    bs_epochs: int
    ghost_virtual: int
    # part 3: moving average vs population statistics
    momenta: tuple[float, ...]
    ma_epochs: int
    ma_lr: float
    ma_batch: int
    # part 4: loss landscape
    land_norms: tuple[str, ...]
    land_lr: float
    land_epochs: int
    land_every: int
    land_step_sizes: tuple[float, ...]
    # part 5: transformer
    tf_norms: tuple[str, ...]
    tf_steps: int
    tf_layers: int
    tf_embd: int
    tf_val_batches: int
    tf_monitor_every: int
    # part 5, the padded task: (norm, whether the model runs under padding_mask) per row
    tf_padded: tuple[tuple[str, bool], ...] = (("layer", True), ("batch", False), ("batch", True), ("power", True))
    tf_padded_check_lr: float | None = 1e-2  # the same rows again at this learning rate (None: not run)


SIZES: dict[str, StudyConfig] = {
    "full": StudyConfig(
        name="full", seeds=2, width=16, limit_train_batches=None,
        lr_norms=("none", "batch", "group", "layer"), lrs=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0), lr_epochs=12,
        lr_val_every=10, target_acc=0.9,
        bs_norms=("batch", "group", "batch_renorm", "ghost_batch"), batch_sizes=(2, 4, 16, 64), bs_epochs=5,
        ghost_virtual=16,
        momenta=(0.003, 0.01, 0.03, 0.1, 0.3, 0.9), ma_epochs=8, ma_lr=0.1, ma_batch=32,
        land_norms=("none", "batch", "group", "layer"), land_lr=0.1, land_epochs=6, land_every=4,
        land_step_sizes=(0.05, 0.1, 0.2, 0.4),
        tf_norms=("layer", "rms", "batch"), tf_steps=600, tf_layers=2, tf_embd=64, tf_val_batches=20,
        tf_monitor_every=10,
    ),
    "quick": StudyConfig(
        name="quick", seeds=1, width=8, limit_train_batches=None,
        lr_norms=("none", "batch", "group", "layer"), lrs=(0.03, 0.3, 1.0, 3.0), lr_epochs=3, lr_val_every=5,
        target_acc=0.8,
        bs_norms=("batch", "group", "batch_renorm", "ghost_batch"), batch_sizes=(4, 16, 64), bs_epochs=1,
        ghost_virtual=16,
        momenta=(0.01, 0.1, 0.9), ma_epochs=3, ma_lr=0.1, ma_batch=32,
        land_norms=("none", "batch", "layer"), land_lr=0.1, land_epochs=2, land_every=6,
        land_step_sizes=(0.05, 0.1, 0.2, 0.4),
        tf_norms=("layer", "rms", "batch"), tf_steps=100, tf_layers=1, tf_embd=32, tf_val_batches=5,
        tf_monitor_every=10,
    ),
    "smoke": StudyConfig(
        name="smoke", seeds=1, width=4, limit_train_batches=4,
        lr_norms=("none", "batch"), lrs=(0.1, 1.0), lr_epochs=1, lr_val_every=2, target_acc=0.3,
        bs_norms=("batch", "group"), batch_sizes=(4, 16), bs_epochs=1, ghost_virtual=2,
        momenta=(0.1, 0.9), ma_epochs=2, ma_lr=0.1, ma_batch=32,
        land_norms=("none", "batch"), land_lr=0.05, land_epochs=1, land_every=2, land_step_sizes=(0.05, 0.2),
        tf_norms=("layer", "batch"), tf_steps=6, tf_layers=1, tf_embd=16, tf_val_batches=2, tf_monitor_every=2,
    ),
}
