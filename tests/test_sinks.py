"""Tests of lightning_bn.sinks: real TensorBoard event files and server, a real offline W&B run, no mocks."""

from __future__ import annotations

import csv
import re
import sys
import types
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch import nn

from lightning_bn.sinks import (
    LOG_SCALE_STATS,
    LoggerSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    histogram_summary,
    merge_bins,
    render_heatmap,
    shorten_labels,
    sink_for_logger,
    sinks_for_loggers,
    uses_log_scale,
)
from tests.tb_utils import (
    find_wandb_offline_runs,
    get_json,
    poll_json,
    read_tb_custom_scalars,
    read_tb_histograms,
    read_tb_images,
    read_tb_scalars,
    read_wandb_offline_run,
    tensorboard_server,
)

EDGES = np.linspace(-2.0, 2.0, 9)  # 8 bins of width 0.5
LAYERS = ["layer1.0.conv1", "layer1.0.bn1", "fc"]


def _counts(step: int) -> np.ndarray:
    # Empty outer bins on purpose: the TensorBoard record keeps the non-empty support only.
    return np.array([0, 0, 1 + step, 4, 9, 2 * step, 0, 0], dtype=np.float64)


def _heatmap_values(step: int) -> np.ndarray:
    values = np.arange(len(LAYERS) * (step + 1), dtype=np.float64).reshape(len(LAYERS), step + 1)
    values[1, 0] = np.nan  # a missing value is drawn grey, never breaks the colour range
    return values


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_histogram_summary_from_bins_is_exact_for_values_at_bin_centres():
    counts = _counts(3)
    centres = 0.5 * (EDGES[:-1] + EDGES[1:])
    values = np.repeat(centres, counts.astype(int))
    summary = histogram_summary(EDGES, counts)
    assert summary.num == values.size
    assert summary.sum == pytest.approx(values.sum(), abs=1e-12)
    assert summary.sum_squares == pytest.approx((values**2).sum(), abs=1e-12)
    # min/max: outer edges of the first and last non-empty bins (bins 2 and 5 here).
    assert (summary.min, summary.max) == (EDGES[2], EDGES[6])


def test_histogram_summary_takes_exact_values_and_handles_empty():
    summary = histogram_summary(EDGES, _counts(1), exact={"min": -0.9, "sum": 1.25, "sum_squares": 7.5})
    assert (summary.min, summary.max, summary.sum, summary.sum_squares) == (-0.9, EDGES[6], 1.25, 7.5)
    empty = histogram_summary(EDGES, np.zeros(8))
    assert empty == (EDGES[0], EDGES[-1], 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"`exact` keys must be among min, max, sum, sum_squares, got mean"):
        histogram_summary(EDGES, _counts(1), exact={"mean": 0.0})


def test_merge_bins_matches_histogram_on_coarse_edges():
    rng = np.random.default_rng(0)
    values = rng.normal(size=5000)
    fine_edges = np.linspace(-5, 5, 1001)  # 1000 bins: more than W&B's 512
    fine_counts, _ = np.histogram(values, fine_edges)
    edges, counts = merge_bins(fine_edges, fine_counts, max_bins=512)
    assert counts.size == 500 and edges.size == 501  # runs of 2 bins
    np.testing.assert_array_equal(counts, np.histogram(values, edges)[0])
    assert counts.sum() == fine_counts.sum() and (edges[0], edges[-1]) == (-5, 5)
    # An uneven split keeps a shorter last run and the outer edge.
    edges, counts = merge_bins(np.arange(8.0), np.ones(7), max_bins=3)
    np.testing.assert_array_equal(edges, [0, 3, 6, 7])
    np.testing.assert_array_equal(counts, [3, 3, 1])


def _viridis(fraction: float) -> tuple[int, int, int]:
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["viridis"](fraction, bytes=True)
    return int(r), int(g), int(b)


