"""Tests of lightning_bn.sinks: real TensorBoard event files and server, a real offline W&B run, no mocks."""

from __future__ import annotations

import csv
import re
import sys
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
    LoggerSink,
    Sink,
    TensorBoardSink,
    WandbSink,
    fast_tensorboard_checksums,
    histogram_summary,
    matplotlib_available,
    merge_bins,
    pillow_available,
    render_heatmap,
    sink_for_logger,
    sinks_for_loggers,
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


def test_render_heatmap_numpy_backend_colours_cells():
    values = np.array([[0.0, 1.0], [np.nan, 0.5]])
    image = render_heatmap(values, ["a", "b"], [0, 5], backend="numpy", cell_px=4)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], [68, 1, 84])  # minimum: first viridis colour
    np.testing.assert_array_equal(image[0, 4], [253, 231, 37])  # maximum: last viridis colour
    np.testing.assert_array_equal(image[4, 0], [128, 128, 128])  # NaN: grey
    np.testing.assert_array_equal(image[4, 4], [33, 144, 141])  # midpoint: middle anchor
    assert (image[:4, :4] == image[0, 0]).all()  # one flat block per value


def test_render_heatmap_matplotlib_draws_labels_and_leaves_pyplot_alone():
    import matplotlib
    import matplotlib.pyplot as plt

    backend_before, figures_before = matplotlib.get_backend(), plt.get_fignums()
    small = render_heatmap(_heatmap_values(3), LAYERS, [0, 10, 20, 30], title="act/std", backend="matplotlib")
    tall = render_heatmap(np.ones((40, 4)), [f"block{i}" for i in range(40)], [0, 1, 2, 3], backend="matplotlib")
    assert small.ndim == 3 and small.shape[2] == 3 and small.dtype == np.uint8
    assert tall.shape[0] > small.shape[0]  # the figure grows with the number of layers
    colours = {tuple(int(c) for c in px) for px in small.reshape(-1, 3)}
    assert (128, 128, 128) in colours  # the NaN cell
    assert len(colours) > 20  # cells, colour bar and text, not a blank canvas
    assert matplotlib.get_backend() == backend_before and plt.get_fignums() == figures_before


def test_render_heatmap_pillow_draws_cells_labels_and_colour_bar():
    values = _heatmap_values(3)
    image = render_heatmap(values, LAYERS, [0, 10, 20, 30], title="act/std", backend="pillow")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    np.testing.assert_array_equal(image, render_heatmap(values, LAYERS, [0, 10, 20, 30], title="act/std"))  # auto
    colours = {tuple(int(c) for c in px) for px in image.reshape(-1, 3)}
    cells = {tuple(int(c) for c in px) for px in render_heatmap(values, LAYERS, [0, 10, 20, 30], backend="numpy")
             .reshape(-1, 3)}
    assert cells <= colours  # every cell's colour (the NaN grey included), as the numpy grid colours it
    assert (0, 0, 0) in colours and (255, 255, 255) in colours  # text on a white margin
    assert len(colours) > len(cells) + 20  # anti-aliased text and the colour bar's gradient
    untitled = render_heatmap(values, LAYERS, [0, 10, 20, 30], backend="pillow")
    assert untitled.shape[0] < image.shape[0]  # room for the title
    tall = render_heatmap(np.ones((40, 4)), [f"block{i}" for i in range(40)], [0, 1, 2, 3], backend="pillow")
    huge = render_heatmap(np.ones((300, 4)), [f"block{i}" for i in range(300)], [0, 1, 2, 3], backend="pillow")
    assert untitled.shape[0] < tall.shape[0] < 1000 and huge.shape[0] < 1000  # grows with layers, then rows shrink
    wide_labels = render_heatmap(values, ["a" * 40, "b", "c"], [0, 10, 20, 30], backend="pillow")
    assert wide_labels.shape[1] > untitled.shape[1]  # the label column fits the longest name


def test_heatmap_text_is_drawn_exactly_as_pillow_draws_it():
    # the renderer stamps cached glyph masks instead of calling ImageDraw.text for every label: same pixels
    from PIL import ImageDraw

    from lightning_bn.sinks import heatmap

    for text, size, anchor in [("model.layer2.shortcut.0", 11, "rm"), ("heatmap/act/std", 11, "ma"),
                               ("1.23e-05", 10, "lm"), ("150", 10, "ma"), ("clipped at the edge", 11, "lm")]:
        background = np.full((40, 220, 3), 255, np.uint8)
        background[:, 100:] = (30, 140, 200)  # over white and over a cell colour
        stamped = background.copy()
        assert heatmap._draw_text(stamped, (120, 20), text, size, anchor)
        drawn = Image.fromarray(background)
        ImageDraw.Draw(drawn).text((120, 20), text, fill=(0, 0, 0), font=heatmap._font(size), anchor=anchor)
        np.testing.assert_array_equal(stamped, np.asarray(drawn))
        assert (stamped != background).any(), text


def test_encode_png_round_trips_through_pillow():
    import io

    from lightning_bn.sinks.tensorboard_sink import encode_png

    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (7, 5, 3), dtype=np.uint8),
                  render_heatmap(_heatmap_values(3), LAYERS, [0, 10, 20, 30], title="act/std", backend="pillow")):
        decoded = Image.open(io.BytesIO(encode_png(image)))
        assert decoded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError, match="`image` must be HWC uint8 RGB"):
        encode_png(np.zeros((2, 2), dtype=np.uint8))


