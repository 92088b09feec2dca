"""Sharded training: every callback and the plugin under Lightning's ModelParallelStrategy (FSDP2 ``fully_shard``
in ``configure_model``, DTensor parameters), against the same run under DDP, in 2 real gloo processes on the CPU.

One ModelParallel run and one DDP run of the same seeds, model and data (in the same two processes) collect
everything the comparisons need: the monitor's figures and histograms at every step, the batch-norm running
statistics after training (synchronized by ``SyncNormPlugin``) and after recalibration, and the final weights.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import BatchNormRecalibration, LayerStatsMonitor, LossLandscapeProbe, NormSwap
from lightning_bn.moments import dtensor_norms, shard_copies, shard_sums_of_squares
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
    def __init__(self, sync_in_configure: bool = False, swap_in_configure: dict | None = None) -> None:
        super().__init__()
        self.net = _net()
        self.sync_in_configure, self.swap_in_configure = sync_in_configure, swap_in_configure

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or isinstance(self.net, FSDPModule):
            return  # idempotent: Lightning (and NormSwap) may call it again
        if self.swap_in_configure:
            from lightning_bn import swap_norms

            swap_norms(self.net, **self.swap_in_configure)
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
    recal = BatchNormRecalibration(when="fit_end")

    class Watch(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen["trained_bn"] = _bn_buffers(pl_module.net)  # before the recalibration at fit end
            seen["dtensor_params"] = sum(shard_copies(p) is not None for p in pl_module.parameters())
            seen["batches"] = [x.clone() for x, _ in trainer.train_dataloader]  # this process's, as recalibrated

    plugins = [SyncNormPlugin()] if sync_plugin and not isinstance(strategy, ModelParallelStrategy) else []
    trainer = _trainer(strategy, [monitor, Watch(), recal], plugins)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    histograms = {t: (e.tolist(), c.tolist()) for t, (e, c) in monitor.last_stats.histograms.items()}
    return {
        "history": monitor.history,
        "histograms": histograms,
        "steps": monitor.collected_steps,
        "warnings": [str(w.message) for w in caught if "not synchronized" in str(w.message)],
        "recalibrated": _bn_buffers(model.net),
        "weights": {n: _full(p.detach()).clone() for n, p in model.net.named_parameters()},
        **seen,
    }


class BuildsNormInConfigure(Net):
    """A configure_model that builds a norm and shards it: nothing can swap it afterwards."""

    def configure_model(self) -> None:
        if not hasattr(self, "head"):
            self.head = nn.BatchNorm1d(3)
            fully_shard(self.head, mesh=self.device_mesh["data_parallel"])
        super().configure_model()


def _swap_once(strategy: object, model: Net, callbacks: list) -> dict:
    trainer = _trainer(strategy, callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return {
        "warnings": [str(w.message) for w in caught if "not synchronized" in str(w.message)],
        "classes": {n: type(m).__name__ for n, m in model.net.named_children()},
        "sharded": [n for n, p in model.net.named_parameters() if shard_copies(p) is not None],
        "weights": {n: _full(p.detach()).clone() for n, p in model.net.named_parameters()},
        "unsynced_bn": _bn_buffers(model.net),  # net.5 stays a plain batch norm, synchronized by nothing
    }


def _error(fn: object) -> str:
    try:
        fn()  # type: ignore[operator]
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "no error"


def _refusals() -> dict:
    out = {}
    L.seed_everything(0)
    swap = NormSwap(to="group", num_groups=1, verbose=False)
    out["norm_swap"] = _error(lambda: _trainer(_model_parallel(), [swap]).fit(BuildsNormInConfigure()))
    monitor = LayerStatsMonitor(log_every_n_steps=1)
    two_d = ModelParallelStrategy()  # data_parallel=1 x tensor_parallel=2 on one node
    out["monitor_2d"] = _error(lambda: _trainer(two_d, [monitor]).fit(Net()))
    probe = LossLandscapeProbe(every_n_steps=1)
    out["probe"] = _error(lambda: _trainer(_model_parallel(), [probe]).fit(Net()))
    # SyncNormPlugin.apply after fully_shard: refused, and the model is left as it was
    from torch.distributed.device_mesh import init_device_mesh

    net = _net()
    fully_shard(net, mesh=init_device_mesh("cpu", (WORLD,)))
    before = [type(m) for m in net.modules()]
    out["plugin_after_shard"] = _error(lambda: SyncNormPlugin().apply(net))
    out["plugin_left_model"] = [type(m) for m in net.modules()] == before
    return out


def _dtensor_norms(rank: int) -> dict:
    """Known tensors, distributed over 1-D and 2-D meshes, against the norms of the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    mesh_2d = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
    g = torch.Generator().manual_seed(3)
    cases = [  # (full tensor, mesh, placements): uneven first dimensions, a shard left empty, replicas
        (torch.randn(5, 3, generator=g), mesh, [Shard(0)]),
        (torch.randn(1, 4, generator=g), mesh, [Shard(0)]),  # rank 1's shard is empty
        (torch.randn(7, generator=g), mesh, [Shard(0)]),
        (torch.randn(3, 5, generator=g), mesh, [Shard(1)]),
        (torch.randn(4, 2, generator=g), mesh, [Replicate()]),  # every process holds it all: counted once
        (torch.randn(5, 2, generator=g), mesh_2d, [Shard(0), Replicate()]),
        (torch.randn(3, 3, generator=g), mesh_2d, [Replicate(), Replicate()]),
    ]
    tensors = [distribute_tensor(full, m, placements) for full, m, placements in cases]
    partial = torch.distributed.tensor.DTensor.from_local(torch.ones(2), mesh, [Partial()])
    return {
        "full": torch.stack([full.double().norm() for full, _, _ in cases]),
        "reduced": dtensor_norms(tensors),
        "local": torch.stack([t.to_local().double().norm() for t in tensors]),
        "local_sizes": [t.to_local().numel() for t in tensors],
        "shares": torch.stack(shard_sums_of_squares(tensors)),
        "partial": _error(lambda: dtensor_norms([partial])),
        "plain": _error(lambda: dtensor_norms([torch.ones(3)])),
    }