def _colours(image: np.ndarray) -> set[tuple[int, int, int]]:
    return {(int(r), int(g), int(b)) for r, g, b in np.unique(image.reshape(-1, 3), axis=0)}


def test_render_heatmap_colours_cells_by_the_colour_map_and_leaves_pyplot_alone():
    import matplotlib
    import matplotlib.pyplot as plt

    backend_before, figures_before = matplotlib.get_backend(), plt.get_fignums()
    values = np.array([[0.0, 1.0, 2.0, 3.0], [np.nan, 0.5, 1.5, np.inf]])
    image = render_heatmap(values, ["layer1.0.conv1", "fc"], [0, 10, 20, 30], title="act/std")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    colours = _colours(image)
    assert {_viridis(0.0), _viridis(0.5), _viridis(1.0)} <= colours  # 0, 1.5 and 3 on a linear range [0, 3]
    assert (128, 128, 128) in colours  # NaN and inf: grey
    assert (255, 255, 255) in colours and len(colours) > 50  # a white margin, anti-aliased text, the colour bar
    assert matplotlib.get_backend() == backend_before and plt.get_fignums() == figures_before
    np.testing.assert_array_equal(image, render_heatmap(values, ["layer1.0.conv1", "fc"], [0, 10, 20, 30],
                                                        title="act/std"))  # the same pixels every time
    untitled = render_heatmap(values, ["layer1.0.conv1", "fc"], [0, 10, 20, 30])
    assert untitled.shape[0] < image.shape[0]  # room for the title


def test_render_heatmap_log_scale_spreads_decades_and_marks_values_at_or_below_zero():
    values = np.array([[1.0, 10.0, 100.0]])
    linear = _colours(render_heatmap(values, ["fc"], [0, 1, 2]))
    log = _colours(render_heatmap(values, ["fc"], [0, 1, 2], log_scale=True))
    assert _viridis(9 / 99) in linear and _viridis(0.5) not in linear  # 10 is near the bottom of [1, 100]
    assert _viridis(0.5) in log and _viridis(9 / 99) not in log  # and half-way on a log scale
    # A dead layer's std of 0 has no logarithm: it is drawn black, not grey like a missing value, and the colour
    # range is that of the positive values.
    dead = np.array([[1.0, 10.0, 100.0], [0.0, 0.0, 0.0]])
    with_dead = render_heatmap(dead, ["fc", "relu"], [0, 1, 2], log_scale=True)
    alive = render_heatmap(np.array([[1.0, 10.0, 100.0], [1.0, 1.0, 1.0]]), ["fc", "relu"], [0, 1, 2], log_scale=True)
    black = np.all(with_dead == 0, axis=2).sum() - np.all(alive == 0, axis=2).sum()
    assert black > 3 * 75 * 50  # the row of three cells, each ~100 x 75 pixels, and the colour bar's triangle
    assert _viridis(0.5) in _colours(with_dead)
    # no positive value at all: a linear scale
    zeros = np.zeros((1, 3))
    np.testing.assert_array_equal(render_heatmap(zeros, ["fc"], [0, 1, 2], log_scale=True),
                                  render_heatmap(zeros, ["fc"], [0, 1, 2]))


def test_render_heatmap_height_follows_the_layer_count():
    def height(rows: int) -> int:
        return render_heatmap(np.ones((rows, 4)), [f"blocks.{i}.mlp.fc1" for i in range(rows)], [0, 1, 2, 3]).shape[0]

    # one 15-pixel row per layer (an 8-point name is 11 pixels tall at 100 dpi) up to 80 layers, then rows shrink
    assert height(40) - height(20) == 20 * 15
    assert height(60) > 60 * 15
    assert height(300) == height(80) < 1400


