"""What the monitor's writing costs per call: TensorBoard's record checksum, drawing a heatmap, encoding it as PNG.

    python -m benchmarks.writing            # writes benchmarks/results/writing.md

Side by side in one process, one thread, median of ``--repeats`` calls each, as CPU time of the process and as wall
time (on a machine shared with other work, wall time includes waiting for a core):

* TensorBoard's masked CRC-32C (pure Python, in its writer thread, holding the GIL) of one step's scalar record: the
  monitor's scalars of one CNN example step (one real ``LayerStatsCollector`` collection), serialized as the single
  ``Summary`` ``TensorBoardSink`` writes;
* one heatmap drawn by ``render_heatmap`` (matplotlib): the CNN's 13 layers x 200 steps, and 60 layers of a
  transformer (BERT-style names, 12 blocks of 5) x 200 steps, on a linear and on a log colour scale;
* the 60-layer image made into TensorBoard's image record by ``torch.utils.tensorboard.summary.image`` (what
  ``SummaryWriter.add_image``, and so ``TensorBoardSink``, calls: Pillow's PNG at its default level), and encoded
  by Pillow alone at ``compress_level`` 6 (its default), 1 and 9, with the file sizes.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks._timing import median_ms

RESULTS = Path(__file__).resolve().parent / "results" / "writing.md"
STEPS = list(range(0, 10_000, 50))  # 200 logged steps, the monitor's default heatmap_max_steps


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


def transformer_layer_names(blocks: int = 12) -> list[str]:
    """60 watched layers of a BERT-style encoder (Hugging Face names), 5 per block."""
    parts = ("attention.self.query", "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
             "output.dense")
    return [f"bert.encoder.layer.{block}.{part}" for block in range(blocks) for part in parts]


def transformer_act_std(rows: int, cols: int) -> np.ndarray:
    """Activation stds that grow with depth over three decades, with a layer that dies half-way."""
    rng = np.random.default_rng(0)
    depth = np.linspace(-1.5, 1.5, rows)[:, None]
    values = 10 ** (depth + 0.2 * rng.standard_normal((rows, cols)) + np.linspace(0, 0.5, cols))
    values[7, cols // 2 :] = 0.0
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from PIL import Image
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from torch.utils.tensorboard.summary import image as image_record

    from lightning_bn.sinks import render_heatmap
    from lightning_bn.sinks.tensorboard_sink import scalar_summary

    scalars = _step_scalars()
    record = scalar_summary(scalars).SerializeToString()
    cnn_rows = [name.split("/", 2)[2] for name in scalars if name.startswith("act/std/")]
    cnn_values = np.random.default_rng(0).random((len(cnn_rows), len(STEPS)))
    names = transformer_layer_names()
    values = transformer_act_std(len(names), len(STEPS))
    image = render_heatmap(values, names, STEPS, title="heatmap/act/std", log_scale=True)

    def pillow_png(level: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    sizes = {level: len(pillow_png(level)) for level in (1, 6, 9)}
    sections = [
        ("checksum of one step's scalar record", [
            (f"TensorBoard's masked_crc32c (pure Python), {len(record)} bytes, {len(scalars)} scalars",
             lambda: masked_crc32c(record)),
        ]),
        (f"one heatmap of {len(STEPS)} steps drawn by render_heatmap (matplotlib)", [
            (f"CNN, {len(cnn_rows)} layers, linear scale",
             lambda: render_heatmap(cnn_values, cnn_rows, STEPS, title="heatmap/act/frac_zero")),
            (f"transformer, {len(names)} layers, linear scale",
             lambda: render_heatmap(values, names, STEPS, title="heatmap/act/std")),
            (f"transformer, {len(names)} layers, log scale",
             lambda: render_heatmap(values, names, STEPS, title="heatmap/act/std", log_scale=True)),
        ]),
        (f"the transformer's image ({image.shape[0]}x{image.shape[1]} RGB) encoded as PNG", [
            ("torch's summary.image (add_image's record: Pillow at its default level)",
             lambda: image_record("heatmap/act/std", image, dataformats="HWC")),
            (f"Pillow, compress_level=6 (its default), {sizes[6]} bytes", lambda: pillow_png(6)),
            (f"Pillow, compress_level=1, {sizes[1]} bytes", lambda: pillow_png(1)),
            (f"Pillow, compress_level=9, {sizes[9]} bytes", lambda: pillow_png(9)),
        ]),
    ]
    lines = []
    for title, variants in sections:
        timed = [(name, *median_ms(fn, args.repeats)) for name, fn in variants]
        ref = timed[0][1]
        lines += [f"| {title} | ms CPU | ms wall | x first (CPU) |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {cpu:.3f} | {wall:.3f} | {cpu / ref:.3f} |" for name, cpu, wall in timed]
        lines.append("")
    command = "python -m benchmarks.writing " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "## What the monitor's writing costs per call\n\n"
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, 1 thread; Python {platform.python_version()}.\n\n"
        f"Command: `{command.strip()}`\n\nMedian of {args.repeats} calls per row, rows of a table side by side in "
        "one process; CPU time of the process and wall time (wall includes waiting for a core on a shared machine). "
        "TensorBoard's writer thread checksums every record it writes with its pure-Python function while holding "
        "the GIL. `TensorBoardSink` writes heatmaps with `add_image`.\n\n"
        + "\n".join(lines)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