def _collector_on_shards(rank: int) -> dict:
    """The collector alone (no Trainer) on a net sharded with fully_shard: figures of the full tensors, and a
    reduction over a group that is not the parameters' mesh refused."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_bn.stats import LayerStatsCollector

    net = _net()
    full = {n: p.detach().clone() for n, p in net.named_parameters()}
    fully_shard(net, mesh=init_device_mesh("cpu", (WORLD,)))
    collector = LayerStatsCollector(list(net.named_children()))
    collector.attach(histograms=True)
    x = _data().tensors[0][rank * BATCH : (rank + 1) * BATCH]
    net(x).square().mean().backward()
    collector.detach()
    collector.record_params()
    stats = collector.finalize()
    groups = [torch.distributed.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    return {
        "norms": {n: stats.scalars[f"param/norm/{n}"] for n in full},
        "full": {n: float(w.norm()) for n, w in full.items()},
        "hist_counts": {n: float(stats.histograms[f"param/hist/{n}"][1].sum()) for n in full},
        "numel": {n: w.numel() for n, w in full.items()},
        "own_group": _error(lambda: collector.finalize(groups[rank])),
    }


def _runs(rank: int, world_size: int) -> dict:
    out = {"fsdp": _fit_once(_model_parallel(), sync_plugin=True)}
    out["ddp"] = _fit_once("ddp", sync_plugin=True)
    swap = {"to": "group", "num_groups": 1, "include": "net.1", "verbose": False}
    L.seed_everything(0)
    monitor = LayerStatsMonitor(log_every_n_steps=100, heatmap_every_n_logs=None)
    out["swap_fsdp"] = _swap_once(_model_parallel(), Net(), [NormSwap(**swap), monitor])
    L.seed_everything(0)
    monitor = LayerStatsMonitor(log_every_n_steps=100, heatmap_every_n_logs=None)
    out["swap_ddp"] = _swap_once("ddp", Net(), [NormSwap(**swap), monitor])
    L.seed_everything(0)
    in_configure = {"to": "group", "num_groups": 1, "include": "1"}
    out["swap_in_configure"] = _swap_once(_model_parallel(), Net(swap_in_configure=in_configure), [])
    out["refused"] = _refusals()
    out["norms"] = _dtensor_norms(rank)
    out["collector"] = _collector_on_shards(rank)
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
        w = w.detach()
        assert _close(scalars[f"param/norm/net.{name}"], float(w.norm())), name
        shard = w[: math.ceil(w.shape[0] / WORLD)]  # rank 0's shard (fully_shard splits dim 0)
        if w.norm() > 0:  # (a zero bias has zero norm in every shard)
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


def test_norm_swap_under_model_parallel_swaps_before_sharding(runs: list[dict]) -> None:
    """NormSwap swaps the layers built in __init__ before configure_model shards them; the same as swap_norms in
    configure_model before fully_shard, and as NormSwap under DDP (same weights after training)."""
    fsdp, in_configure, ddp = (runs[0][k] for k in ("swap_fsdp", "swap_in_configure", "swap_ddp"))
    for run in (fsdp, in_configure, ddp):
        assert run["classes"]["1"] == "GroupNorm" and run["classes"]["5"] == "BatchNorm1d"
    assert "1.weight" in fsdp["sharded"] and "1.weight" in in_configure["sharded"] and not ddp["sharded"]
    for name, w in ddp["weights"].items():
        torch.testing.assert_close(fsdp["weights"][name], w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(in_configure["weights"][name], w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(runs[1]["swap_fsdp"]["weights"][name], fsdp["weights"][name], rtol=0, atol=0)
    # the monitor says that nothing synchronizes net.5 under ModelParallelStrategy (not under DDP, where a plugin
    # would have been called); in the monitor runs, whose batch norms are synchronized, it says nothing
    assert len(fsdp["warnings"]) == 1 and "net.5" in fsdp["warnings"][0] and "net.1" not in fsdp["warnings"][0]
    assert "SyncNormPlugin().apply" in fsdp["warnings"][0]
    assert not runs[1]["swap_fsdp"]["warnings"]  # rank zero writes it
    assert not ddp["warnings"] and not runs[0]["fsdp"]["warnings"]
    # negative control for the plugin test: a batch norm nothing synchronizes differs between the ranks
    assert not torch.equal(fsdp["unsynced_bn"]["5.running_mean"], runs[1]["swap_fsdp"]["unsynced_bn"]["5.running_mean"])


def test_refusals_name_the_strategy_and_what_to_do(runs: list[dict]) -> None:
    for refused in (runs[0]["refused"], runs[1]["refused"]):
        assert refused["norm_swap"].startswith("ValueError") and "head" in refused["norm_swap"]
        assert "before fully_shard" in refused["norm_swap"]
        assert refused["monitor_2d"].startswith("ValueError")
        assert "data_parallel=1 x tensor_parallel=2" in refused["monitor_2d"]
        assert refused["probe"].startswith("ValueError") and "ModelParallelStrategy" in refused["probe"]
        assert refused["plugin_after_shard"].startswith("ValueError")
        assert "before fully_shard" in refused["plugin_after_shard"]
        assert refused["plugin_left_model"]


def test_dtensor_norms_of_known_shards(runs: list[dict]) -> None:
    first, second = runs[0]["norms"], runs[1]["norms"]
    torch.testing.assert_close(first["reduced"], first["full"], rtol=1e-12, atol=0)
    torch.testing.assert_close(second["reduced"], first["full"], rtol=1e-12, atol=0)
    torch.testing.assert_close(first["shares"] + second["shares"], first["full"] ** 2, rtol=1e-12, atol=0)
    assert first["local_sizes"][1] == 4 and second["local_sizes"][1] == 0  # an empty shard
    assert first["local_sizes"][0] == 9 and second["local_sizes"][0] == 6  # uneven: 3 + 2 rows of 3
    # negative controls: a shard's own norm (the per-shard figure) is not the norm, sharded or replicated
    sharded = [0, 2, 3, 5]
    assert not torch.allclose(first["local"][sharded], first["full"][sharded], rtol=1e-3)
    replicated = [4, 6]  # the local norm of a replica is the full norm, and must be counted once, not twice
    torch.testing.assert_close(first["local"][replicated], first["full"][replicated])
    assert "Partial" in first["partial"] and first["partial"].startswith("ValueError")
    assert first["plain"].startswith("TypeError") and "tensors[0]" in first["plain"]


def test_collector_on_sharded_parameters(runs: list[dict]) -> None:
    for run in runs:
        got = run["collector"]
        for name, norm in got["full"].items():
            assert _close(got["norms"][name], norm), name
            assert got["hist_counts"][name] == got["numel"][name]  # every element of the full tensor binned once
        assert got["own_group"].startswith("ValueError") and "mesh of 2 processes" in got["own_group"]
        assert "group of 1" in got["own_group"]


def test_recalibration_exact_and_identical(runs: list[dict]) -> None:
    """Identical on both ranks, equal to DDP's, and equal to recalibrate_bn in one process on every process's
    batches (a batch norm downstream of another sees inputs normalized with each batch's own statistics)."""
    from lightning_bn.recalibrate import recalibrate_bn

    fsdp = runs[0]["fsdp"]
    for name, value in fsdp["recalibrated"].items():
        torch.testing.assert_close(value, runs[1]["fsdp"]["recalibrated"][name], rtol=0, atol=0)
        torch.testing.assert_close(value, runs[0]["ddp"]["recalibrated"][name], rtol=1e-5, atol=1e-6)
    net = _net()
    state = net.state_dict()
    state.update(fsdp["weights"])
    net.load_state_dict(state)
    recalibrate_bn(net, [b for run in runs for b in run["fsdp"]["batches"]])
    for name, value in _bn_buffers(net).items():
        torch.testing.assert_close(fsdp["recalibrated"][name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fsdp["trained_bn"]["1.running_var"], fsdp["recalibrated"]["1.running_var"])