def test_shorten_labels_keeps_the_tail_that_tells_layers_apart():
    names = [f"bert.encoder.layer.{i}.{part}" for i in (0, 11) for part in ("attention.self.query", "output.dense")]
    prefix, shown = shorten_labels(names)
    assert prefix == "bert.encoder.layer." and shown[1] == "0.output.dense" and shown[2] == "11.attention.self.query"
    assert shorten_labels(["conv1", "layer1.0.bn1"]) == ("", ["conv1", "layer1.0.bn1"])  # short names stay whole
    # no shared prefix: the tail from a dot, after an ellipsis
    prefix, shown = shorten_labels(["model.decoder.layers.11.mlp.fc1", "lm_head"], max_chars=20)
    assert (prefix, shown) == ("", ["…layers.11.mlp.fc1", "lm_head"])
    # names that would read alike keep longer tails until they differ
    prefix, shown = shorten_labels(["encoder.layers.0.mlp.fc1", "decoder.layers.0.mlp.fc1", "x"], max_chars=18)
    assert prefix == "" and len(set(shown)) == 3 and all(s.endswith("layers.0.mlp.fc1") for s in shown[:2])
    prefix, shown = shorten_labels([f"a{'b' * 40}.{i}" for i in range(3)], max_chars=10)
    assert prefix == f"a{'b' * 40}." and shown == ["0", "1", "2"]


def test_render_heatmap_of_sixty_transformer_layers_fits_every_name():
    parts = ("attention.self.query", "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
             "output.dense")
    names = [f"bert.encoder.layer.{block}.{part}" for block in range(12) for part in parts]
    values = 10.0 ** np.linspace(-2, 2, 60 * 50).reshape(60, 50)
    image = render_heatmap(values, names, list(range(0, 2500, 50)), title="heatmap/act/std", log_scale=True)
    assert 60 * 15 < image.shape[0] < 1100 and image.shape[1] < 1100  # a 15-pixel row per layer, names shortened
    short = render_heatmap(values, [f"l{i}" for i in range(60)], list(range(0, 2500, 50)), title="heatmap/act/std")
    assert image.shape[0] == short.shape[0] and image.shape[1] - short.shape[1] < 200


def test_uses_log_scale_by_statistic():
    assert uses_log_scale("heatmap/act/std") and uses_log_scale("heatmap/act_grad/rms") and uses_log_scale("act/std")
    assert not uses_log_scale("heatmap/act/frac_zero") and not uses_log_scale("heatmap/act/std_dev")
    assert not uses_log_scale("heatmap/act/std", stats=()) and uses_log_scale("m/x", stats=["x"])
    assert {"act/std", "act_grad/rms"} <= set(LOG_SCALE_STATS)


