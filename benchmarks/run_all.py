"""Run every benchmark, then assemble BENCHMARKS.md from their result files.

    python -m benchmarks.run_all            # all benchmarks (several minutes on 2 cores), then BENCHMARKS.md
    python -m benchmarks.run_all --report   # only assemble BENCHMARKS.md from benchmarks/results/*.md

Each benchmark writes its own ``benchmarks/results/<name>.md`` (the machine, the exact command and a table of ratios
measured side by side in one run); this script only runs them and concatenates what they wrote.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = ["sync_bn", "recalibration", "overhead", "summaries", "writing"]

HEADER = """# Benchmarks

Measured, not asserted: every figure below was written by a script in `benchmarks/` on the machine it names,
with the command it names. Each compares variants side by side in one run and reports ratios; absolute times
depend on the machine. Re-run everything with `make bench` (or `python -m benchmarks.run_all`); one benchmark
with `python -m benchmarks.<name>`.
"""


def assemble() -> str:
    parts = [HEADER]
    for name in BENCHMARKS + sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in BENCHMARKS):
        path = RESULTS / f"{name}.md"
        if path.exists():
            parts.append(path.read_text().strip() + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only assemble BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not args.report:
        for name in BENCHMARKS:
            if (ROOT / "benchmarks" / f"{name}.py").exists():
                print(f"== benchmarks.{name}", flush=True)
                subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT, check=True)
    (ROOT / "BENCHMARKS.md").write_text(assemble())
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
