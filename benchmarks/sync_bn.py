"""Synchronized batch norm: training-step time under DDP, plain batch norm vs SyncNormPlugin, side by side.

    python -m benchmarks.sync_bn                      # 2 CPU processes over gloo, writes benchmarks/results/sync_bn.md
    python -m benchmarks.sync_bn --steps 20 --rounds 3

Each of 2 processes holds the CNN example (``examples.cnn``, a small ResNet on 8x8 digits) wrapped in torch's
``DistributedDataParallel``; one training step is forward, cross-entropy, backward (gradient all-reduce included)
and an SGD step. The variants run in the same processes, interleaved round by round so that both see the same
machine load: ``plain`` is the model as built (``nn.BatchNorm2d``, each process normalizes with its own batch),
``sync`` is the same model after ``SyncNormPlugin().apply`` (what the Trainer does when fitting starts). A second
table times one batch-norm layer alone (forward + backward). Ratios are ``sync / plain`` of the medians.

On a GPU (not run by this script): the comparison with ``torch.nn.SyncBatchNorm``'s CUDA kernels over NCCL needs
a machine with one; see the results file for what was run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from examples.cnn import CNNConfig, ResNetDigits, load_digits_tensors
from lightning_bn.layers import SyncBatchNorm
from lightning_bn.plugins import SyncNormPlugin
from tests.dist import run_distributed

RESULTS = Path(__file__).resolve().parent / "results" / "sync_bn.md"


def _time_steps(step, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``step`` (after it has warmed up)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_step(ddp: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    return step


def _layer_step(layer: nn.Module, inp: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer(inp).square().sum().backward()

    return step


def _bench(rank: int, world_size: int, batch_sizes: list[int], width: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    x_all, y_all = load_digits_tensors()
    results: dict = {}
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(rank)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x, y = x_all[idx], y_all[idx]
        models = {}
        for name in ("plain", "sync"):
            torch.manual_seed(0)
            net = ResNetDigits(CNNConfig(norm="batch", width=width))
            if name == "sync":
                SyncNormPlugin().apply(net)
                assert any(isinstance(m, SyncBatchNorm) for m in net.modules())
            ddp = DistributedDataParallel(net)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
            models[name] = (ddp, opt)

        train_steps = {name: _train_step(ddp, opt, x, y) for name, (ddp, opt) in models.items()}

        medians: dict[str, list[float]] = {"plain": [], "sync": []}
        for name in medians:  # warm-up
            _time_steps(train_steps[name], 5)
        for _ in range(rounds):
            for name in medians:
                medians[name].append(_time_steps(train_steps[name], steps))
        results[("step", batch)] = {k: statistics.median(v) for k, v in medians.items()}

        # One layer alone: (B, C, 8, 8) float32, forward + backward.
        channels = 2 * width
        layers = {"plain": nn.BatchNorm2d(channels), "sync": SyncBatchNorm(channels)}
        inp = torch.randn(batch, channels, 8, 8, generator=g, requires_grad=True)

        layer_steps = {name: _layer_step(layer, inp) for name, layer in layers.items()}

        layer_medians: dict[str, list[float]] = {"plain": [], "sync": []}
        for name in layer_medians:
            _time_steps(layer_steps[name], 5)
        for _ in range(rounds):
            for name in layer_medians:
                layer_medians[name].append(_time_steps(layer_steps[name], steps))
        results[("layer", batch)] = {k: statistics.median(v) for k, v in layer_medians.items()}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="samples per process")
    parser.add_argument("--width", type=int, default=32, help="CNN width (channels of the first stage)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    per_rank = run_distributed(
        _bench, 2, args.batch_sizes, args.width, args.steps, args.rounds, timeout=1800
    )
    rows = []
    for key in per_rank[0]:
        # A step ends when the slower process ends: take the larger of the two processes' medians.
        plain = max(r[key]["plain"] for r in per_rank)
        sync = max(r[key]["sync"] for r in per_rank)
        rows.append((key, plain, sync))

    command = "python -m benchmarks.sync_bn " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Synchronized batch norm: DDP training step, plain batch norm vs SyncNormPlugin",
        "",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared with other work while measured)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, 2 processes over gloo on 127.0.0.1, "
        "1 thread each",
        f"- command: `{command.strip()}`",
        f"- CNN example (ResNetDigits, width {args.width}, 6 batch-norm layers), DDP, SGD; median of "
        f"{args.steps} steps per round, median over {args.rounds} interleaved rounds, slower process",
        "",
        "| what | batch per process | plain BN (ms) | SyncNormPlugin (ms) | ratio sync/plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for (kind, batch), plain, sync in rows:
        what = "training step (fwd+bwd+SGD)" if kind == "step" else f"one layer fwd+bwd ({2 * args.width} ch, 8x8)"
        lines.append(f"| {what} | {batch} | {plain * 1e3:.2f} | {sync * 1e3:.2f} | {sync / plain:.2f}x |")
    lines += [
        "",
        "Target: a training step at most 1.3x plain batch norm. The synchronized step adds one all-reduce of a",
        "(3, C) tensor per batch-norm layer in the forward and one in the backward (12 small gloo collectives per",
        "step here), and computes the statistics as sums and sums of squares.",
        "",
        "GPU part (our layer vs torch.nn.SyncBatchNorm's CUDA kernels over NCCL, and vs plain batch norm): not run,",
        "no GPU was available for this measurement.",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
