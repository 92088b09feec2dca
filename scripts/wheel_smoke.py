"""Smoke test of the installed wheel, run by ``make test`` in a fresh virtual environment outside the repository.

    python scripts/wheel_smoke.py OUT_DIR

Trains a tiny conv net for a few steps on random data with ``NormSwap``, ``BatchNormRecalibration`` and
``LayerStatsMonitor`` and a TensorBoard logger, then reads the event files back. It fails when the package is
imported from anywhere but the environment's site-packages (so the repository cannot stand in for a missing
file), when a dependency is missing, or when the figures did not reach TensorBoard.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_bn
from lightning_bn.callbacks import BatchNormRecalibration, LayerStatsMonitor, NormSwap


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out_dir: str) -> None:
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(lightning_bn.__file__).resolve()
    if site not in where.parents:
        raise SystemExit(f"lightning_bn was imported from {where}, not from the installed wheel in {site}")
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    logger = TensorBoardLogger(out_dir, name="smoke")
    trainer = L.Trainer(
        max_steps=6, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[NormSwap(to="batch_renorm"), BatchNormRecalibration(), LayerStatsMonitor(log_every_n_steps=2)],
    )
    model = Tiny()
    trainer.fit(model, DataLoader(data, batch_size=16))
    kinds = {type(m).__name__ for m in model.modules()}
    if "BatchRenorm" not in kinds:
        raise SystemExit(f"NormSwap did not swap the batch norm: the model holds {sorted(kinds)}")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    wanted = {"act/std/net.0", "grad/norm/net.0.weight", "bn/mean_shift/net.1"}
    if not wanted <= tags:
        raise SystemExit(f"missing TensorBoard scalars {sorted(wanted - tags)}; written: {sorted(tags)[:20]} ...")
    print(f"wheel smoke passed: lightning_bn {lightning_bn.__version__} from {where.parent}, {len(tags)} scalars")


if __name__ == "__main__":
    main(sys.argv[1])
