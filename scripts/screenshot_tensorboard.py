"""Take the README's TensorBoard screenshot: serve the demo's logs with a real TensorBoard, capture the page headless.

    python scripts/screenshot_tensorboard.py --logdir demo_logs --out docs/tensorboard_custom_scalars.png
    python scripts/screenshot_tensorboard.py --dashboard images --out docs/tensorboard_heatmaps.png

Needs Chromium (Debian: ``apt-get install chromium``). TensorBoard is started from this interpreter on 127.0.0.1
with a free port and stopped at the end; Chromium runs headless with a throw-away profile and no background
networking, and renders the page for ``--wait`` seconds of virtual time before the capture.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int, timeout: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as r:
                if json.load(r):
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"tensorboard did not serve {logdir} within {timeout}s")


def screenshot(url: str, out: Path, width: int, height: int, wait_s: float) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("Chromium not found: install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             f"--virtual-time-budget={int(wait_s * 1000)}", f"--screenshot={out.resolve()}", url],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, default=Path("demo_logs"))
    parser.add_argument("--out", type=Path, default=Path("docs/tensorboard_custom_scalars.png"))
    parser.add_argument("--dashboard", default="custom_scalars", help="custom_scalars, scalars, histograms, images")
    parser.add_argument("--runs", nargs="*", default=[],
                        help="runs to show, as paths under --logdir (e.g. cnn/batch); default: all")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--wait", type=float, default=20.0, help="seconds of virtual time to render")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        raise SystemExit(f"--logdir {args.logdir} does not exist: run `make demo` first")
    with tempfile.TemporaryDirectory() as selected:
        logdir = args.logdir
        if args.runs:  # serve a copy holding only the chosen runs
            for run in args.runs:
                if not (args.logdir / run).is_dir():
                    raise SystemExit(f"--runs {run}: no such run under {args.logdir}")
                shutil.copytree(args.logdir / run, Path(selected) / run)
            logdir = Path(selected)
        capture(args, logdir)
    print(f"wrote {args.out} ({args.dashboard} of {args.logdir} {' '.join(args.runs)})")


def capture(args: argparse.Namespace, logdir: Path) -> None:
    port = free_port()
    proc = start_tensorboard(logdir, port)
    try:
        url = f"http://127.0.0.1:{port}/#{args.dashboard}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(url, args.out, args.width, args.height, args.wait)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
