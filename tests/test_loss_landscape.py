"""LossLandscapeProbe and measure_landscape: exact against a manual computation, everything restored, DDP exact."""

from __future__ import annotations

import copy
import csv
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import LayerStatsMonitor, LossLandscapeProbe
from lightning_bn.callbacks.loss_landscape import LandscapeMeasurement, measure_landscape
from lightning_bn.layers import BatchRenorm
from tests.dist import run_distributed

ETAS = (0.0, 0.05, 0.3, 1.0)


def tiny_model(norm: str = "batch") -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if norm == "renorm":  # its training forward reads the running statistics: they must be the same at every point
        layers.append(BatchRenorm(8, rmax=1.5, dmax=0.5, warmup_steps=0))
    else:
        layers.append(nn.BatchNorm1d(8) if norm == "batch" else nn.LayerNorm(8))
    layers += [nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def manual(model: nn.Module, x: torch.Tensor, y: torch.Tensor, etas, rng: torch.Tensor) -> LandscapeMeasurement:
    """The definition, written out: every evaluation with the same RNG state and the original buffers."""
    names = [n for n, p in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def loss_and_grad(params: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        torch.set_rng_state(rng)
        params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        state = {**params, **{n: b.clone() for n, b in buffers.items()}}
        loss = F.cross_entropy(functional_call(model, state, (x,)), y)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        return float(loss.detach()), list(grads)

    loss0, g = loss_and_grad(w)
    gnorm = torch.sqrt(sum((t**2).sum() for t in g)).item()
    losses, diffs = [], []
    for eta in etas:
        le, ge = loss_and_grad({n: w[n] - eta * gi for n, gi in zip(names, g)})
        losses.append(le)
        diffs.append(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g, ge))).item())
    torch.set_rng_state(rng)
    return LandscapeMeasurement(list(map(float, etas)), loss0, losses, gnorm, diffs)


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_same(a: dict, b: dict) -> None:
    for key in ("params", "buffers"):
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), f"{key} {n} changed"
    for n in a["grads"]:
        assert (a["grads"][n] is None) == (b["grads"][n] is None) and (
            a["grads"][n] is None or torch.equal(a["grads"][n], b["grads"][n])
        ), f"grad {n} changed"
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("norm", ["batch", "renorm"])
def test_measure_matches_manual_and_restores_everything(norm: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(norm)
    model.train()
    model[4].eval()  # a module in eval mode must stay so
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # the training's gradients must not be touched
    model[1].running_mean.normal_(0.0, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].num_batches_tracked.fill_(3)
    before = snapshot(model)
    expected = manual(model, x, y, ETAS, before["rng"])
    got = measure_landscape(lambda: F.cross_entropy(model(x), y), list(model.parameters()), ETAS, modules=model)
    assert_same(before, snapshot(model))
    assert got.loss == pytest.approx(expected.loss, rel=1e-12, abs=1e-14)
    assert got.losses == pytest.approx(expected.losses, rel=1e-12, abs=1e-14)
    assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-12)
    assert got.grad_diffs == pytest.approx(expected.grad_diffs, rel=1e-10, abs=1e-14)
    assert got.grad_diffs[0] == 0.0 and got.losses[0] == got.loss  # eta = 0 is w itself: same RNG, same buffers
    assert got.loss_range == pytest.approx(max(expected.losses) - min(expected.losses), rel=1e-12)
    assert got.grad_pred == pytest.approx(max(expected.grad_diffs), rel=1e-10)
    beta = max(d / (e * expected.grad_norm) for e, d in zip(ETAS[1:], expected.grad_diffs[1:]))
    assert got.beta_smooth == pytest.approx(beta, rel=1e-10)
    assert got.loss_range > 0 and got.grad_pred > 0  # the batch-norm net is not flat along g
    assert set(got.metrics()) == {
        "landscape/loss_range", "landscape/grad_pred", "landscape/beta_smooth", "landscape/grad_norm",
        "landscape/loss",
    }


def test_eval_mode_dropout_stays_off() -> None:
    torch.manual_seed(1)
    model = tiny_model()
    model[3].eval()  # dropout off: the landscape is then the same for any RNG state
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    a = measure_landscape(lambda: F.cross_entropy(model(x), y), model.parameters(), ETAS, modules=model)
    torch.manual_seed(123)
    b = measure_landscape(lambda: F.cross_entropy(model(x), y), model.parameters(), ETAS, modules=model)
    assert a.losses == b.losses and not model[3].training


