"""Everything that needs a GPU, in one run of under 8 minutes: ``make gpu-check OUT=dir``.

    PYTHONPATH=. python scripts/gpu_check.py --out dir

1. ``python -m pytest -m cuda tests/test_cuda.py`` (SyncBatchNorm's CUDA kernels, torch.compile on CUDA,
   recalibration, the monitor's host synchronizations, AMP figures, a compiled model with the monitor);
2. ``python -m benchmarks.sync_bn --device cuda`` (our layer vs torch.nn.SyncBatchNorm and plain batch norm, 2
   processes on the one GPU over gloo);
3. the other benchmarks with ``--device cuda`` where their ``--help`` offers it (else the table says the row was not
   run).

Writes ``gpu_check.log`` (every command and its output) and ``gpu_check.md`` (a table of the checks, then the
benchmarks' tables) to the folder given. Needs no network. Exits non-zero when a check fails, and at once (with a
message saying so) on a machine where torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 450.0  # the whole run stays under 8 minutes with this and a margin for start-up
STAGE_LIMITS_S = {"pytest": 270.0, "sync_bn": 150.0}
# Other people's benchmarks, run on CUDA when they take --device: (module, extra arguments if their --help has them)
OTHER_BENCHMARKS = {
    "overhead": {"--models": ["cnn"], "--rounds": ["1"], "--cnn-steps": ["40"], "--warmup": ["5"]},
    "recalibration": {"--rounds": ["1"]},
}
# overhead.py variants that need no W&B (not installed on the GPU machine) and stay short
OVERHEAD_VARIANTS = ["baseline", "monitor/50", "monitor/1", "compiled", "compiled+monitor/50"]


@dataclass
class Row:
    check: str
    command: str
    result: str
    seconds: float
    ok: bool
    details: list[str] = field(default_factory=list)


class Run:
    def __init__(self, out: Path) -> None:
        self.out, self.start = out, time.monotonic()
        self.rows: list[Row] = []
        self.log = (out / "gpu_check.log").open("w")
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "disabled",
            "PYTHONUNBUFFERED": "1",
        }

    def left(self) -> float:
        return BUDGET_S - (time.monotonic() - self.start)

    def write(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def command(self, args: list[str], limit: float) -> tuple[int | None, str, float]:
        """Run ``args`` from the repository root; (exit status or None on timeout, output, seconds)."""
        self.write(f"\n$ {' '.join(args)}   (limit {limit:.0f}s)")
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                args, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=limit,
            )
            status, output = done.returncode, done.stdout
        except subprocess.TimeoutExpired as err:
            out = err.stdout or b""
            status, output = None, out.decode(errors="replace") if isinstance(out, bytes) else out
        seconds = time.monotonic() - t0
        self.write(output.rstrip())
        self.write(f"-> {'timed out' if status is None else f'exit {status}'} after {seconds:.0f}s")
        return status, output, seconds


def _pytest_summary(xml_path: Path) -> tuple[str, int]:
    """``("N passed, ...", passed)`` from pytest's JUnit report."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return "no report", 0
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "no report", 0
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed = total - failures - errors - skipped
    return f"{passed} passed, {failures} failed, {errors} errors, {skipped} skipped", passed


def _failed_tests(xml_path: Path) -> list[str]:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return []
    names = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            names.append(f"`{case.get('name')}`")
    return names


def run_pytest(run: Run) -> None:
    report = run.out / "pytest_cuda.xml"
    args = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rfE", "-p",
            "no:cacheprovider", f"--junitxml={report}"]
    status, _, seconds = run.command(args, min(STAGE_LIMITS_S["pytest"], run.left()))
    summary, passed = _pytest_summary(report)
    if status is None:
        summary = f"timed out ({summary})"
    failed = _failed_tests(report)
    # All skipped on a machine with a GPU means the tests did not see it: a failure of the check too.
    run.rows.append(Row("CUDA tests", "python -m pytest -m cuda tests/test_cuda.py", summary, seconds,
                        status == 0 and passed > 0, [f"failed: {', '.join(failed)}"] if failed else []))


