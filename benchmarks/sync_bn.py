"""Synchronized batch norm: training-step time under DDP, side by side with plain batch norm and torch's layer.

    python -m benchmarks.sync_bn                      # 2 CPU processes over gloo, writes benchmarks/results/sync_bn.md
    python -m benchmarks.sync_bn --steps 20 --rounds 3
    python -m benchmarks.sync_bn --device cuda        # 2 processes on one GPU over gloo, vs torch.nn.SyncBatchNorm
                                                      # (writes benchmarks/results/sync_bn_cuda.md)

Each of 2 processes holds the CNN example's network (``examples.cnn.ResNetDigits``, 6 batch-norm layers) wrapped in
torch's ``DistributedDataParallel``; one training step is forward, cross-entropy, backward (gradient all-reduce
included) and an SGD step. The variants run in the same processes, interleaved round by round so that they see the
same machine load:

* ``plain`` -- the model as built (``nn.BatchNorm2d``: each process normalizes with its own batch);
* ``ours`` -- the same model after ``SyncNormPlugin().apply`` (what the Trainer does when fitting starts); on CUDA
  this is the fused path (torch's batch-norm kernels);
* ``ours, portable`` (CUDA only) -- our layer with the fused path switched off (the computation it runs on CPU
  and under ``torch.compile``);
* ``torch`` (CUDA only) -- ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (its layer only runs on GPUs).

A second table times one batch-norm layer alone (forward + backward). Times are medians; ratios are of medians. On
CPU the inputs are the 8x8 digits scikit-learn ships; on CUDA random 32x32 images (no data set needed, the
timings do not depend on the values). Both processes share the one GPU, over gloo, as the GPU check runs it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from examples.cnn import CNNConfig, ResNetDigits
from lightning_bn.layers import SyncBatchNorm
from lightning_bn.plugins import SyncNormPlugin
from tests.dist import run_distributed

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"cpu": ("plain", "ours"), "cuda": ("plain", "ours", "ours, portable", "torch")}
# (numerator, denominator) of each ratio column
RATIOS = {
    "cpu": (("ours", "plain"),),
    "cuda": (("ours", "torch"), ("ours", "plain"), ("torch", "plain"), ("ours, portable", "ours")),
}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_steps(step: Callable[[], None], steps: int, device: str) -> float:
    """Median seconds of ``steps`` calls of ``step`` (after it has warmed up), the device's queue drained each time."""
    times = []
    for _ in range(steps):
        _synchronize(device)
        t0 = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _portable(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with our layer's fused CUDA path switched off for its duration."""
    from lightning_bn.layers import _sync

    def run() -> None:
        saved, _sync._FUSED_DEVICE_TYPES = _sync._FUSED_DEVICE_TYPES, ()
        try:
            step()
        finally:
            _sync._FUSED_DEVICE_TYPES = saved

    return run


def _train_step(ddp: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    return step


def _layer_step(layer: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer(inp).square().sum().backward()

    return step


def _network(variant: str, width: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    net = ResNetDigits(CNNConfig(norm="batch", width=width))
    if variant in ("ours", "ours, portable"):
        SyncNormPlugin().apply(net)
        assert any(isinstance(m, SyncBatchNorm) for m in net.modules())
    elif variant == "torch":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net.to(device)


def _layer(variant: str, channels: int, device: str) -> nn.Module:
    layer = {"plain": nn.BatchNorm2d, "torch": nn.SyncBatchNorm}.get(variant, SyncBatchNorm)(channels)
    return layer.to(device)


def _inputs(device: str, batch: int, image: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    if device == "cpu":
        from examples.cnn import load_digits_tensors

        x_all, y_all = load_digits_tensors()
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        return x_all[idx], y_all[idx]
    x = torch.randn(batch, 1, image, image, generator=g)
    return x.to(device), torch.randint(0, 10, (batch,), generator=g).to(device)


def _interleaved(step_fns: dict[str, Callable[[], None]], steps: int, rounds: int, device: str) -> dict[str, float]:
    medians: dict[str, list[float]] = {name: [] for name in step_fns}
    for fn in step_fns.values():  # warm-up
        _time_steps(fn, 5, device)
    for _ in range(rounds):
        for name, fn in step_fns.items():
            medians[name].append(_time_steps(fn, steps, device))
    return {name: statistics.median(values) for name, values in medians.items()}


def _bench(
    rank: int, world_size: int, device: str, batch_sizes: list[int], width: int, image: int, steps: int, rounds: int
) -> dict:
    if device == "cuda":
        torch.cuda.set_device(0)  # both processes on the one GPU
    variants = VARIANTS[device]
    results: dict = {}
    for batch in batch_sizes:
        x, y = _inputs(device, batch, image, rank)
        train_steps = {}
        for name in variants:
            net = _network(name, width, device)
            ddp = DistributedDataParallel(net, device_ids=[0] if device == "cuda" else None)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
            step = _train_step(ddp, opt, x, y)
            train_steps[name] = _portable(step) if name == "ours, portable" else step
        results[("step", batch)] = _interleaved(train_steps, steps, rounds, device)

        # One layer alone: (B, 2w, s, s), the second stage's shape, forward + backward.
        side = 8 if device == "cpu" else image // 2
        g = torch.Generator().manual_seed(rank)
        inp = torch.randn(batch, 2 * width, side, side, generator=g).to(device).requires_grad_(True)
        layer_steps = {}
        for name in variants:
            step = _layer_step(_layer(name, 2 * width, device), inp)
            layer_steps[name] = _portable(step) if name == "ours, portable" else step
        results[("layer", batch)] = _interleaved(layer_steps, steps, rounds, device)
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    return results


def _moments_cost(batch_sizes: list[int], channels: int, steps: int, rounds: int) -> dict[int, dict[str, float]]:
    """Forward + backward of the statistics alone, one process, one thread: the one-pass float32 sums against the
    shifted sums the portable path uses (the price of keeping the variance when ``|mean| >> std``)."""
    from lightning_bn.moments import channel_moments, shifted_channel_moments

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for batch in batch_sizes:
            x = torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
            fns = {"one-pass": _layer_step(partial(channel_moments, channel_dim=1), x),
                   "shifted": _layer_step(partial(shifted_channel_moments, channel_dim=1), x)}
            out[batch] = _interleaved(fns, steps, rounds, "cpu")
        return out
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="samples per process")
    parser.add_argument("--width", type=int, default=None, help="CNN width (default: 32 on CPU, 64 on CUDA)")
    parser.add_argument("--image", type=int, default=32, help="image side on CUDA (random images)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 5 on CPU, 3 on CUDA)")
    parser.add_argument("--output", type=Path, default=None, help="results file (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.sync_bn --device cuda needs a CUDA device, and torch sees none on this machine")
    width = args.width or (32 if args.device == "cpu" else 64)
    rounds = args.rounds or (5 if args.device == "cpu" else 3)
    output = args.output or RESULTS / ("sync_bn.md" if args.device == "cpu" else "sync_bn_cuda.md")

    per_rank = run_distributed(
        _bench, 2, args.device, args.batch_sizes, width, args.image, args.steps, rounds, timeout=1800
    )
    variants, ratios = VARIANTS[args.device], RATIOS[args.device]
    command = "python -m benchmarks.sync_bn " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu":
        load = os.getloadavg()
        machine = (
            f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
            f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, 1/5/15 min, this run included)"
        )
        where, data = "2 processes over gloo on 127.0.0.1, 1 thread each", "8x8 digits"
    else:
        machine = f"{per_rank[0]['gpu']}, {platform.platform()}, {os.cpu_count()} CPU cores"
        where, data = "2 processes on the one GPU over gloo", f"random {args.image}x{args.image} images"
    title = "plain batch norm vs SyncNormPlugin" + (" vs torch.nn.SyncBatchNorm" if args.device == "cuda" else "")
    lines = [
        f"# Synchronized batch norm ({args.device}): DDP training step, {title}",
        "",
        f"- machine: {machine}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {where}",
        f"- command: `{command.strip()}`",
        f"- CNN example (ResNetDigits, width {width}, 6 batch-norm layers) on {data}, DDP, SGD; median of "
        f"{args.steps} steps per round, median over {rounds} interleaved rounds, slower process",
        "",
        "| what | batch per process | " + " | ".join(f"{v} (ms)" for v in variants) + " | "
        + " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
        "|---|---:|" + "---:|" * (len(variants) + len(ratios)),
    ]
    side = 8 if args.device == "cpu" else args.image // 2
    for key in (k for k in per_rank[0] if isinstance(k, tuple)):
        kind, batch = key
        # A step ends when the slower process ends: take the larger of the two processes' medians.
        times = {v: max(r[key][v] for r in per_rank) for v in variants}
        what = "training step (fwd+bwd+SGD)" if kind == "step" else f"one layer fwd+bwd ({2 * width} ch, {side}x{side})"
        cells = [f"{times[v] * 1e3:.2f}" for v in variants] + [f"{times[a] / times[b]:.2f}x" for a, b in ratios]
        lines.append(f"| {what} | {batch} | " + " | ".join(cells) + " |")
    lines += [""]
    if args.device == "cpu":
        cost = _moments_cost(args.batch_sizes, 2 * width, args.steps, rounds)
        lines += [
            f"The statistics alone ({2 * width} channels, 8x8, forward + backward, one process, one thread):",
            "",
            "| batch | one-pass float32 sums (ms) | shifted sums (ms) | ratio |",
            "|---:|---:|---:|---:|",
        ]
        for batch, times in cost.items():
            lines.append(f"| {batch} | {times['one-pass'] * 1e3:.2f} | {times['shifted'] * 1e3:.2f} | "
                         f"{times['shifted'] / times['one-pass']:.2f}x |")
        lines += [""]
        lines += [
            "Target: a training step at most 1.3x plain batch norm. The synchronized step adds one all-reduce of a",
            "(3, C) float64 tensor per batch-norm layer in the forward and one in the backward (12 small gloo",
            "collectives per step here: on 2 shared cores their latency is most of the added time at the smaller",
            "batch, and it varies from run to run), and computes the statistics from sums shifted by each",
            "process's mean (the second table: what keeping the variance of channels with |mean| >> std costs).",
            "CUDA rows (`--device cuda`, against torch.nn.SyncBatchNorm): sync_bn_cuda.md, where a GPU ran them.",
        ]
    else:
        lines += [
            "`ours / torch` compares our fused path with torch.nn.SyncBatchNorm (the same kernels; we gather with",
            "counts and sort the rows on the device where torch masks them on the host). `ours, portable / ours` is",
            "what the fused path saves over the portable computation (used on CPU and under torch.compile).",
        ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