def test_render_heatmap_without_matplotlib_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing install looks like to `import`
    with pytest.raises(ImportError, match=r"heatmaps are drawn with matplotlib: `pip install matplotlib`"):
        render_heatmap(np.ones((1, 1)), ["a"], [0])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.log_scalars([("a", 1.0)], 0), r"`metrics` must be a mapping of str to float, got list"),
        (lambda s: s.log_scalars({"a": "x"}, 0), r"`metrics\['a'\]` must be a number, got 'x'"),
        (lambda s: s.log_scalars({"a": 1.0}, -1), r"`step` must be an int >= 0, got -1"),
        (lambda s: s.set_layout({"act/std": "act/std/.*"}), r"`charts\['act/std'\]` must be a non-empty list"),
        (lambda s: s.set_layout({"act/std": ["act/(std"]}), r"`charts\['act/std'\]` holds an invalid regex"),
        (lambda s: s.log_histogram("h", [0.0, 1.0, 0.5], [1, 2], 0), r"`edges` must be finite and strictly incr"),
        (lambda s: s.log_histogram("h", [0.0, 1.0, 2.0], [1, 2, 3], 0), r"`counts` must have shape \(K,\) = \(2,\)"),
        (lambda s: s.log_histogram("h", [0.0, 1.0], [-1], 0), r"`counts` must be finite and >= 0"),
        (lambda s: s.log_histogram("", [0.0, 1.0], [1], 0), r"`tag` must be a non-empty str, got ''"),
        (lambda s: s.log_histogram("h", [0.0, 1.0], [1], 0, exact={"mean": 0.0}), r"`exact` keys must be among"),
        (lambda s: s.log_heatmap("m", np.ones(3), ["a"], [0], 0), r"`values` must be a non-empty 2-D array"),
        (lambda s: s.log_heatmap("m", np.ones((2, 1)), ["a"], [0], 0), r"`row_labels` must have one label per row"),
        (lambda s: s.log_heatmap("m", np.ones((1, 2)), ["a"], [0], 0), r"`col_labels` must have one label per col"),
        (lambda s: s.log_heatmap("m", np.ones((1, 1)), ["a"], ["x"], 0), r"`col_labels` must be a list of int steps"),
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, monkeypatch, call, message):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = TensorBoardLogger(tmp_path, name="bad")
    with pytest.raises((ValueError, TypeError), match=message):
        call(TensorBoardSink(logger))
    assert not (tmp_path / "bad").exists()  # checked before the experiment (and its directory) is created
    with pytest.raises((ValueError, TypeError), match=message):  # the same message whichever sink
        call(WandbSink(WandbLogger(offline=True, save_dir=str(tmp_path))))
    with pytest.raises((ValueError, TypeError), match=message):
        call(LoggerSink(CSVLogger(tmp_path, name="csv")))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no event file, no W&B run, no CSV


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"`logger` must be a TensorBoardLogger, got CSVLogger"):
        TensorBoardSink(CSVLogger("unused"))
    with pytest.raises(TypeError, match=r"`logger` must be a WandbLogger, got CSVLogger"):
        WandbSink(CSVLogger("unused"))
    with pytest.raises(TypeError, match=r"`logger` must be a Lightning logger, got str"):
        LoggerSink("logs")
    with pytest.raises(TypeError, match=r"`log_scale_stats` must be a list of str, got 'act/std'"):
        TensorBoardSink(TensorBoardLogger("unused"), log_scale_stats="act/std")
    with pytest.raises(ValueError, match=r"`log_scale_stats entry` must be a non-empty str, got ''"):
        WandbSink(WandbLogger(offline=True, save_dir="unused"), log_scale_stats=["act/std", ""])
    with pytest.raises(ValueError, match=r"`cmap` must be a matplotlib colormap name such as 'viridis', got 'vir'"):
        render_heatmap(np.ones((1, 1)), ["a"], [0], cmap="vir")
    with pytest.raises(ValueError, match=r"`dpi` must be a positive int, got 0"):
        render_heatmap(np.ones((1, 1)), ["a"], [0], dpi=0)
    with pytest.raises(ValueError, match=r"`max_bins` must be a positive int, got 0"):
        merge_bins([0.0, 1.0], [1], max_bins=0)
    with pytest.raises(TypeError, match=r"`loggers` must hold Lightning loggers, got str"):
        sinks_for_loggers(["tensorboard"])