def test_restored_when_an_exception_passes() -> None:
    torch.manual_seed(2)
    model = tiny_model()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    before = snapshot(model)
    calls = []

    def failing_loss() -> torch.Tensor:
        calls.append(1)
        model.eval()  # a loss function that even changes modes
        out = F.cross_entropy(model(x), y)
        if len(calls) == 3:  # parameters are at w - eta g when it fails
            raise RuntimeError("boom")
        return out

    with pytest.raises(RuntimeError, match="boom"):
        measure_landscape(failing_loss, list(model.parameters()), ETAS, modules=model)
    assert len(calls) == 3
    assert_same(before, snapshot(model))


def test_warns_when_placed_after_a_layer_stats_monitor() -> None:
    class MyMonitor(LayerStatsMonitor):  # a subclass is a monitor too
        pass

    module = SimpleNamespace(automatic_optimization=True)
    for monitor_cls in (LayerStatsMonitor, MyMonitor):
        probe, monitor = LossLandscapeProbe(), monitor_cls()
        with pytest.warns(UserWarning, match="comes after LayerStatsMonitor"):
            probe.setup(SimpleNamespace(callbacks=[monitor, probe]), module, "fit")  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            probe.setup(SimpleNamespace(callbacks=[probe, monitor]), module, "fit")  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive int, got 0"):
        LossLandscapeProbe(every_n_steps=0)
    with pytest.raises(ValueError, match="`step_sizes` .* got \\[\\]"):
        LossLandscapeProbe(step_sizes=[])
    with pytest.raises(ValueError, match="`step_sizes` .* got \\(0.1, -1.0\\)"):
        LossLandscapeProbe(step_sizes=(0.1, -1.0))
    with pytest.raises(ValueError, match="`step_sizes` .* got \\[0.0\\]"):
        LossLandscapeProbe(step_sizes=[0.0])
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        LossLandscapeProbe(loss_fn="mse")  # type: ignore[arg-type]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        measure_landscape(lambda: frozen(torch.ones(1, 2)).sum(), frozen.parameters(), [0.1])
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="scalar"):
        measure_landscape(lambda: lin(torch.ones(3, 2)), lin.parameters(), [0.1])
    assert LossLandscapeProbe.should_probe(0, 5, -1) and LossLandscapeProbe.should_probe(10, 5, 5)
    assert not LossLandscapeProbe.should_probe(10, 5, 10) and not LossLandscapeProbe.should_probe(3, 5, -1)


# ------------------------------------------------------------------------------------------------ in a Trainer


class TinyModule(L.LightningModule):
    def __init__(self, manual_opt: bool = False) -> None:
        super().__init__()
        self.net = tiny_model()
        self.automatic_optimization = not manual_opt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class GradRecorder(Callback):
    """The RNG state as each batch starts (put it before the probe) and the gradients the training computed."""

    def __init__(self) -> None:
        self.grads: dict[int, list[torch.Tensor]] = {}
        self.rng: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.rng[trainer.global_step] = torch.get_rng_state()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self.grads[trainer.global_step] = [p.grad.clone() for p in pl_module.parameters()]


def fit(tmp_path: Path, callbacks: list[Callback], name: str) -> tuple[TinyModule, L.Trainer]:
    L.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,)))
    model = TinyModule()
    trainer = L.Trainer(
        max_steps=5, logger=CSVLogger(tmp_path, name=name), callbacks=callbacks, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=False))
    return model, trainer


def test_probe_in_trainer_exact_logged_and_training_unchanged(tmp_path: Path) -> None:
    probe = LossLandscapeProbe(every_n_steps=2, step_sizes=(0.1, 0.5))
    relative = LossLandscapeProbe(every_n_steps=4, step_sizes=(2.0,), relative_to_lr=True)
    grads = GradRecorder()
    probed, trainer = fit(tmp_path, [grads, probe, relative], "probed")
    plain, plain_trainer = fit(tmp_path, [GradRecorder()], "plain")

    # Training is bitwise the same with and without the probe: weights, running statistics, RNG use, logged loss.
    for (n, a), b in zip(probed.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(trainer.callback_metrics["train/loss"], plain_trainer.callback_metrics["train/loss"])
    assert [s for s, _ in probe.history] == [0, 2, 4] and [s for s, _ in relative.history] == [0, 4]
    assert relative.history[0][1].step_sizes == pytest.approx([0.2])

    # g is the gradient the training step computed (same batch, same dropout mask, same batch statistics).
    for step, m in probe.history:
        assert m.grad_norm == pytest.approx(torch.sqrt(sum((g**2).sum() for g in grads.grads[step])).item(), rel=1e-12)

    # Exact against the manual computation at step 0: initial weights, first batch, the RNG as training starts.
    L.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,)))
    fresh = TinyModule()
    x, y = data.tensors[0][:8], data.tensors[1][:8]
    step0 = probe.history[0][1]
    expected = manual(fresh.net.train(), x, y, (0.1, 0.5), grads.rng[0])
    assert step0.losses == pytest.approx(expected.losses, rel=1e-12)
    assert step0.grad_diffs == pytest.approx(expected.grad_diffs, rel=1e-10)

    # Logged through the trainer's logger at the probed steps.
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("landscape/loss_range")}
    assert sorted(logged) == [0, 2, 4]
    m = probe.history[1][1]  # step 2: only this probe logs there (on steps 0 and 4 both probes do)
    assert float(logged[2]["landscape/beta_smooth"]) == pytest.approx(m.beta_smooth, rel=1e-6)
    assert float(logged[2]["landscape/grad_pred"]) == pytest.approx(m.grad_pred, rel=1e-6)
    assert float(logged[2]["landscape/loss_range"]) == pytest.approx(m.loss_range, rel=1e-6)
    assert "log" not in probed.__dict__ and "log_dict" not in probed.__dict__  # the muting is undone


