"""A small ResNet on the handwritten digits that scikit-learn ships (1797 images of 8x8 pixels, offline).

    python -m examples.cnn fit --config examples/configs/cnn.yaml
    python -m examples.cnn fit --model.norm group --trainer.max_epochs 5

The normalization layer is a hyperparameter: any kind in ``lightning_bn.available_norms()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.layers import build_norm


@dataclass
class CNNConfig:
    norm: str = "batch"  # any registered kind: batch, group, layer, instance, rms, batch_renorm, ghost_batch, none ...
    width: int = 32  # channels of the first stage; the second stage has twice as many at half the resolution
    num_classes: int = 10


class ResidualBlock(nn.Module):
    """conv-norm-ReLU, conv-norm, plus the shortcut, ReLU: the basic block of He et al. (2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"  # without a norm layer the convolutions need their own bias
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.bn1 = build_norm(norm, out_channels, dims=2)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.bn2 = build_norm(norm, out_channels, dims=2)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias), build_norm(norm, out_channels, dims=2)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetDigits(nn.Module):
    """stem (8x8) -> block (8x8) -> block (4x4) -> global average pool -> linear."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        w, bias = cfg.width, cfg.norm == "none"
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=bias), build_norm(cfg.norm, w, dims=2), nn.ReLU())
        self.layer1 = ResidualBlock(w, w, 1, cfg.norm)
        self.layer2 = ResidualBlock(w, 2 * w, 2, cfg.norm)
        self.fc = nn.Linear(2 * w, cfg.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))  # (B, 2w, 4, 4)
        return self.fc(x.mean(dim=(2, 3)))  # (B, classes)


class CNN(L.LightningModule):
    """The digits classifier as a LightningModule.

    Args:
        norm: the normalization kind in every block (see ``lightning_bn.available_norms()``).
        width: channels of the first stage.
        lr: SGD learning rate (momentum 0.9, cosine decay over the trainer's max epochs when set).
        weight_decay: SGD weight decay.
    """

    def __init__(self, norm: str = "batch", width: int = 32, lr: float = 0.05, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ResNetDigits(CNNConfig(norm=norm, width=width))
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )
        epochs = self.trainer.max_epochs if self.trainer is not None and self.trainer.max_epochs else 0
        if epochs <= 0:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits with a fixed train/validation split (the same split for every seed of training).

    Args:
        batch_size: samples per batch (per process under DDP).
        val_fraction: share of the 1797 images held out for validation.
        seed: seed of the split.
        num_workers: DataLoader workers.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed, self.num_workers = batch_size, val_fraction, seed, num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(len(x) * self.val_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def main(args: list[str] | None = None, run: bool = True):  # type: ignore[no-untyped-def]
    """``python -m examples.cnn fit --config examples/configs/cnn.yaml``; returns the ``LightningCLI``."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(CNN, DigitsDataModule, save_config_kwargs={"overwrite": True}, args=args, run=run)


if __name__ == "__main__":
    main()