def test_sinks_for_loggers_picks_one_sink_per_logger_without_starting_experiments(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = [
        TensorBoardLogger(tmp_path, name="tb"),
        WandbLogger(offline=True, save_dir=str(tmp_path)),
        CSVLogger(tmp_path, name="csv"),
    ]
    sinks = sinks_for_loggers(loggers)
    assert [type(s) for s in sinks] == [TensorBoardSink, WandbSink, LoggerSink]
    assert [s.logger for s in sinks] == loggers
    assert sinks_for_loggers(None) == [] and sinks_for_loggers([]) == []
    assert isinstance(sink_for_logger(loggers[0]), TensorBoardSink)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, no event file, no CSV yet


def test_logger_sink_writes_scalars_and_ignores_the_rest(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    sink = LoggerSink(logger)
    sink.set_layout({"act/std": ["act/std/.*"]})
    sink.log_scalars({"act/std/fc": 0.5, "act/mean/fc": torch.tensor(0.25)}, step=3)
    sink.log_histogram("act/hist/fc", EDGES, _counts(0), step=3)
    sink.log_heatmap("act/std_heatmap", _heatmap_values(1), LAYERS, [0, 1], step=3)
    sink.flush()
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert rows == [{"act/mean/fc": "0.25", "act/std/fc": "0.5", "step": "3"}]
    assert sorted(p.name for p in Path(logger.log_dir).iterdir()) == ["metrics.csv"]  # no histogram or image file


def test_a_minimal_sink_only_needs_log_scalars():
    class ListSink(Sink):
        def __init__(self):
            self.rows = []

        def log_scalars(self, metrics, step):
            self.rows.append((step, dict(metrics)))

    sink = ListSink()
    sink.set_layout({"a": ["a/.*"]})
    sink.log_histogram("h", EDGES, _counts(0), 0)
    sink.log_heatmap("m", np.ones((1, 1)), ["a"], [0], 0)
    sink.log_scalars({"a/b": 1.0}, 0)
    assert sink.rows == [(0, {"a/b": 1.0})]
    with pytest.raises(ValueError, match="`edges`"):
        sink.log_histogram("h", [1.0], [], 0)


def test_sinks_write_nothing_on_other_ranks(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    sink = TensorBoardSink(logger)
    previous = rank_zero_only.rank
    rank_zero_only.rank = 1
    try:
        sink.set_layout({"act/std": ["act/std/.*"]})
        sink.log_scalars({"act/std/fc": 1.0}, 0)
        sink.log_histogram("act/hist/fc", EDGES, _counts(0), 0)
        sink.log_heatmap("act/std_heatmap", _heatmap_values(0), LAYERS, [0], 0)
        sink.flush()
    finally:
        rank_zero_only.rank = previous
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard: event files and a real server


def _write_tensorboard_run(tmp_path: Path) -> tuple[TensorBoardLogger, dict]:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    sink = TensorBoardSink(logger)
    sink.set_layout({"act/std": ["act/std/.*"]})
    expected: dict = {"scalars": {}, "images": {}}
    for step in range(3):
        metrics = {f"act/std/{name}": 0.5 * step + i for i, name in enumerate(LAYERS)}
        sink.log_scalars(metrics, step)
        for key, value in metrics.items():
            expected["scalars"].setdefault(key, []).append((step, value))
        sink.log_histogram("act/hist/fc", EDGES, _counts(step), step)
    sink.log_histogram("act/hist/conv", EDGES, _counts(1), 2, exact={"min": -0.7, "max": 0.4, "sum": 3.0})
    sink.log_scalars({"grad/norm/fc.weight": 2.0}, 2)
    sink.set_layout({"grad/norm": ["grad/norm/.*"]})  # a second call: the layouts are merged
    sink.set_layout({"grad/norm": ["grad/norm/.*"]})  # an identical call writes nothing new
    sink.log_heatmap("heatmap/act/std", _heatmap_values(2), LAYERS, [0, 1, 2], step=2)  # a log colour scale
    expected["images"]["heatmap/act/std"] = render_heatmap(
        _heatmap_values(2), LAYERS, [0, 1, 2], title="heatmap/act/std", log_scale=True
    )
    sink.flush()
    return logger, expected


def test_tensorboard_event_files(tmp_path):
    logger, expected = _write_tensorboard_run(tmp_path)
    run_dir = logger.log_dir

    scalars = read_tb_scalars(run_dir)
    assert set(scalars) == set(expected["scalars"]) | {"grad/norm/fc.weight"}
    for tag, points in expected["scalars"].items():
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points]
        np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in points], rtol=1e-6)

    histograms = read_tb_histograms(run_dir)
    assert [step for step, _ in histograms["act/hist/fc"]] == [0, 1, 2]
    for step, histo in histograms["act/hist/fc"]:
        counts = _counts(step)
        support = np.flatnonzero(counts)
        first, last = support[0], support[-1]
        np.testing.assert_array_equal(histo.bucket, counts[first : last + 1])
        np.testing.assert_array_equal(histo.bucket_limit, EDGES[first + 1 : last + 2])
        summary = histogram_summary(EDGES, counts)
        assert (histo.min, histo.max, histo.num) == (EDGES[first], EDGES[last + 1], counts.sum())
        assert histo.sum == pytest.approx(summary.sum) and histo.sum_squares == pytest.approx(summary.sum_squares)
    ((step, exact),) = histograms["act/hist/conv"]
    assert (step, exact.min, exact.max, exact.sum) == (2, -0.7, 0.4, 3.0)

    ((step, image),) = read_tb_images(run_dir)["heatmap/act/std"]
    assert step == 2
    np.testing.assert_array_equal(image[..., :3], expected["images"]["heatmap/act/std"])  # PNG is lossless

    assert read_tb_custom_scalars(run_dir) == {
        "lightning_bn": {"act/std": ["act/std/.*"], "grad/norm": ["grad/norm/.*"]}
    }