def test_render_heatmap_falls_back_to_numpy_without_matplotlib(monkeypatch):
    values = _heatmap_values(2)
    numpy_image = render_heatmap(values, LAYERS, [0, 1, 2], backend="numpy")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing install looks like to `import`
    assert not matplotlib_available() and pillow_available()
    np.testing.assert_array_equal(render_heatmap(values, LAYERS, [0, 1, 2]),
                                  render_heatmap(values, LAYERS, [0, 1, 2], backend="pillow"))
    with pytest.raises(ValueError, match=r"`backend` is 'matplotlib' but matplotlib is not installed"):
        render_heatmap(values, LAYERS, [0, 1, 2], backend="matplotlib")
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.ImageDraw", None)
    assert not pillow_available()
    np.testing.assert_array_equal(render_heatmap(values, LAYERS, [0, 1, 2]), numpy_image)
    with pytest.raises(ValueError, match=r"`backend` is 'pillow' but Pillow is not installed"):
        render_heatmap(values, LAYERS, [0, 1, 2], backend="pillow")


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
        (lambda s: s.log_heatmap("m", np.ones(3), ["a"], [0], 0), r"`values` must be a non-empty 2-D array"),
        (lambda s: s.log_heatmap("m", np.ones((2, 1)), ["a"], [0], 0), r"`row_labels` must have one label per row"),
        (lambda s: s.log_heatmap("m", np.ones((1, 2)), ["a"], [0], 0), r"`col_labels` must have one label per col"),
        (lambda s: s.log_heatmap("m", np.ones((1, 1)), ["a"], ["x"], 0), r"`col_labels` must be a list of int steps"),
    ],
)
def test_bad_input_names_the_argument_and_writes_nothing(tmp_path, call, message):
    logger = TensorBoardLogger(tmp_path, name="bad")
    with pytest.raises((ValueError, TypeError), match=message):
        call(TensorBoardSink(logger))
    assert not (tmp_path / "bad").exists()  # checked before the experiment (and its directory) is created
    with pytest.raises((ValueError, TypeError), match=message):
        call(LoggerSink(CSVLogger(tmp_path, name="csv")))  # the same message whichever sink


def test_constructor_errors():
    with pytest.raises(TypeError, match=r"`logger` must be a TensorBoardLogger, got CSVLogger"):
        TensorBoardSink(CSVLogger("unused"))
    with pytest.raises(TypeError, match=r"`logger` must be a WandbLogger, got CSVLogger"):
        WandbSink(CSVLogger("unused"))
    with pytest.raises(TypeError, match=r"`logger` must be a Lightning logger, got str"):
        LoggerSink("logs")
    with pytest.raises(ValueError, match=r"`heatmap_backend` must be one of auto, pillow, matplotlib, numpy, got 'png"):
        TensorBoardSink(TensorBoardLogger("unused"), heatmap_backend="png")
    with pytest.raises(ValueError, match=r"`backend` must be one of auto, pillow, matplotlib, numpy, got 'svg'"):
        render_heatmap(np.ones((1, 1)), ["a"], [0], backend="svg")
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
    sink = TensorBoardSink(logger, heatmap_backend="numpy")
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
    sink.log_heatmap("act/std_heatmap", _heatmap_values(2), LAYERS, [0, 1, 2], step=2)
    expected["images"]["act/std_heatmap"] = render_heatmap(_heatmap_values(2), LAYERS, [0, 1, 2], backend="numpy")
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

    ((step, image),) = read_tb_images(run_dir)["act/std_heatmap"]
    assert step == 2
    np.testing.assert_array_equal(image[..., :3], expected["images"]["act/std_heatmap"])  # PNG is lossless

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


def test_fast_checksums_are_tensorboards_own_and_files_read_back(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    from lightning_bn.sinks.checksum import masked_crc32c

    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 9, 255, 1000, 9250):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == reference(data), size
    original = record_writer.masked_crc32c
    monkeypatch.setattr(record_writer, "masked_crc32c", original)  # restored after the test
    if original is masked_crc32c:  # installed by an earlier sink in this process: start from TensorBoard's own
        monkeypatch.setattr(record_writer, "masked_crc32c", reference)
    off = TensorBoardSink(TensorBoardLogger(tmp_path, name="off"), fast_checksums=False)
    assert off.fast_checksums is False and record_writer.masked_crc32c is reference
    assert fast_tensorboard_checksums() is True and record_writer.masked_crc32c is masked_crc32c
    assert fast_tensorboard_checksums() is True  # idempotent
    writer = SummaryWriter(str(tmp_path / "fast"))
    for step in range(3):
        writer.add_scalar("x", float(step), step)
    writer.add_image("img", np.zeros((4, 5, 3), dtype=np.uint8), 0, dataformats="HWC")
    writer.close()
    # TensorBoard's reader checks both checksums of every record with its own pure-Python CRC
    (path,) = (tmp_path / "fast").glob("events.out.tfevents.*")
    events = list(EventFileLoader(str(path)).Load())
    assert sorted(v.tag for e in events for v in e.summary.value) == ["img", "x", "x", "x"]
    assert read_tb_scalars(str(tmp_path / "fast"))["x"] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert TensorBoardSink(TensorBoardLogger(tmp_path, name="on")).fast_checksums is True


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
        assert image_tags["act/std_heatmap"]["samples"] == 1

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