def test_manual_optimization_needs_loss_fn(tmp_path: Path) -> None:
    trainer = L.Trainer(max_steps=1, logger=False, callbacks=[LossLandscapeProbe()], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    data = TensorDataset(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="manual optimization.*got loss_fn=None"):
        trainer.fit(TinyModule(manual_opt=True), DataLoader(data, batch_size=8))


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_probe(rank: int, world_size: int, x: torch.Tensor, y: torch.Tensor, state: dict) -> dict:
    model = tiny_model(norm="layer")
    model.load_state_dict(state)
    model[3].eval()
    shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
    m = measure_landscape(lambda: F.cross_entropy(model(x[shard]), y[shard]), model.parameters(), ETAS, modules=model)
    return {"losses": m.losses, "diffs": m.grad_diffs, "gnorm": m.grad_norm}


def test_ddp_two_processes_equal_one_process_on_all_data() -> None:
    torch.manual_seed(3)
    model = tiny_model(norm="layer")
    model[3].eval()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    state = copy.deepcopy(model.state_dict())
    single = measure_landscape(lambda: F.cross_entropy(model(x), y), model.parameters(), ETAS, modules=model)
    results = run_distributed(_ddp_probe, 2, x, y, state, timeout=180)
    for r in results:
        assert r["losses"] == pytest.approx(single.losses, rel=1e-12)
        assert r["diffs"] == pytest.approx(single.grad_diffs, rel=1e-10, abs=1e-14)
        assert r["gnorm"] == pytest.approx(single.grad_norm, rel=1e-12)
    assert math.isfinite(single.beta_smooth) and single.beta_smooth > 0


# ------------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("mode", ["fit", "init", "configure_model", "in_place"])
def test_probe_on_compiled_models_measures_as_eager_and_compiles_as_without_it(mode: str) -> None:
    from torch._dynamo.utils import counters

    from tests.test_compile_monitor import QUIET as QUIET_COMPILE
    from tests.test_compile_monitor import Tiny, _loader

    def fit(model: Tiny, probe: LossLandscapeProbe | None) -> tuple[int, int, int]:
        torch._dynamo.reset()
        counters.clear()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, precision="64-true", logger=False,
                            callbacks=[probe] if probe else [], limit_val_batches=0, **QUIET_COMPILE)
        trainer.fit(torch.compile(model, backend=model.backend) if model.mode == "fit" else model, _loader())
        return (counters["stats"]["unique_graphs"], counters["frames"]["total"], sum(counters["graph_break"].values()))

    eager = LossLandscapeProbe(every_n_steps=2, step_sizes=(0.1, 0.4))
    fit(Tiny(), eager)
    plain = fit(Tiny(mode), None)
    probe = LossLandscapeProbe(every_n_steps=2, step_sizes=(0.1, 0.4))
    model = Tiny(mode)
    try:
        run = fit(model, probe)
    finally:
        torch._dynamo.reset()
    # the probe's forwards and backwards run the compiled graph: nothing more compiled, no break, no recompile
    assert plain[0] >= 1 and run == plain and set(model.graphs) == {plain[0]}
    assert [s for s, _ in probe.history] == [s for s, _ in eager.history] == [0, 2, 4]
    for (_, got), (_, want) in zip(probe.history, eager.history):
        assert got.loss == pytest.approx(want.loss, rel=1e-12)
        assert got.losses == pytest.approx(want.losses, rel=1e-12)
        assert got.grad_diffs == pytest.approx(want.grad_diffs, rel=1e-9)
        assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-12) and got.grad_norm > 0
