"""LayerStatsMonitor on torch.compile'd models: the three ways of compiling, figures and keys as eager, no recompiles
or graph breaks after warm-up (counted with dynamo's counters against the same run without the monitor)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks import LayerStatsMonitor
from lightning_bn.stats import LayerStatsCollector, compiled_wrappers, select_modules, uncompiled_name
from lightning_bn.stats._names import uncompiled_modules

QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
MODES = ["fit", "init", "configure_model", "in_place"]


def _stance() -> str:
    return torch._dynamo.eval_frame._stance.stance  # no public getter


class Block(nn.Module):
    """conv -> batch norm -> ReLU, as a user's own module (dynamo skips torch's nn.Sequential.forward itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Tiny(L.LightningModule):
    """``compile``: how the block is compiled (``"fit"``: the caller compiles the whole LightningModule)."""

    def __init__(self, compile: str | None = None, backend: str = "aot_eager", fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = Block(), nn.Linear(4, 1)
        self.mode, self.backend, self.fail_at = compile, backend, fail_at
        if compile == "init":
            self.body = torch.compile(self.body, backend=backend)
        elif compile == "in_place":
            self.body.compile(backend=backend)
        self.graphs: list[int] = []  # graphs compiled so far, after each training step
        self.stances: list[str] = []  # the compiler's stance at each backward (outside any compiled code)

    def configure_model(self) -> None:
        if self.mode == "configure_model" and not compiled_wrappers(self):
            self.body = torch.compile(self.body, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("failing on purpose")
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x).squeeze(-1), y))

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.stances.append(_stance())

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.graphs.append(counters["stats"]["unique_graphs"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 24) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64),
                       torch.randn(n, generator=g, dtype=torch.float64))
    return DataLoader(ds, batch_size=4)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _fit(model: Tiny, monitor: LayerStatsMonitor | None, steps: int = 6, validate: bool = False) -> dict:
    """One run; what dynamo compiled in it (counters reset first) and the monitor's warnings."""
    torch._dynamo.reset()
    counters.clear()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision="64-true", logger=False,
                        callbacks=[monitor] if monitor else [], limit_val_batches=2 if validate else 0,
                        num_sanity_val_steps=0, **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(torch.compile(model, backend=model.backend) if model.mode == "fit" else model,
                    _loader(), _loader(8) if validate else None)
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "frames": counters["frames"]["total"],
        "breaks": sum(counters["graph_break"].values()),
        "warnings": [str(w.message) for w in caught if "LayerStatsMonitor" in str(w.message)],
    }


def _assert_history_equal(got: LayerStatsMonitor, ref: LayerStatsMonitor, rel: float) -> None:
    assert [step for step, _ in got.history] == [step for step, _ in ref.history]
    for (step, scalars), (_, expected) in zip(got.history, ref.history):
        assert scalars.keys() == expected.keys(), step
        for key, value in expected.items():
            assert scalars[key] == pytest.approx(value, rel=rel, abs=1e-12), (step, key)


# ------------------------------------------------------------------------------------------------ names
def test_names_drop_orig_mod() -> None:
    assert uncompiled_name("net._orig_mod.0.weight") == "net.0.weight"
    assert uncompiled_name("_orig_mod.fc") == "fc" and uncompiled_name("_orig_mod") == ""
    assert uncompiled_name("layer1.conv") == "layer1.conv"
    model = Tiny("init")  # torch.compile compiles at the first call, so nothing is compiled here
    wrapped = [(n, m) for n, m in model.named_modules() if n]
    assert "body._orig_mod.conv" in dict(wrapped)
    assert [n for n, _ in uncompiled_modules(wrapped)] == ["body", "body.conv", "body.bn", "head"]
    assert compiled_wrappers(model) == ["body"]
    collector = LayerStatsCollector(select_modules(model))
    assert collector.names == ["body.conv", "body.bn", "head"]
    assert [n for n, _ in collector.param_list][:2] == ["body.conv.weight", "body.conv.bias"]
    # globs match the uncompiled names, as the keys have them
    def chosen(**selectors: object) -> list[str]:
        return [n for n, _ in uncompiled_modules(select_modules(model, **selectors))]  # type: ignore[arg-type]

    assert chosen(include=["body.conv", "head"]) == ["body.conv", "head"]
    assert chosen(exclude="body.bn") == ["body.conv", "head"]


