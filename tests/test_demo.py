"""End to end: a reduced `make demo`, then a real TensorBoard server and the W&B offline runs it wrote."""

import math

import pytest
import torch

from examples import demo
from tests.tb_utils import find_wandb_offline_runs, get_json, poll_json, read_wandb_offline_run, tensorboard_server


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(logdir))
    mp.delenv("WANDB_API_KEY", raising=False)
    threads = torch.get_num_threads()
    try:
        results = demo.main(["--quick", "--logdir", str(logdir)])
    finally:
        import wandb

        wandb.teardown()  # wandb keeps its settings (the run directory) process-wide: leave none for later tests
        torch.set_num_threads(threads)  # the demo sets its own thread count
        mp.undo()
    return logdir, results


def test_table_and_results(demo_run) -> None:
    logdir, results = demo_run
    assert [(r.task, r.norm) for r in results] == [("cnn", "batch"), ("cnn", "group"), ("transformer", "batch")]
    for r in results:
        assert r.steps == 6 and math.isfinite(r.metric) and r.params > 0
    assert [r.recalibrated for r in results] == [True, False, True]
    table = demo.format_table(results)
    assert "steps to target" in table and "transformer  batch" in table


def test_steps_to_target() -> None:
    history = [(10, 0.5), (20, 0.96), (30, 0.97)]
    assert demo.steps_to_target(history, 0.95, higher_is_better=True) == 20
    assert demo.steps_to_target(history, 0.99, higher_is_better=True) is None
    assert demo.steps_to_target([(5, 4.0), (10, 2.9)], 3.0, higher_is_better=False) == 10


def test_tensorboard_serves_the_demo(demo_run) -> None:
    logdir, _ = demo_run
    with tensorboard_server(logdir) as url:
        runs = poll_json(url, "/data/runs", lambda r: {"cnn/batch", "cnn/group", "transformer/batch"} <= set(r))
        assert {"cnn/batch", "cnn/group", "transformer/batch"} <= set(runs)
        tags = poll_json(url, "/data/plugin/scalars/tags", lambda t: "act/std/model.stem.1" in t.get("cnn/batch", {}))
        cnn = tags["cnn/batch"]
        for key in ("act/std/model.stem.1", "act_grad/rms/model.fc", "grad/norm/model.fc.weight",
                    "bn/mean_shift/model.stem.1", "bn/recal_mean_shift/model.stem.1", "val/acc"):
            assert key in cnn, key
        assert "bn/recal_mean_shift/model.stem.1" not in tags["cnn/group"]  # no batch norm, no recalibration
        assert "bn/mean_shift/model.blocks.0.ln_1" in tags["transformer/batch"]
        layout = poll_json(url, "/data/plugin/custom_scalars/layout", lambda lay: bool(lay))
        categories = {c["title"]: c for c in layout["category"]}
        charts = {ch["title"] for ch in categories["lightning_bn"]["chart"]}
        assert {"act/std", "act_grad/rms", "bn/mean_shift"} <= charts
        hist = get_json(url, "/data/plugin/histograms/tags")
        assert "act/hist/model.stem.1" in hist["cnn/batch"]
        images = get_json(url, "/data/plugin/images/tags")
        assert "heatmap/act/std" in images["transformer/batch"]


def test_wandb_offline_runs(demo_run) -> None:
    logdir, _ = demo_run
    runs = find_wandb_offline_runs(logdir)
    assert len(runs) == 3
    run = read_wandb_offline_run(runs[0])
    assert run["project"] == "lightning-bn-demo"
    assert "act/std/model.stem.1" in run["summary"] and "val/acc" in run["summary"]
    assert any(isinstance(row.get("act/hist/model.stem.1"), dict) for row in run["history"])