def test_tensorboard_scalars_one_event_per_call_keys_as_given(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logger = TensorBoardLogger(tmp_path, name="run", prefix="train", default_hp_metric=False)
    sink = TensorBoardSink(logger)
    metrics = {f"act/std/layer{i}": 0.25 * i for i in range(300)}
    sink.log_scalars(metrics, 7)
    logger.experiment.close()  # a closed writer: the scalars still arrive (add_scalar reopens it)
    sink.log_scalars({"grad/norm/fc.weight": 2.0, "act/std/fc": torch.tensor(0.5)}, 8)
    sink.flush()
    events = [e for path in sorted(Path(logger.log_dir).glob("events.out.tfevents.*"))
              for e in EventFileLoader(str(path)).Load() if e.HasField("summary")]
    batched = [e for e in events if e.step == 7]
    assert len(batched) == 1 and len(batched[0].summary.value) == 300  # one event holds every scalar of the call
    scalars = read_tb_scalars(logger.log_dir)
    # The logger's prefix ("train") is not applied: it is readable only through a private field.
    assert set(scalars) == set(metrics) | {"grad/norm/fc.weight", "act/std/fc"}
    assert scalars["act/std/layer3"] == [(7, 0.75)]
    assert scalars["grad/norm/fc.weight"] == [(8, 2.0)] and scalars["act/std/fc"] == [(8, 0.5)]
    expected = {k: [(7, v)] for k, v in metrics.items()}
    assert {k: v for k, v in scalars.items() if k.startswith("act/std/layer")} == expected


def test_tensorboard_scalars_same_keys_every_step_keep_each_steps_values(tmp_path):
    # the Summary is built once for a set of keys and its values replaced: every step must keep its own values
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    sink = TensorBoardSink(logger)
    for step in range(4):
        sink.log_scalars({"act/std/a": 1.0 + step, "act/std/b": -2.0 * step}, step)
    sink.log_scalars({"act/std/b": 9.0, "act/std/a": 8.0}, 4)  # same keys, another order: a Summary of its own
    sink.log_scalars({"act/std/a": 7.0}, 5)
    sink.flush()
    scalars = read_tb_scalars(logger.log_dir)
    assert scalars["act/std/a"] == [(0, 1.0), (1, 2.0), (2, 3.0), (3, 4.0), (4, 8.0), (5, 7.0)]
    assert scalars["act/std/b"] == [(0, 0.0), (1, -2.0), (2, -4.0), (3, -6.0), (4, 9.0)]


def test_writing_changes_nothing_in_tensorboard_torch_or_matplotlib(tmp_path):
    import matplotlib
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer import event_file_writer, record_writer
    from torch.utils.tensorboard import summary, writer

    modules = (record_writer, event_file_writer, writer, summary, matplotlib)
    before = [dict(vars(module)) for module in modules]
    rc_before = dict(matplotlib.rcParams)
    logger, _ = _write_tensorboard_run(tmp_path)
    for module, attributes in zip(modules, before):
        changed = [name for name, value in vars(module).items()
                   if attributes.get(name) is not value and not isinstance(value, types.ModuleType)]  # submodules
        assert not changed, f"{module.__name__}: {changed}"
    assert dict(matplotlib.rcParams) == rc_before
    # TensorBoard's reader verifies both checksums of every record as it reads it
    (path,) = Path(logger.log_dir).glob("events.out.tfevents.*")
    tags = {value.tag for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
    assert {"act/std/fc", "act/hist/fc", "heatmap/act/std"} <= tags


def test_tensorboard_server_serves_every_plugin(tmp_path):
    logger, expected = _write_tensorboard_run(tmp_path)
    logger.finalize("success")
    run = "run/version_0"
    with tensorboard_server(tmp_path) as base_url:
        assert poll_json(base_url, "/data/runs", lambda runs: run in runs) == [run]
        scalar_tags = poll_json(base_url, "/data/plugin/scalars/tags", lambda a: len(a.get(run, {})) == 4)
        assert set(scalar_tags[run]) == set(expected["scalars"]) | {"grad/norm/fc.weight"}
        fc_std = get_json(base_url, "/data/plugin/scalars/scalars", {"run": run, "tag": "act/std/fc"})
        assert [(step, value) for _, step, value in fc_std] == expected["scalars"]["act/std/fc"]

        assert set(get_json(base_url, "/data/plugin/histograms/tags")[run]) == {"act/hist/fc", "act/hist/conv"}
        served = get_json(base_url, "/data/plugin/histograms/histograms", {"run": run, "tag": "act/hist/fc"})
        assert [step for _, step, _ in served] == [0, 1, 2]
        for _, step, buckets in served:
            counts = _counts(step)
            first, last = np.flatnonzero(counts)[[0, -1]]
            assert [b[2] for b in buckets] == counts[first : last + 1].tolist()  # every bucket of the support
            assert [b[0] for b in buckets] == EDGES[first : last + 1].tolist()  # left edges
            assert [b[1] for b in buckets] == EDGES[first + 1 : last + 2].tolist()  # right edges

        image_tags = get_json(base_url, "/data/plugin/images/tags")[run]
        assert image_tags["heatmap/act/std"]["samples"] == 1

        layout = get_json(base_url, "/data/plugin/custom_scalars/layout")
        (category,) = layout["category"]
        assert category["title"] == "lightning_bn"
        charts = {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
        assert charts == {"act/std": ["act/std/.*"], "grad/norm": ["grad/norm/.*"]}
        # The chart's regex gathers every layer's curve, as the Custom Scalars tab will draw them.
        matched = get_json(base_url, "/data/plugin/custom_scalars/scalars", {"run": run, "tag": charts["act/std"][0]})
        assert matched["regex_valid"] and set(matched["tag_to_events"]) == set(expected["scalars"])
        assert all(re.fullmatch("act/std/.*", tag) for tag in matched["tag_to_events"])


# ---------------------------------------------------------------------------------------------------------------------
# A real Trainer with TensorBoard and W&B (offline) attached: the contract the monitor uses


class _TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SinkWriter(L.Callback):
    """What the monitor does: rank zero writes every figure to every attached logger."""

    def __init__(self):
        self.written: dict[int, dict[str, float]] = {}
        self.counts: dict[int, np.ndarray] = {}

    def on_train_start(self, trainer, pl_module):
        self.sinks = sinks_for_loggers(trainer.loggers)
        for sink in self.sinks:
            sink.set_layout({"weight/norm": ["weight/norm/.*"]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        weight = pl_module.net[0].weight.detach().flatten().double().numpy()
        metrics = {f"weight/norm/{name}": float(p.detach().norm()) for name, p in pl_module.named_parameters()}
        self.written[step] = metrics
        self.counts[step], _ = np.histogram(weight, EDGES)
        wide_edges = np.linspace(-2, 2, 1001)
        wide_counts, _ = np.histogram(weight, wide_edges)
        layers, steps = sorted(metrics), sorted(self.written)
        values = np.array([[self.written[s][k] for s in steps] for k in layers])
        for sink in self.sinks:
            sink.log_scalars(metrics, step)
            sink.log_histogram("weight/hist/net.0.weight", EDGES, self.counts[step], step)
            if step == 2:
                sink.log_histogram("weight/wide_hist/net.0.weight", wide_edges, wide_counts, step)
                sink.log_heatmap("weight/norm_heatmap", values, layers, steps, step)
        if step == 2:
            self.heatmap = render_heatmap(values, layers, steps, title="weight/norm_heatmap")


def test_trainer_writes_to_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards (WandbLogger sets it for the process)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    tb = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    wb = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-bn-tests")
    writer = _SinkWriter()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=[tb, wb],
        callbacks=[writer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    try:
        trainer.fit(_TinyModule(), torch.utils.data.DataLoader(data, batch_size=4))
    finally:
        wandb.finish()
    assert sorted(writer.written) == [1, 2, 3]  # global_step after each optimizer step

    scalars = read_tb_scalars(tb.log_dir)
    for step, metrics in writer.written.items():
        for key, value in metrics.items():
            assert (step, pytest.approx(value, rel=1e-6)) in scalars[key]
    histograms = read_tb_histograms(tb.log_dir)
    assert [s for s, _ in histograms["weight/hist/net.0.weight"]] == [1, 2, 3]
    assert [h.num for _, h in histograms["weight/hist/net.0.weight"]] == [32.0] * 3
    ((step, tb_image),) = read_tb_images(tb.log_dir)["weight/norm_heatmap"]
    assert step == 2
    np.testing.assert_array_equal(tb_image[..., :3], writer.heatmap)  # the matplotlib figure, pixel for pixel
    assert read_tb_custom_scalars(tb.log_dir) == {"lightning_bn": {"weight/norm": ["weight/norm/.*"]}}

    (run_dir,) = find_wandb_offline_runs(tmp_path)
    run = read_wandb_offline_run(run_dir)
    assert run["project"] == "lightning-bn-tests"
    history = run["history"]
    for step, metrics in writer.written.items():
        rows = [r for r in history if r.get("trainer/global_step") == step and "weight/norm/net.0.weight" in r]
        assert len(rows) == 1
        assert {k: rows[0][k] for k in metrics} == pytest.approx(metrics, rel=1e-12)
    hist_rows = [r for r in history if "weight/hist/net.0.weight" in r]
    assert [r["trainer/global_step"] for r in hist_rows] == [1, 2, 3]
    for row in hist_rows:
        histo = row["weight/hist/net.0.weight"]
        assert histo["_type"] == "histogram"
        np.testing.assert_allclose(histo["bins"], EDGES)
        np.testing.assert_array_equal(histo["values"], writer.counts[row["trainer/global_step"]])
    (wide,) = [r["weight/wide_hist/net.0.weight"] for r in history if "weight/wide_hist/net.0.weight" in r]
    assert len(wide["values"]) == 500 and len(wide["bins"]) == 501 and sum(wide["values"]) == 32  # merged to <= 512
    (image_row,) = [r for r in history if "weight/norm_heatmap" in r]
    image = image_row["weight/norm_heatmap"]
    assert image["_type"] == "image-file" and image_row["trainer/global_step"] == 2
    png = np.asarray(Image.open(run["files_dir"] / image["path"]))
    assert png.shape[:2] == (image["height"], image["width"])
    np.testing.assert_array_equal(png[..., :3], writer.heatmap)
