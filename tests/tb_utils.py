"""End-to-end readers for what the package writes to TensorBoard and W&B: real files, a real server, no mocks.

Reusable by any test (``from tests.tb_utils import ...``):

TensorBoard event files (read with TensorBoard's own ``EventAccumulator``), ``run_dir`` being a directory that holds
``events.out.tfevents.*`` files (e.g. ``TensorBoardLogger(...).log_dir``):

* ``load_tb_run(run_dir) -> EventAccumulator``: everything in the run, nothing down-sampled.
* ``read_tb_scalars(run_dir) -> {tag: [(step, value), ...]}``
* ``read_tb_histograms(run_dir) -> {tag: [(step, HistogramValue), ...]}`` (fields ``min``, ``max``, ``num``,
  ``sum``, ``sum_squares``, ``bucket_limit``, ``bucket``).
* ``read_tb_images(run_dir) -> {tag: [(step, uint8 array of shape (H, W, C)), ...]}`` (PNG decoded with Pillow).
* ``read_tb_custom_scalars(run_dir) -> {category: {chart title: [tag regex, ...]}}`` (the custom-scalars layout).

A real TensorBoard server (``python -m tensorboard.main`` from this interpreter, bound to 127.0.0.1 on a free port):

* ``start_tensorboard(logdir, timeout=60) -> (proc, base_url)``: returns once ``/data/runs`` answers; raises
  ``RuntimeError`` with the server's output if it exits or does not answer within ``timeout`` seconds.
* ``stop_tensorboard(proc)``: terminate, then kill after 10 s. Call it in a ``finally`` block, or use
* ``tensorboard_server(logdir)``: a context manager yielding ``base_url`` and always stopping the server.
* ``get_json(base_url, path, params=None)``: GET a data route, e.g. ``/data/plugin/scalars/tags``.
* ``poll_json(base_url, path, until, timeout=60, params=None)``: GET until ``until(answer)`` is true (the server
  loads event files in the background), return the answer; raise ``TimeoutError`` with the last answer otherwise.

W&B offline runs (``WANDB_MODE=offline``; read from the run's own ``.wandb`` transaction log, a LevelDB-style log of
``wandb_internal_pb2.Record`` messages, since offline runs write no ``wandb-summary.json``):

* ``find_wandb_offline_runs(root) -> [run_dir, ...]``: the ``offline-run-*`` directories under ``root/wandb``
  (or under ``root`` itself), oldest first.
* ``read_wandb_records(wandb_file) -> [Record, ...]``: every record, checksums verified.
* ``read_wandb_offline_run(run_dir) -> {"run_id", "project", "history", "summary", "config", "files_dir"}``:
  ``history`` is one dict per ``log`` call (nested keys such as a histogram's ``{"_type", "values", "bins"}``
  rebuilt), ``summary`` the last value of every key, ``config`` the run's config.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tests.dist import free_port

__all__ = [
    "find_wandb_offline_runs",
    "get_json",
    "load_tb_run",
    "poll_json",
    "read_tb_custom_scalars",
    "read_tb_histograms",
    "read_tb_images",
    "read_tb_scalars",
    "read_wandb_offline_run",
    "read_wandb_records",
    "start_tensorboard",
    "stop_tensorboard",
    "tensorboard_server",
]


# ---------------------------------------------------------------------------------------------------------------------
# TensorBoard event files


def load_tb_run(run_dir: str | os.PathLike) -> Any:
    """TensorBoard's ``EventAccumulator`` over ``run_dir`` with every event kept (no reservoir down-sampling)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event files in {run_dir}")
    keep_all = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0, ea.COMPRESSED_HISTOGRAMS: 0}
    accumulator = ea.EventAccumulator(str(run_dir), size_guidance=keep_all)
    accumulator.Reload()
    return accumulator


def read_tb_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    acc = load_tb_run(run_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tb_histograms(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, Any]]]:
    acc = load_tb_run(run_dir)
    return {tag: [(e.step, e.histogram_value) for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]}


def read_tb_images(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, np.ndarray]]]:
    from PIL import Image

    acc = load_tb_run(run_dir)
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for tag in acc.Tags()["images"]:
        out[tag] = [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(tag)]
    return out


def read_tb_custom_scalars(run_dir: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """The last custom-scalars layout written to the run, as ``{category: {chart title: [regex, ...]}}``."""
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = load_tb_run(run_dir)
    if metadata.CONFIG_SUMMARY_TAG not in acc.Tags()["tensors"]:
        return {}
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[-1].tensor_proto.string_val[0])
    return {
        category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
        for category in layout.category
    }


# ---------------------------------------------------------------------------------------------------------------------
# A real TensorBoard server


def get_json(base_url: str, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
    url = base_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode())


def poll_json(
    base_url: str,
    path: str,
    until: Callable[[Any], bool],
    timeout: float = 60.0,
    params: dict[str, str] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    answer: Any = None
    while True:
        answer = get_json(base_url, path, params)
        if until(answer):
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not reach the expected state within {timeout} s; last answer: {answer!r}")
        time.sleep(0.5)


def start_tensorboard(logdir: str | os.PathLike, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_file = Path(logdir).parent / f"tensorboard-{port}.log"
    command = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--reload_interval",
        "1",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tensorboard exited with {proc.returncode}:\n{log_file.read_text()[-4000:]}")
            try:
                get_json(base_url, "/data/runs", timeout=2.0)
                return proc, base_url
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensorboard did not answer on {base_url} within {timeout} s:\n{log_file.read_text()[-4000:]}"
                )
            time.sleep(0.25)
    except BaseException:
        stop_tensorboard(proc)
        raise


def stop_tensorboard(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def tensorboard_server(logdir: str | os.PathLike, timeout: float = 60.0) -> Iterator[str]:
    proc, base_url = start_tensorboard(logdir, timeout)
    try:
        yield base_url
    finally:
        stop_tensorboard(proc)


# ---------------------------------------------------------------------------------------------------------------------
# W&B offline runs

_WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK_SIZE = 32 * 1024
_RECORD_HEADER = 7  # crc32 (4 bytes), length (2), chunk type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_wandb_offline_runs(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    base = root / "wandb" if (root / "wandb").is_dir() else root
    return sorted(base.glob("offline-run-*"), key=lambda p: p.name)


def read_wandb_records(wandb_file: str | os.PathLike) -> list[Any]:
    """Every ``Record`` in a ``.wandb`` file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = Path(wandb_file).read_bytes()
    if not data.startswith(_WANDB_HEADER):
        raise ValueError(f"{wandb_file} does not start with the W&B log header")
    records, pending, pos = [], b"", len(_WANDB_HEADER)
    while pos + _RECORD_HEADER <= len(data):
        room = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if room < _RECORD_HEADER:  # the writer pads the tail of a block that cannot hold a chunk header
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        chunk = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 0 and length == 0:
            continue
        if len(chunk) != length or zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{wandb_file}: corrupt chunk at byte {pos - length - _RECORD_HEADER}")
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{wandb_file}: unknown chunk type {kind}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _items_to_dict(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def read_wandb_offline_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .wandb file in {run_dir}, found {[f.name for f in files]}")
    run: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "files_dir": run_dir / "files"}
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["run_id"], run["project"] = record.run.run_id, record.run.project
            run["config"].update(_items_to_dict(record.run.config.update))
        elif kind == "config":
            run["config"].update(_items_to_dict(record.config.update))
        elif kind == "history":
            row = _items_to_dict(record.history.item)
            run["history"].append(row)
            run["summary"].update(row)
    return run
