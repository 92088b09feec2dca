"""What one tensor summary costs on the CPU: torch's eager reductions against the one-pass C kernel.

    python -m benchmarks.summaries          # writes benchmarks/results/summaries.md

Side by side in one process, one thread, median of ``--repeats`` calls each, on a CNN example activation
(64 x 32 x 8 x 8 float32) and a transformer MLP activation (32 x 64 x 512 float32), both ReLU outputs:

* single torch reductions: the float ones the torch path uses (sum, dot, aminmax, sign) against the boolean ones it
  avoids (``(x == 0).sum()``, ``count_nonzero``);
* the six figures of ``lightning_bn.stats.summarize`` (``summary_row``) through the torch path and the C kernel;
* the six figures and a batch norm's per-channel sums: ``channel_moments`` plus ``summary_row`` from their totals
  (the torch path) against ``channel_summary`` (the C kernel, one pass).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.writing import _median_ms

RESULTS = Path(__file__).resolve().parent / "results" / "summaries.md"


@contextlib.contextmanager
def _torch_path() -> Iterator[None]:
    """The summaries as they run where the C kernel is not built."""
    import lightning_bn.stats._summary as summary_module

    kernels, summary_module.KERNELS = summary_module.KERNELS, None
    try:
        yield
    finally:
        summary_module.KERNELS = kernels


def _tables(label: str, shape: tuple[int, ...], repeats: int) -> list[str]:
    from lightning_bn.moments import channel_moments
    from lightning_bn.stats._summary import channel_summary, summary_row

    x = torch.randn(shape).relu_()
    scratch = torch.empty(x.numel())
    flat = x.reshape(-1)

    def torch_summary() -> object:
        with _torch_path():
            return summary_row(x, scratch=scratch)

    def torch_channels() -> object:
        with _torch_path():
            sums = channel_moments(x, 1)[1:]
            return summary_row(x, scratch=scratch, totals=sums.sum(1))

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
            ("summary_row, torch path", torch_summary),
            ("summary_row, C kernel", lambda: summary_row(x)),
        ]),
        ("the six figures and the per-channel sums", [
            ("channel_moments + summary_row(totals=...), torch path", torch_channels),
            ("channel_summary, C kernel", lambda: channel_summary(x, 1)),
        ]),
    ]
    lines = []
    for title, variants in sections:
        timed = [(name, 1e3 * _median_ms(fn, repeats)) for name, fn in variants]
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
    from lightning_bn.stats import summary_backend

    if summary_backend() != "c":
        raise SystemExit("lightning_bn._kernels is not built: nothing to compare (pip install -e . with a C compiler)")
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
        "one process, float32 ReLU outputs. The torch path is what runs where `lightning_bn._kernels` is not built "
        "(and, without the host reads, on an accelerator).\n\n" + "\n".join(lines)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
