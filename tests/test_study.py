"""The study command: the smoke-sized run writes the report with its tables and PNGs; the helpers compute right;
importing the package, the study or the examples changes no process-wide state."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib
import pytest
import torch

from examples.cnn import CNN
from lightning_bn.layers import available_norms
from study import SIZES, main, run_study
from study._parts import Section, _bn_shift, fmt, mean_std, padded_label, steps_to, table
from study._report import render
from study._train import set_bn_option

ROOT = Path(__file__).resolve().parents[1]

PNGS = ("study_lr.png", "study_batch_size.png", "study_moving_average.png", "study_landscape.png",
        "study_transformer.png", "study_transformer_padded.png")


def _table_after(text: str, header_start: str) -> list[list[str]]:
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_smoke_study_writes_report_tables_and_pngs(tmp_path: Path) -> None:
    threads, filters = torch.get_num_threads(), list(warnings.filters)
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # unresolved: reading it must not pick one
    try:
        report = main(["--smoke", "--out", str(tmp_path), "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    # the runs' warning filters and thread count were scoped to the run; the figures used no global backend
    assert warnings.filters == filters and torch.get_num_threads() == threads
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert report == tmp_path / "study.md"
    text = report.read_text()
    assert f"`python -m study --smoke --out {tmp_path} --threads 1`" in text
    for title in ("## 1. Learning rate and speed", "## 2. Batch size", "## 3. Moving-average vs population",
                  "## 4. Loss landscape", "## 5. Transformers"):
        assert title in text
    assert text.count("**Agreement.**") == 5 and text.count("**Paper.**") == 5
    for name in PNGS:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in text
    cfg = SIZES["smoke"]

    lr_rows = _table_after(text, "| norm | lr | final val acc %")
    assert [(r[0], float(r[1])) for r in lr_rows] == [(n, lr) for n in cfg.lr_norms for lr in cfg.lrs]
    for row in lr_rows:
        assert row[2] == "—" or 0.0 <= float(row[2]) <= 100.0
        assert re.fullmatch(r"[01] / [01] of 1", row[4])

    bs_rows = _table_after(text, "| norm | batch ")
    assert [r[0] for r in bs_rows] == list(cfg.bs_norms) and all(len(r) == 1 + len(cfg.batch_sizes) for r in bs_rows)
    assert all(0.0 <= float(c) <= 100.0 for r in bs_rows for c in r[1:])

    ma_rows = _table_after(text, "| momentum | epoch |")
    assert {float(r[0]) for r in ma_rows} == set(cfg.momenta)
    for row in ma_rows:  # the gain column is the difference of the two accuracies
        assert float(row[4]) == pytest.approx(float(row[3]) - float(row[2]), abs=0.11)
        assert float(row[5]) >= 0.0

    land_rows = _table_after(text, "| norm | probes |")
    assert [r[0] for r in land_rows] == list(cfg.land_norms)
    for row in land_rows:
        assert int(row[1]) == 2  # steps 0 and 2 of the 4 capped steps
        assert all(float(c) > 0.0 for c in row[2:7])

    tf_rows = _table_after(text, "| norm | val bits/char |")
    assert [r[0] for r in tf_rows] == list(cfg.tf_norms) and all(0 < float(r[1]) < 8 for r in tf_rows)
    shift_rows = _table_after(text, "| model (batch norm) |")
    assert [r[0] for r in shift_rows] == ["transformer", "cnn"]
    assert all(float(c) >= 0.0 for r in shift_rows for c in r[1:])

    # part 5's padded task: a row per (norm, mask) of the config whose kind is registered, the others named
    padded_rows = _table_after(text, "| padded task | val bits/char | bn/mean_shift | bn/var_shift |")
    runnable = [(n, masked) for n, masked in cfg.tf_padded if n in available_norms()]
    assert [r[0] for r in padded_rows] == [padded_label(n, masked) for n, masked in runnable]
    assert [r[0] for r in padded_rows][:3] == ["layer (mask)", "batch (no mask)", "batch (mask)"]
    for row in padded_rows:
        assert 0 < float(row[1]) < 8
        if row[0].startswith(("layer", "power")):  # not batch norm to the monitor: no bn/* figures
            assert row[2:] == ["—", "—"]
        else:
            assert all(float(c) >= 0.0 for c in row[2:])
    assert ("**Not run:** `power`" in text) == ("power" not in available_norms())
    assert text.count("**Agreement (padded task).**") == 1
    # the same rows again at the check's learning rate
    check_rows = _table_after(text, f"| padded task, lr {cfg.tf_padded_check_lr:g} | val bits/char |")
    assert [r[0] for r in check_rows] == [r[0] for r in padded_rows]
    assert all(0 < float(r[1]) < 8 for r in check_rows)
    assert text.count("**Agreement (learning-rate check).**") == 1
    assert re.search(r"\(\d+% of the training batches' positions are padding\)", text)
    # the windows figure sits with its own text, before the padded task's
    assert text.index("](study_transformer.png)") < text.index("### The padded task") \
        < text.index("](study_transformer_padded.png)")


def test_quick_transformer_part_runs_the_padded_rows(tmp_path: Path) -> None:
    """``python -m study --quick`` with part 5 alone (the CI size): its padded rows train (layer norm below the
    unigram entropy's 4.69 bits), and the monitor gives batch-norm figures for the rows with batch statistics."""
    threads = torch.get_num_threads()
    try:
        report = main(["--quick", "--parts", "transformer", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = report.read_text()
    rows = {r[0]: r[1:] for r in _table_after(text, "| padded task |")}
    assert {"layer (mask)", "batch (no mask)", "batch (mask)"} <= rows.keys()
    assert all(0.0 < float(v[0]) < 8.0 for v in rows.values()) and float(rows["layer (mask)"][0]) < 4.69
    assert all(float(c) > 0.0 for label, v in rows.items() if label.startswith("batch") for c in v[1:])
    assert ("power (mask)" in rows) == ("power" in available_norms())
    assert (tmp_path / "study_transformer_padded.png").stat().st_size > 5000


def test_render_places_each_figure_where_the_text_had_got_to() -> None:
    sec = Section("9. A part", text=["one", "two", "three"], figures=[("a.png", "A"), ("b.png", "B")],
                  figure_at=[1, 3])
    lines = render([sec], "smoke", "python -m study", 60.0).splitlines()
    body = lines[lines.index("## 9. A part") + 2:]
    assert body == ["one", "![A](a.png)", "", "*A*", "", "two", "three", "![B](b.png)", "", "*B*"]
    old_style = Section("9. A part", text=["one"], figures=[("a.png", "A")])  # no positions: figures at the end
    assert render([old_style], "smoke", "c", 1.0).rstrip().endswith("![A](a.png)\n\n*A*")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`size` must be one of full, quick, smoke, got 'huge'"):
        run_study("huge")
    with pytest.raises(ValueError, match="`parts` takes names among lr, .* got \\['lrr'\\]"):
        run_study("smoke", parts=["lrr"])


def test_helpers() -> None:
    assert mean_std([1.0, 3.0, float("nan")]) == (2.0, pytest.approx(2**0.5), 2)
    assert fmt([0.5, 0.7], 100) == "60.0 ± 14.1"
    assert fmt([0.5, float("nan")], 100) == "50.0 (1/2)"
    assert fmt([float("nan")]) == "—"
    assert steps_to([(5, 0.2), (10, 0.91), (15, 0.95)], 0.9) == 10.0
    assert steps_to([(5, 0.2)], 0.9) != steps_to([(5, 0.2)], 0.9)  # NaN: never reached
    assert table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |", ""]
    history = [(0, {"bn/mean_shift/a": 9.0, "bn/mean_shift/b": 7.0}), (10, {"bn/mean_shift/a": 1.0}),
               (20, {"bn/mean_shift/a": 2.0, "bn/mean_shift/b": 4.0, "bn/var_shift/a": 5.0})]
    curve, later = _bn_shift(history, "mean_shift")
    assert curve == [(0, 8.0), (10, 1.0), (20, 3.0)] and later == 2.0  # steps >= 5 (a quarter of 20)
    model = CNN(norm="ghost_batch", width=4)
    assert set_bn_option(model, virtual_batch_size=3) == 6
    assert all(m.virtual_batch_size == 3 for m in model.modules() if hasattr(m, "virtual_batch_size"))


IMPORT_EVERYTHING = """
import ast, importlib, pkgutil, sys, warnings
from pathlib import Path

import matplotlib

OURS = ("lightning_bn", "study", "examples")
# First the third-party modules that our sources import: the filters those add when imported are theirs.
deps = set()
for top in OURS:
    for path in Path(top).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module)
for name in sorted(d for d in deps if d.split(".")[0] not in OURS):
    try:
        importlib.import_module(name)
    except ImportError:  # an optional dependency that is not installed
        pass
filters, backend = list(warnings.filters), dict.__getitem__(matplotlib.rcParams, "backend")
imported = []
for top in OURS:
    package = importlib.import_module(top)
    imported.append(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend == "svg", matplotlib.rcParams["backend"]
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print(" ".join(imported))
"""


def test_imports_change_no_warning_filters_nor_matplotlib_backend() -> None:
    """A clean interpreter imports ``lightning_bn`` with every subpackage and module, ``study`` and ``examples``: the
    warning filters and matplotlib's backend (a non-default one, ``svg``, set by the user) are as they were."""
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = proc.stdout.split()
    for name in ("lightning_bn", "lightning_bn.callbacks.loss_landscape", "lightning_bn.sinks.heatmap", "study",
                 "study._parts", "study._train", "study.__main__", "examples.cnn", "examples.demo"):
        assert name in imported


def test_study_is_not_part_of_the_installed_package() -> None:
    """The wheel holds ``lightning_bn*`` only; the study, beside ``examples/``, is run from the repository root."""
    import lightning_bn

    assert not (Path(lightning_bn.__file__).parent / "study").exists()
    proc = subprocess.run([sys.executable, "-m", "study", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: python -m study" in proc.stdout and "--quick" in proc.stdout
