"""LayerStatsMonitor in real Trainer runs: logging steps only, cleanup, DDP exactness, accumulation, AMP, validation."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import LayerStatsMonitor
from lightning_bn.callbacks.layer_stats_monitor import heatmap_matrix, metric_charts
from tests.dist import run_distributed

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


class Pair(nn.Module):
    """A module with a tuple output."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, -0.5 * x


class Tiny(L.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.pair = Pair()
        self.head = nn.Linear(4, 1)
        self.fail_at = fail_at
        self.hooks_seen: list[tuple[int, int]] = []  # (global_step, module hooks on the model) per training batch
        self.grad_norms: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(self.net(x).mean((2, 3)))
        return self.head(a + b)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        self.hooks_seen.append((self.global_step, _hooks(self)))
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("failing on purpose")
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x).squeeze(-1), y))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grad_norms.append(self.head.weight.grad.norm().item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _data(n: int = 16, dtype: torch.dtype = torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 2, 4, 4, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype))


def _loader(ds: TensorDataset, batch_size: int = 4) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def _trainer(monitor: LayerStatsMonitor, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(accelerator="cpu", devices=1, callbacks=[monitor], **QUIET, **kwargs)


# ------------------------------------------------------------------------------------------------ arguments
def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"`log_every_n_steps` must be a positive int or None, got 0"):
        LayerStatsMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match=r"`histogram_every_n_steps` must be a positive int or None, got 1.5"):
        LayerStatsMonitor(histogram_every_n_steps=1.5)
    with pytest.raises(ValueError, match=r"`heatmap_stats` takes statistics among act/mean.*got 'act/foo'"):
        LayerStatsMonitor(heatmap_stats=["act/foo"])
    with pytest.raises(TypeError, match=r"`include` takes nn.Module classes and module-name globs"):
        LayerStatsMonitor(include=[42])
    with pytest.raises(ValueError, match=r"`gamma_tol` must be >= 0, got -0.1"):
        LayerStatsMonitor(gamma_tol=-0.1)
    with pytest.raises(ValueError, match=r"`grad_ratio` must be > 1, got 0.5"):
        LayerStatsMonitor(alert_thresholds={"grad_ratio": 0.5})


def test_pure_helpers() -> None:
    assert LayerStatsMonitor.should_collect(6, 3, None) == (True, False)
    assert LayerStatsMonitor.should_collect(4, 3, 4) == (True, True)
    assert LayerStatsMonitor.should_collect(5, 3, 4) == (False, False)
    charts = metric_charts(("", "val_"))
    assert charts["act/std"] == ["^act/std/.*"] and charts["val_bn/mean_shift"] == ["^val_bn/mean_shift/.*"]
    history = [(0, {"act/std/a": 1.0, "act/std/b": 2.0}), (5, {"act/std/b": 3.0, "act/std/z": 4.0})]
    values, layers, steps = heatmap_matrix(history, "act/std", ["b", "a"])
    assert layers == ["b", "a", "z"] and steps == [0, 5]
    np.testing.assert_array_equal(values, [[2.0, 3.0], [1.0, np.nan], [np.nan, 4.0]])


# ------------------------------------------------------------------------------------------------ hooks
def test_hooks_only_on_logging_steps_and_none_after_fit(tmp_path: Path) -> None:
    model = Tiny()
    before = _hooks(model)
    monitor = LayerStatsMonitor(log_every_n_steps=3)
    trainer = _trainer(monitor, max_steps=7, logger=CSVLogger(tmp_path), limit_val_batches=1, val_check_interval=4)
    trainer.fit(model, _loader(_data(32)), _loader(_data(8)))
    assert _hooks(model) == before
    assert monitor.collected_steps == [0, 3, 6]
    with_hooks = [step for step, n in model.hooks_seen if n > before]
    assert with_hooks == [0, 3, 6] and len(model.hooks_seen) == 7
    assert monitor.hook_calls == 3 * 3  # conv, batch norm, head: one forward each on three steps; none in validation
    assert not any(k.startswith("val_") for k in monitor.last_metrics)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = sorted({int(r["step"]) for r in rows if r.get("act/std/net.1")})
    assert logged == [0, 3, 6]
    row = next(r for r in rows if r.get("act/std/net.1") and int(r["step"]) == 6)
    for key in ("act/std/net.1", "act_in/rms/net.1", "act_grad/rms/head", "grad/norm/head.weight",
                "update/ratio/net.0.weight", "bn/mean_shift/net.1", "bn/frac_small_gamma/net.1", "alerts/dead"):
        assert float(row[key]) == pytest.approx(monitor.last_metrics[key], rel=1e-6), key


