"""What one tensor summary costs on the CPU: the monitor's torch reductions against the plain definitions.

    python -m benchmarks.summaries          # writes benchmarks/results/summaries.md

Side by side in one process, one thread, median of ``--repeats`` calls each, on a CNN example activation
(64 x 32 x 8 x 8 float32) and a transformer MLP activation (32 x 64 x 512 float32), both ReLU outputs:

* single torch reductions: the float ones the torch path uses (sum, dot, aminmax, sign) against the boolean ones it
  avoids (``(x == 0).sum()``, ``count_nonzero``);
* the six figures of ``lightning_bn.stats.summarize`` (``summary_row``) against their definition,
  ``lightning_bn.moments.tensor_summary`` (boolean masks for zeros and non-finite values);
* the six figures and a batch norm's per-channel sums: ``channel_moments`` plus ``summary_row`` from their totals
  against ``channel_moments`` plus a full ``summary_row``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks._timing import median_ms

RESULTS = Path(__file__).resolve().parent / "results" / "summaries.md"


def _tables(label: str, shape: tuple[int, ...], repeats: int) -> list[str]:
    from lightning_bn.moments import channel_moments, tensor_summary
    from lightning_bn.stats._summary import summary_row

    x = torch.randn(shape).relu_()
    scratch = torch.empty(x.numel())
    flat = x.reshape(-1)

    def channels_shared() -> object:
        sums = channel_moments(x, 1)[1:]
        return summary_row(x, scratch=scratch, totals=sums.sum(1))

    def channels_apart() -> object:
        channel_moments(x, 1)
        return summary_row(x, scratch=scratch)

    sections: list[tuple[str, list[tuple[str, Callable[[], object]]]]] = [
        ("single torch reductions", [
            ("x.sum()", flat.sum),
            ("torch.dot(x, x)", lambda: torch.dot(flat, flat)),
            ("torch.aminmax(x)", lambda: torch.aminmax(flat)),
            ("torch.sign(x, out=buffer)", lambda: torch.sign(flat, out=scratch)),
            ("(x == 0).sum()", lambda: (flat == 0).sum()),
            ("torch.count_nonzero(x)", lambda: torch.count_nonzero(flat)),
        ]),
        ("the six figures", [
            ("summary_row", lambda: summary_row(x, scratch=scratch)),
            ("moments.tensor_summary (the definition)", lambda: tensor_summary(x)),
        ]),
        ("the six figures and the per-channel sums", [
            ("channel_moments + summary_row(totals=...)", channels_shared),
            ("channel_moments + summary_row", channels_apart),
        ]),
    ]
    lines = []
    for title, variants in sections:
        timed = [(name, 1e3 * median_ms(fn, repeats)[1]) for name, fn in variants]  # wall time
        ref = timed[0][1]
        lines += [f"| {label} {tuple(shape)}: {title} | us per call | x first |", "|---|---:|---:|"]
        lines += [f"| {name} | {us:.1f} | {us / ref:.3f} |" for name, us in timed]
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = []
    for label, shape in (("CNN activation", (64, 32, 8, 8)), ("transformer MLP activation", (32, 64, 512))):
        lines += _tables(label, shape, args.repeats)
    command = "python -m benchmarks.summaries " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "## What one tensor summary costs on the CPU\n\n"
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, 1 thread; Python {platform.python_version()}.\n\n"
        f"Command: `{command.strip()}`\n\nMedian of {args.repeats} calls per row, rows of a table side by side in "
        "one process, float32 ReLU outputs.\n\n" + "\n".join(lines)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