def run_sync_bn(run: Run) -> None:
    output = run.out / "sync_bn_cuda.md"
    args = [sys.executable, "-m", "benchmarks.sync_bn", "--device", "cuda", "--steps", "20", "--rounds", "2",
            "--output", str(output)]
    status, _, seconds = run.command(args, min(STAGE_LIMITS_S["sync_bn"], run.left()))
    result = "written" if status == 0 and output.exists() else ("timed out" if status is None else f"exit {status}")
    run.rows.append(Row("sync_bn benchmark (CUDA)", "python " + " ".join(args[1:9]), result, seconds, status == 0))


def run_other_benchmark(run: Run, name: str) -> None:
    status, help_text, _ = run.command([sys.executable, "-m", f"benchmarks.{name}", "--help"], 60.0)
    command = f"python -m benchmarks.{name} --device cuda"
    if status != 0:
        run.rows.append(Row(f"{name} benchmark (CUDA)", command, "not run: its --help failed", 0.0, True))
        return
    if "--device" not in help_text:
        run.rows.append(Row(f"{name} benchmark (CUDA)", command, "not run: it takes no --device option", 0.0, True))
        return
    if run.left() < 60:
        run.rows.append(Row(f"{name} benchmark (CUDA)", command, "not run: no time left in the budget", 0.0, True))
        return
    args = [sys.executable, "-m", f"benchmarks.{name}", "--device", "cuda"]
    for option, values in OTHER_BENCHMARKS.get(name, {}).items():
        if option in help_text:
            args += [option, *values]
    if name == "overhead" and "--variants" in help_text:
        args += ["--variants", *[v for v in OVERHEAD_VARIANTS if v in help_text]]
    output = run.out / f"{name}_cuda.md"
    for option in ("--out", "--output"):
        if f"{option} " in help_text or f"{option}\n" in help_text or f"[{option}" in help_text:
            args += [option, str(output)]
            break
    status, _, seconds = run.command(args, run.left() - 15)
    result = "written" if status == 0 else ("timed out (budget)" if status is None else f"exit {status}")
    run.rows.append(Row(f"{name} benchmark (CUDA)", "python " + " ".join(args[1:]), result, seconds, status == 0))


def write_table(run: Run, device: str) -> bool:
    ok = all(row.ok for row in run.rows)
    import torch

    lines = [
        "# GPU check",
        "",
        f"- {device}; torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
        f"{platform.platform()}",
        f"- command: `make gpu-check OUT={run.out}`; total {time.monotonic() - run.start:.0f}s; "
        f"result: {'all checks passed' if ok else 'FAILED'}",
        "",
        "| check | command | result | time (s) |",
        "|---|---|---|---:|",
    ]
    for row in run.rows:
        flag = "" if row.ok else "**FAILED** "
        lines.append(f"| {row.check} | `{row.command}` | {flag}{row.result} | {row.seconds:.0f} |")
    for row in run.rows:
        for detail in row.details:
            lines.append(f"\n{row.check}: {detail}")
    for name in ("sync_bn", *OTHER_BENCHMARKS):
        table = run.out / f"{name}_cuda.md"
        if table.exists():
            lines += ["", table.read_text().replace("\n# ", "\n## ").replace("# ", "## ", 1).rstrip()]
    text = "\n".join(lines) + "\n"
    (run.out / "gpu_check.md").write_text(text)
    run.write("\n" + text)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.log and gpu_check.md")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        message = (
            f"gpu_check: no CUDA device here (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "nothing was run. Run `make gpu-check OUT=dir` on a machine with an NVIDIA GPU."
        )
        (args.out / "gpu_check.log").write_text(message + "\n")
        (args.out / "gpu_check.md").write_text(f"# GPU check\n\nNot run: {message}\n")
        print(message, file=sys.stderr)
        return 2
    device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
    run = Run(args.out)
    run.write(f"gpu_check on {device}, torch {torch.__version__}, budget {BUDGET_S:.0f}s")
    run_pytest(run)
    run_sync_bn(run)
    for name in OTHER_BENCHMARKS:
        if (ROOT / "benchmarks" / f"{name}.py").exists():
            run_other_benchmark(run, name)
    return 0 if write_table(run, device) else 1


if __name__ == "__main__":
    sys.exit(main())