def test_hooks_removed_when_an_exception_passes() -> None:
    model = Tiny(fail_at=2)
    before = _hooks(model)
    monitor = LayerStatsMonitor(log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        _trainer(monitor, max_steps=5).fit(model, _loader(_data()))
    assert model.hooks_seen[-1] == (2, before + 3)  # the failing step had the hooks (conv, batch norm, head)
    assert _hooks(model) == before
    assert monitor.collected_steps == [0, 1]


def test_accumulation_collects_per_optimizer_step() -> None:
    model = Tiny()
    monitor = LayerStatsMonitor(log_every_n_steps=2)
    _trainer(monitor, max_steps=4, accumulate_grad_batches=2).fit(model, _loader(_data(32)))
    assert monitor.collected_steps == [0, 2]
    assert [s for s, n in model.hooks_seen if n > 0] == [0, 0, 2, 2]  # both micro-batches of steps 0 and 2
    assert monitor.hook_calls == 2 * 2 * 3


# ------------------------------------------------------------------------------------------------ DDP
def _reorder_for_ranks(ds: TensorDataset, world: int, batch: int) -> TensorDataset:
    """The batches ranks 0, 1, ... get from indices ``r, r + world, ...``, one after another (micro-batches)."""
    n = len(ds)
    per_rank = [list(range(r, n, world)) for r in range(world)]
    order = [i for start in range(0, n // world, batch) for r in range(world) for i in per_rank[r][start:start + batch]]
    return TensorDataset(*(t[order] for t in ds.tensors))


def _ddp_monitor() -> LayerStatsMonitor:
    include = [Pair, nn.Conv2d, nn.BatchNorm2d, nn.Linear]  # Pair: a module with a tuple output
    return LayerStatsMonitor(log_every_n_steps=1, include=include, histogram_every_n_steps=1, heatmap_every_n_logs=None)


def _fit_ddp(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    model = Tiny()
    monitor = _ddp_monitor()
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", precision="64-true", max_steps=1,
                        callbacks=[monitor], logger=False, use_distributed_sampler=False, **QUIET)
    ds = _data(16, torch.float64)
    trainer.fit(model, _loader(TensorDataset(*(t[rank::world_size] for t in ds.tensors))))  # rank r: r, r + 2, ...
    return {"metrics": monitor.last_metrics, "hist": monitor.last_stats.histograms, "hooks": _hooks(model)}


def test_two_processes_equal_one_process_with_two_micro_batches() -> None:
    ranks = run_distributed(_fit_ddp, 2, init_process_group=False, timeout=180)
    model = Tiny()
    monitor = _ddp_monitor()
    _trainer(monitor, precision="64-true", max_steps=1, accumulate_grad_batches=2).fit(
        model, _loader(_reorder_for_ranks(_data(16, torch.float64), 2, 4))
    )
    ref = monitor.last_metrics
    assert {"act/std/pair", "act/mean/net.1", "act_grad/rms/net.0", "bn/var_shift/net.1"} <= ref.keys()
    for r in ranks:
        assert r["hooks"] == 0
        got = r["metrics"]
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            if key == "bn/running_spread/net.1":
                assert value == 0.0 and got[key] > 1e-3  # two processes' batches moved their running means apart
            else:
                assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-13), key
        for tag, (edges, counts) in monitor.last_stats.histograms.items():
            np.testing.assert_array_equal(r["hist"][tag][1], counts)
            np.testing.assert_allclose(r["hist"][tag][0], edges, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ precision
def _one_step(plugins: list | None = None, precision: str | None = None) -> tuple[dict[str, float], Tiny]:
    model = Tiny()
    monitor = LayerStatsMonitor(log_every_n_steps=1)
    kwargs = {"plugins": plugins} if plugins else {"precision": precision or "32-true"}
    _trainer(monitor, max_steps=1, **kwargs).fit(model, _loader(_data()))
    return monitor.last_metrics, model


def test_mixed_precision_figures_are_unscaled() -> None:
    full, _ = _one_step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fp16, fp16_model = _one_step(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    bf16, bf16_model = _one_step(precision="bf16-mixed")
    for got, model, tol in ((fp16, fp16_model, 5e-3), (bf16, bf16_model, 5e-2)):
        assert got["grad/norm/head.weight"] == pytest.approx(model.grad_norms[0], rel=1e-6)
        for key in ("act_grad/rms/head", "act_grad/rms/net.0", "grad/norm/net.0.weight", "act/std/net.0"):
            assert got[key] == pytest.approx(full[key], rel=tol), key  # the loss scale (1024) is divided out
        assert all(np.isfinite(v) for v in got.values())


# ------------------------------------------------------------------------------------------------ validation
def test_validation_only_collects_all_validation_batches() -> None:
    model = Tiny()
    with torch.no_grad():
        model.net[1].running_mean.fill_(0.2)
    monitor = LayerStatsMonitor(log_validation=True)
    ds = _data(12)
    L.Trainer(accelerator="cpu", callbacks=[monitor], logger=False, **QUIET).validate(model, _loader(ds, 5))
    assert _hooks(model) == 0
    m = monitor.last_metrics
    assert m and all(k.startswith("val_") for k in m)
    assert not any(k.startswith(("val_act_grad/", "val_grad/", "val_param/", "val_update/")) for k in m)
    x = ds.tensors[0]
    model.eval()
    with torch.no_grad():
        conv_out = model.net[0](x)
        out = model(x)
    # float32 sums: the std comes from E[x^2] - E[x]^2, whose rounding grows with (mean / std)^2
    assert m["val_act/mean/head"] == pytest.approx(out.mean().item(), rel=1e-5)
    assert m["val_act/std/head"] == pytest.approx(out.std(unbiased=False).item(), rel=1e-3)
    bn = model.net[1]
    mu = conv_out.mean((0, 2, 3))
    expected = ((mu - bn.running_mean).abs() / (bn.running_var + bn.eps).sqrt()).mean().item()
    assert m["val_bn/mean_shift/net.1"] == pytest.approx(expected, rel=1e-5)
    assert monitor.collected_steps == [0] and monitor.hook_calls == 3 * 3  # three batches


# ------------------------------------------------------------------------------------------------ alerts
def test_dead_layer_alert_warns_once_and_counts() -> None:
    model = Tiny()
    with torch.no_grad():
        model.net[1].bias.fill_(-50.0)  # every ReLU output is zero
    monitor = LayerStatsMonitor(log_every_n_steps=1, include=[nn.ReLU, nn.Linear])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(monitor, max_steps=3).fit(model, _loader(_data()))
    dead = [w for w in caught if "alerts/dead" in str(w.message)]
    assert len(dead) == 1 and "net.2" in str(dead[0].message)
    assert monitor.alert_counts["dead"] == 3
    assert monitor.last_metrics["alerts/dead"] == 1.0 and monitor.last_metrics["act/frac_zero/net.2"] == 1.0
    state = monitor.state_dict()
    fresh = LayerStatsMonitor()
    fresh.load_state_dict(state)
    assert fresh.alert_counts["dead"] == 3 and fresh.state_dict() == state


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_histograms_heatmaps_and_layout_reach_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = LayerStatsMonitor(log_every_n_steps=1, histogram_every_n_steps=2, heatmap_every_n_logs=3)
    _trainer(monitor, max_steps=3, logger=TensorBoardLogger(tmp_path, name="tb")).fit(Tiny(), _loader(_data()))
    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent), size_guidance={"histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"act/std/net.1", "act_grad/rms/head", "bn/mean_shift/net.1", "alerts/nonfinite"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("act/std/net.1")] == [0, 1, 2]
    assert {"act/hist/net.0", "param/hist/net.0.weight", "grad/hist/head.weight"} <= set(tags["histograms"])
    assert [e.step for e in acc.Histograms("act/hist/net.0")] == [0, 2]
    hist = acc.Histograms("act/hist/net.0")[0].histogram_value
    assert hist.num == 4 * 4 * 4 * 4  # one batch: 4 samples, 4 channels of 4x4
    assert any("heatmap/act/std" in t for t in tags["images"])