# ------------------------------------------------------------------------------------------------ three ways
@pytest.mark.parametrize("mode", MODES)
def test_compiled_runs_give_the_eager_figures_and_compile_as_without_the_monitor(mode: str) -> None:
    eager = LayerStatsMonitor(log_every_n_steps=2, histogram_every_n_steps=4, heatmap_every_n_logs=None)
    _fit(Tiny(), eager)
    plain = _fit(Tiny(mode), None)
    model = Tiny(mode)
    monitor = LayerStatsMonitor(log_every_n_steps=2, histogram_every_n_steps=4, heatmap_every_n_logs=None)
    run = _fit(model, monitor)

    assert plain["graphs"] >= 1  # the block (and the LightningModule's steps) really compiled
    # the same graphs as the run without the monitor, compiled at the first step that is no logging step, then
    # none: the logging steps 2 and 4 run eagerly and recompile nothing
    assert (run["graphs"], run["frames"], run["breaks"]) == (plain["graphs"], plain["frames"], plain["breaks"])
    assert model.graphs[0] == 0 and set(model.graphs[1:]) == {run["graphs"]}
    # eager from the logging step's first forward to its optimizer step; the user's stance again after
    assert model.stances == ["force_eager", "default"] * 3 and _stance() == "default"
    assert run["warnings"] == []  # the monitor sees everything here: no warning
    assert monitor.collected_steps == eager.collected_steps == [0, 2, 4]
    assert monitor.hook_calls == eager.hook_calls == 3 * 3
    keys = monitor.last_metrics.keys()
    assert {"act/std/body.conv", "act_in/std/body.bn", "act_grad/rms/body.conv", "bn/mean_shift/body.bn",
            "grad/norm/body.conv.weight", "update/ratio/head.weight"} <= keys
    assert not any("_orig_mod" in k for k in keys) and not any("_orig_mod" in t for t in monitor.last_stats.histograms)
    assert monitor.last_stats.histograms.keys() == eager.last_stats.histograms.keys()
    _assert_history_equal(monitor, eager, rel=1e-9)


def test_validation_of_a_compiled_model_runs_eagerly_and_compiles_nothing_more() -> None:
    eager = LayerStatsMonitor(log_every_n_steps=3, log_validation=True, heatmap_every_n_logs=None)
    _fit(Tiny(), eager, validate=True)
    plain = _fit(Tiny("fit"), None, validate=True)
    monitor = LayerStatsMonitor(log_every_n_steps=3, log_validation=True, heatmap_every_n_logs=None)
    run = _fit(Tiny("fit"), monitor, validate=True)
    # the run without the monitor compiles the validation step too (self.log breaks its graph); with it, the
    # collected validation epoch runs eagerly: fewer graphs, no break
    assert run["graphs"] < plain["graphs"] and run["breaks"] == 0 < plain["breaks"]
    assert _stance() == "default"
    assert {k for k in monitor.last_metrics if k.startswith("val_")} == {k for k in eager.last_metrics
                                                                         if k.startswith("val_")}
    for key, value in eager.last_metrics.items():
        assert monitor.last_metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_inductor() -> None:
    # one real inductor compile (slow on a CPU): step 1 runs the inductor graph, steps 0 and 2 are logging steps
    eager = LayerStatsMonitor(log_every_n_steps=2, heatmap_every_n_logs=None)
    _fit(Tiny(), eager, steps=3)
    model = Tiny("init", backend="inductor")
    monitor = LayerStatsMonitor(log_every_n_steps=2, heatmap_every_n_logs=None)
    run = _fit(model, monitor, steps=3)
    assert model.graphs == [0, 1, 1] and run["breaks"] == 0 and run["warnings"] == []
    assert model.stances == ["force_eager", "default", "force_eager"]
    _assert_history_equal(monitor, eager, rel=1e-9)


# ------------------------------------------------------------------------------------------------ stance
def test_stance_scoped_to_logging_steps_and_restored_after_an_exception() -> None:
    monitor = LayerStatsMonitor(log_every_n_steps=2)
    model = Tiny("init", fail_at=4)
    with torch.compiler.set_stance("eager_on_recompile"):  # the user's own stance stays theirs
        with pytest.raises(RuntimeError, match="failing on purpose"):
            L.Trainer(accelerator="cpu", max_steps=6, precision="64-true", logger=False, callbacks=[monitor],
                      **QUIET).fit(model, _loader())
        assert _stance() == "eager_on_recompile"
    assert _stance() == "default"
    assert monitor.collected_steps == [0, 2]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_hooks_traced_by_dynamo_count_nothing_and_break_no_graph() -> None:
    # the collector used directly on a compiled module, without force_eager: the hooks exist while it compiles
    torch.manual_seed(0)
    block = Block().double()
    block.compile(backend="aot_eager")
    collector = LayerStatsCollector(select_modules(block))
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    collector.attach()
    block(x).sum().backward()
    assert collector.forwards == 0 and sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    with torch.compiler.set_stance("force_eager"):  # what the monitor does on a logging step
        block(x).sum().backward()
    collector.detach()
    assert collector.forwards == 2 and "act_grad/rms/conv" in collector.finalize().scalars
    assert counters["stats"]["unique_graphs"] == 1


# ------------------------------------------------------------------------------------------------ TorchScript
def test_torchscript_modules_get_one_warning_naming_the_missing_figures() -> None:
    class Scripted(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.jit.script(nn.Linear(4, 1))

    monitor = LayerStatsMonitor(log_every_n_steps=1, include=[nn.Conv2d, "head"])
    model = Scripted()
    run = _fit(model, monitor, steps=2)
    assert run["warnings"] == ["LayerStatsMonitor: head run as TorchScript, where Python hooks do not fire: their "
                               "act/*, act_grad/* figures are missing (their parameter figures are logged)."]
    m = monitor.last_metrics
    assert "act/std/body.conv" in m and "grad/norm/head.weight" in m and not any(k.startswith("act/std/head")
                                                                                 for k in m)
