"""What the monitor's writing costs per call: TensorBoard record checksums, heatmap rendering and PNG encoding.

    python -m benchmarks.writing            # writes benchmarks/results/writing.md

Side by side in one process, one thread, median of ``--repeats`` calls each:

* the masked CRC-32C of one step's scalar record: the monitor's scalars of one CNN example step (one real
  ``LayerStatsCollector`` collection, serialized as the single ``Summary`` ``TensorBoardSink`` writes), checksummed by
  TensorBoard's own pure-Python function and by ``lightning_bn.sinks.checksum.masked_crc32c`` (C, ``google-crc32c``);
* one heatmap (13 layers x 200 steps, the CNN's layer names) drawn by ``render_heatmap`` with Pillow (cached glyph
  masks) and with matplotlib;
* that image encoded as PNG by ``encode_png`` (no row filter, zlib level 1), by Pillow's encoder at its default
  level, and by ``torch.utils.tensorboard.summary.make_image`` (what ``SummaryWriter.add_image`` calls).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "writing.md"


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _step_scalars() -> dict[str, float]:
    from examples.cnn import CNN
    from lightning_bn.stats import LayerStatsCollector, select_modules

    torch.manual_seed(0)
    model = CNN()
    collector = LayerStatsCollector(select_modules(model))
    collector.attach()
    model(torch.randn(64, 1, 8, 8)).logsumexp(1).mean().backward()
    collector.record_params()
    collector.record_updates()
    collector.detach()
    return collector.finalize().scalars


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from PIL import Image
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_crc
    from torch.utils.tensorboard.summary import make_image

    from lightning_bn.sinks import render_heatmap
    from lightning_bn.sinks.checksum import masked_crc32c
    from lightning_bn.sinks.tensorboard_sink import encode_png, scalar_summary

    scalars = _step_scalars()
    record = scalar_summary(scalars).SerializeToString()
    assert masked_crc32c(record) == tensorboard_crc(record)
    rows = [name.split("/", 2)[2] for name in scalars if name.startswith("act/std/")]
    values = np.random.default_rng(0).random((len(rows), 200))
    steps = list(range(0, 200))
    image = render_heatmap(values, rows, steps, title="heatmap/act/std", backend="pillow")

    def pillow_png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    sections = [
        ("checksum of one step's scalar record", [
            (f"TensorBoard's masked_crc32c (pure Python), {len(record)} bytes, {len(scalars)} scalars",
             lambda: tensorboard_crc(record)),
            ("lightning_bn.sinks.checksum.masked_crc32c (google-crc32c, C)", lambda: masked_crc32c(record)),
        ]),
        (f"one heatmap, {len(rows)} layers x {len(steps)} steps, drawn", [
            ("render_heatmap, matplotlib",
             lambda: render_heatmap(values, rows, steps, title="heatmap/act/std", backend="matplotlib")),
            ("render_heatmap, pillow (cached glyph masks)",
             lambda: render_heatmap(values, rows, steps, title="heatmap/act/std", backend="pillow")),
        ]),
        (f"that image ({image.shape[0]}x{image.shape[1]} RGB) encoded as PNG", [
            ("torch's make_image (add_image's encoder: resample + Pillow PNG)", lambda: make_image(image)),
            ("Pillow PNG, default level", pillow_png),
            (f"encode_png, zlib level 1 ({len(encode_png(image))} bytes vs Pillow's {len(pillow_png())})",
             lambda: encode_png(image)),
        ]),
    ]
    lines = []
    for title, variants in sections:
        timed = [(name, _median_ms(fn, args.repeats)) for name, fn in variants]
        ref = timed[0][1]
        lines += [f"| {title} | ms per call | x first |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.3f} | {ms / ref:.3f} |" for name, ms in timed]
        lines.append("")
    command = "python -m benchmarks.writing " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "## What the monitor's writing costs per call\n\n"
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, 1 thread; Python {platform.python_version()}.\n\n"
        f"Command: `{command.strip()}`\n\nMedian of {args.repeats} calls per row, rows of a table side by side in "
        "one process. TensorBoard's writer thread checksums every record it writes with its pure-Python function "
        "while holding the GIL; `TensorBoardSink` puts the C one in its place (same bytes).\n\n" + "\n".join(lines)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
