"""Sharded training: every callback and the plugin under Lightning's ModelParallelStrategy (FSDP2 ``fully_shard``
in ``configure_model``, DTensor parameters), against the same run under DDP, in 2 real gloo processes on the CPU.

One ModelParallel run and one DDP run of the same seeds, model and data (in the same two processes) collect
everything the comparisons need: the monitor's figures and histograms at every step, the batch-norm running
statistics after training (synchronized by ``SyncNormPlugin``) and after recalibration, and the final weights.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import LayerStatsMonitor
from lightning_bn.moments import shard_copies
from lightning_bn.plugins import SyncNormPlugin
from tests.dist import run_distributed

STEPS, BATCH, WORLD = 3, 4, 2


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * BATCH * WORLD, 3, 6, 6, generator=g) * 2 + 0.5
    return TensorDataset(x, torch.randint(0, 3, (len(x),), generator=g))


def _net() -> nn.Sequential:
    # Linear(96, 5) and Linear(5, 3): first dimensions that do not divide by 2 processes (uneven shards).
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(96, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


class Net(L.LightningModule):
    def __init__(self, sync_in_configure: bool = False, swap_in_configure: str | None = None) -> None:
        super().__init__()
        self.net = _net()
        self.sync_in_configure, self.swap_in_configure = sync_in_configure, swap_in_configure

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or isinstance(self.net, FSDPModule):
            return  # idempotent: Lightning (and NormSwap) may call it again
        if self.swap_in_configure:
            from lightning_bn import swap_norms

            swap_norms(self.net, self.swap_in_configure)
        if self.sync_in_configure:
            SyncNormPlugin().apply(self.net)
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(), batch_size=BATCH, shuffle=False)


def _trainer(strategy: object, callbacks: list, plugins: list | None = None) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        num_nodes=1,
        strategy=strategy,
        plugins=plugins,
        callbacks=callbacks,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def _model_parallel() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if shard_copies(t) is not None else t  # type: ignore[attr-defined]


def _bn_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in net.named_buffers() if "running" in n}


def _fit_once(strategy: object, sync_plugin: bool) -> dict:
    L.seed_everything(0)
    model = Net(sync_in_configure=sync_plugin and isinstance(strategy, ModelParallelStrategy))
    monitor = LayerStatsMonitor(log_every_n_steps=1, histogram_every_n_steps=2, heatmap_every_n_logs=None)
    seen: dict = {}

    class Watch(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["trained_bn"] = _bn_buffers(pl_module.net)  # before the recalibration at fit end
            seen["dtensor_params"] = sum(shard_copies(p) is not None for p in pl_module.parameters())

    plugins = [SyncNormPlugin()] if sync_plugin and not isinstance(strategy, ModelParallelStrategy) else []
    trainer = _trainer(strategy, [monitor, Watch()], plugins)
    trainer.fit(model)
    histograms = {t: (e.tolist(), c.tolist()) for t, (e, c) in monitor.last_stats.histograms.items()}
    return {
        "history": monitor.history,
        "histograms": histograms,
        "steps": monitor.collected_steps,
        "recalibrated": _bn_buffers(model.net),
        "weights": {n: _full(p.detach()).clone() for n, p in model.net.named_parameters()},
        **seen,
    }


def _runs(rank: int, world_size: int) -> dict:
    out = {"fsdp": _fit_once(_model_parallel(), sync_plugin=True)}
    out["ddp"] = _fit_once("ddp", sync_plugin=True)
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(_runs, WORLD, timeout=300, init_process_group=False)


def _close(a: float, b: float, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def test_monitor_under_fsdp2_equals_ddp(runs: list[dict]) -> None:
    fsdp, ddp = runs[0]["fsdp"], runs[0]["ddp"]
    assert fsdp["dtensor_params"] == len(list(_net().parameters())) and ddp["dtensor_params"] == 0
    assert fsdp["steps"] == ddp["steps"] == list(range(STEPS))
    for (step_f, scalars_f), (step_d, scalars_d) in zip(fsdp["history"], ddp["history"]):
        assert step_f == step_d
        assert sorted(scalars_f) == sorted(scalars_d)
        for area in (
            "param/norm/",
            "grad/norm/",
            "grad/ratio/",
            "update/ratio/",
            "act/std/",
            "act_grad/rms/",
            "bn/mean_shift/",
            "bn/frac_small_gamma/",
        ):
            assert any(k.startswith(area) for k in scalars_f), area
        bad = {k: (scalars_f[k], scalars_d[k]) for k in scalars_f if not _close(scalars_f[k], scalars_d[k])}
        assert not bad, f"step {step_f}: {bad}"
    assert sorted(fsdp["histograms"]) == sorted(ddp["histograms"])
    assert any(t.startswith("param/hist/") for t in fsdp["histograms"])
    assert any(t.startswith("grad/hist/") for t in fsdp["histograms"])
    for tag, (edges, counts) in fsdp["histograms"].items():
        edges_d, counts_d = ddp["histograms"][tag]
        assert counts == counts_d, tag
        assert all(_close(a, b) for a, b in zip(edges, edges_d)), tag


def test_param_figures_are_of_full_tensors(runs: list[dict]) -> None:
    """Step 0 records the initial weights: their norms are those of the full tensors, not of a shard."""
    scalars = runs[0]["fsdp"]["history"][0][1]
    uneven = 0
    for name, w in _net().named_parameters():
        assert _close(scalars[f"param/norm/net.{name}"], float(w.norm())), name
        shard = w.detach()[: math.ceil(w.shape[0] / WORLD)]  # rank 0's shard (fully_shard splits dim 0)
        assert not _close(float(shard.norm()), float(w.norm()), rel=1e-3)  # what a per-shard figure would say
        uneven += w.shape[0] % WORLD
    assert uneven > 0  # some first dimension does not divide by the processes


def test_ranks_identical(runs: list[dict]) -> None:
    for kind in ("fsdp", "ddp"):
        assert runs[0][kind]["history"] == runs[1][kind]["history"]
        assert runs[0][kind]["histograms"] == runs[1][kind]["histograms"]


def test_sync_plugin_in_configure_model_synchronizes(runs: list[dict]) -> None:
    """``SyncNormPlugin().apply`` in configure_model before fully_shard: running statistics identical on both ranks
    (FSDP2 does not shard buffers) and equal to DDP's with the plugin."""
    for name, value in runs[0]["fsdp"]["trained_bn"].items():
        torch.testing.assert_close(value, runs[1]["fsdp"]["trained_bn"][name], rtol=0, atol=0)
        torch.testing.assert_close(value, runs[0]["ddp"]["trained_bn"][name], rtol=1e-5, atol=1e-6)
