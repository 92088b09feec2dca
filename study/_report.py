"""Run the parts and write the Markdown report (``study.md``) next to its figures."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from study._config import SIZES
from study._parts import PARTS, Section
from study._train import quiet

__all__ = ["main", "run_study"]


def _log(message: str) -> None:
    print(message, flush=True)


def run_study(
    size: str = "full", out: str | Path = "docs", parts: Sequence[str] | None = None, threads: int | None = None,
    command: str | None = None,
) -> Path:
    """Run the study at ``size`` (``full``, ``quick`` or ``smoke``) and write ``<out>/study.md`` and its PNGs.

    Args:
        size: one of :data:`study.SIZES`.
        out: the report's folder (created).
        parts: a subset of ``lr``, ``batch_size``, ``moving_average``, ``landscape``, ``transformer`` (default all).
        threads: ``torch.set_num_threads`` during the runs (default 1: the models are small, and one thread per run
            keeps the timings steady on a shared machine); the previous number is restored at the end.
        command: the command line written into the report (default: reconstructed from ``sys.argv``).

    Returns:
        The path of the report.

    Raises:
        ValueError: an unknown ``size`` or part.
    """
    if size not in SIZES:
        raise ValueError(f"`size` must be one of {', '.join(SIZES)}, got {size!r}")
    chosen = list(PARTS) if parts is None else list(parts)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown or not chosen:
        raise ValueError(f"`parts` takes names among {', '.join(PARTS)}, got {list(parts or [])!r}")
    cfg = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    used_threads = torch.get_num_threads()
    try:
        with quiet():  # warning filters and logger levels as before once the runs end
            for name in chosen:
                _log(f"[{size}] part {name} ...")
                t0 = time.perf_counter()
                section = PARTS[name](cfg, out, _log)
                section.seconds = time.perf_counter() - t0
                sections.append(section)
                _log(f"[{size}] part {name} done in {section.seconds:.0f} s")
    finally:
        torch.set_num_threads(threads_before)
    total = time.perf_counter() - start
    command = command or "python -m study " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = out / "study.md"
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    report.write_text(render(sections, cfg.name, command.strip(), total, (load_start, load_end), used_threads))
    _log(f"report: {report} ({total:.0f} s)")
    return report


def render(
    sections: Sequence[Section], size: str, command: str, total: float, load: tuple[float, float] = (0.0, 0.0),
    threads: int | None = None,
) -> str:
    lines = [
        "# The normalization study",
        "",
        "Published batch-norm findings, re-measured at small scale on data that works offline (scikit-learn's "
        "digits, the text of `pydoc_data.topics`) with the package's own layers, callbacks and functions "
        "(`build_norm` kinds, `recalibrate_bn`, `LayerStatsMonitor`, `LossLandscapeProbe`). Every number and figure "
        "below was produced by the command that follows; the sentences marked **Agreement** are chosen by those "
        "numbers. The scale is tiny next to the papers' (an 8x8-pixel ResNet and a character transformer on 2 CPU "
        "cores), so an effect may be absent here for reasons of scale alone.",
        "",
        f"- Command: `{command}` (size `{size}`), run from the repository root",
        f"- Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(1-minute load average {load[0]:.1f} at the start and {load[1]:.1f} at the end: other jobs shared them), "
        f"{threads or torch.get_num_threads()} torch thread(s); Python "
        f"{platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}",
        f"- Wall time: {total / 60:.1f} min in all ("
        + ", ".join(f"part {s.title.split('.')[0]}: {s.seconds / 60:.1f} min" for s in sections) + ")",
        "",
    ]
    for section in sections:
        lines += [f"## {section.title}", ""]
        at = section.figure_at or [len(section.text)] * len(section.figures)
        for i, line in enumerate([*section.text, None]):
            for (name, caption), position in zip(section.figures, at):
                if position == i:
                    lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
            if line is not None:
                lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line: ``python -m study [--quick | --smoke] [--out DIR] [--parts a,b]``."""
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-sized: one seed, small grids (about a minute)")
    size.add_argument("--smoke", action="store_true", help="a few steps per run (for the tests)")
    parser.add_argument("--out", default="docs", help="folder of study.md and its PNGs (default: docs)")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    chosen = "smoke" if args.smoke else "quick" if args.quick else "full"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()] if args.parts else None
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m study " + " ".join(shlex.quote(a) for a in argv_list)
    return run_study(chosen, args.out, parts, args.threads, command)
