"""Does a torch.compile'd fused summary pay on the CPU? Against the monitor's eager torch path, compile time included.

    python -m benchmarks.compiled_summaries     # writes benchmarks/results/compiled_summaries.md

The monitor summarizes every watched tensor with ``lightning_bn.stats._summary.summary_row`` (eager torch: a dot
product, a sum, ``aminmax`` and a ``sign`` for the zeros, 4-5 passes). A ``torch.compile``'d function can compute
all six figures (and a batch norm's per-channel sums) in one inductor kernel that reads the tensor once. Measured
side by side in one process, one thread, median CPU time of ``--repeats`` calls, on the examples' activations
(float32 ReLU outputs):

* per call, after warm-up: eager ``summary_row`` against the compiled fused summary (``dynamic=True``, flattened
  input, so one graph serves every size; also with static shapes, one graph per size; and with float32 counts,
  which stop being exact at 2**24 values);
* the compile: the first call's time with inductor's caches off (what a fresh machine pays once per process), and
  the graphs compiled for all the sizes;
* break-even: calls needed before the compile is paid back, and the logging steps that makes for the CNN example
  (summaries per logging step counted from one real collection).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from benchmarks._timing import median_ms

RESULTS = Path(__file__).resolve().parent / "results" / "compiled_summaries.md"
SHAPES = {
    "CNN stem/layer1 output": (64, 32, 8, 8),
    "CNN layer2 output": (64, 64, 4, 4),
    "transformer residual": (32, 64, 128),
    "transformer MLP": (32, 64, 512),
}


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU microseconds of ``fn()`` over ``repeats`` calls, after two calls to warm up."""
    return 1e3 * median_ms(fn, repeats, warmup=2)[0]


def fused_summary(x: Tensor, zero_tol: float = 0.0, count_dtype: torch.dtype = torch.float64) -> Tensor:
    """The six figures of ``moments.tensor_summary`` (count, sum, sum of squares, max |x|, zeros, non-finite)
    written for one fused kernel: float masks (inductor vectorizes them; boolean reductions it did not, 8-10x
    slower), counts in ``count_dtype`` (float64: exact above 2**24 values, as the eager path)."""
    flat = x.reshape(-1)
    finite = torch.isfinite(flat).to(flat.dtype)
    values = torch.where(finite > 0, flat, torch.zeros((), dtype=flat.dtype))
    magnitude = values.abs()
    count = finite.sum(dtype=count_dtype)
    zeros = ((magnitude <= zero_tol).to(flat.dtype) * finite).sum(dtype=count_dtype)
    parts = [count, values.sum(), (values * values).sum(), magnitude.amax(), zeros, flat.numel() - count]
    return torch.stack([p.to(torch.float64) for p in parts])


def fused_summary_float32_counts(x: Tensor, zero_tol: float = 0.0) -> Tensor:
    return fused_summary(x, zero_tol, torch.float32)


def fused_summary_and_channels(x: Tensor, zero_tol: float = 0.0) -> tuple[Tensor, Tensor]:
    """The six figures and the per-channel sums and sums of squares of an ``(N, C, ...)`` input."""
    view = x.reshape(x.shape[0], x.shape[1], -1)
    sums = torch.stack([view.sum((0, 2)), (view * view).sum((0, 2))])
    return fused_summary(x, zero_tol), sums


def _summaries_per_cnn_logging_step() -> tuple[int, int]:
    """Tensors summarized on one logging step of the CNN example, and of those the batch-norm inputs (summarized
    with their channel sums)."""
    from examples.cnn import CNN
    from lightning_bn.stats import LayerStatsCollector, select_modules

    model = CNN().model
    collector = LayerStatsCollector(select_modules(model))
    collector.attach()
    model(torch.randn(64, 1, 8, 8)).sum().backward()
    collector.detach()
    return collector.summaries, len(collector.bn_index)


def _first_call_s(fn: Callable[[Tensor], object], x: Tensor) -> float:
    with torch._inductor.config.patch(force_disable_caches=True):
        start = time.perf_counter()
        fn(x)
        return time.perf_counter() - start


def _compare(repeats: int) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """The table; per compiled variant, its compile time (s) and mean saving per call (us) against eager."""
    from lightning_bn.moments import channel_moments
    from lightning_bn.stats._summary import summary_row

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    tensors = {label: torch.randn(shape).relu_() for label, shape in SHAPES.items()}
    first = next(iter(tensors.values()))
    variants = {
        "compiled, dynamic": torch.compile(fused_summary, dynamic=True),
        "compiled, static shapes": torch.compile(fused_summary, dynamic=False),
        "compiled, dynamic, float32 counts": torch.compile(fused_summary_float32_counts, dynamic=True),
    }
    compile_s = {name: _first_call_s(fn, first) for name, fn in variants.items()}
    with_channels = torch.compile(fused_summary_and_channels, dynamic=True)
    compile_s["compiled, dynamic, with channel sums"] = _first_call_s(with_channels, first)
    names = list(variants)
    lines = ["| tensor | eager summary_row, us | " + " | ".join(f"{n}, us" for n in names)
             + " | eager + channel sums, us | compiled with channel sums, us |",
             "|---|" + "---:|" * (len(names) + 3)]
    savings: dict[str, list[float]] = {n: [] for n in [*names, "compiled, dynamic, with channel sums"]}
    for label, x in tensors.items():
        scratch = torch.empty(x.numel())
        expected = torch.tensor(summary_row(x, scratch=scratch), dtype=torch.float64)
        eager_us = _median_us(lambda x=x, s=scratch: summary_row(x, scratch=s), repeats)
        cells = []
        for name, fn in variants.items():
            torch.testing.assert_close(fn(x), expected, rtol=1e-5, atol=1e-3)
            us = _median_us(lambda x=x, fn=fn: fn(x), repeats)
            savings[name].append(eager_us - us)
            cells.append(f"{us:.1f} ({us / eager_us:.2f}x)")
        if x.dim() == 4:
            def eager_channels(x: Tensor = x, s: Tensor = scratch) -> object:
                sums = channel_moments(x, 1)[1:]
                return summary_row(x, scratch=s, totals=sums.sum(1))

            eager_ch = _median_us(eager_channels, repeats)
            fused_ch = _median_us(lambda x=x: with_channels(x), repeats)
            savings["compiled, dynamic, with channel sums"].append(eager_ch - fused_ch)
            cells += [f"{eager_ch:.1f}", f"{fused_ch:.1f} ({fused_ch / eager_ch:.2f}x)"]
        else:
            cells += ["", ""]
        lines.append(f"| {label} {tuple(x.shape)} | {eager_us:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "First call of each compiled function (its compile, inductor caches off): "
              + ", ".join(f"{n} {t:.1f} s" for n, t in compile_s.items())
              + f"; graphs compiled for the {len(SHAPES)} sizes, all variants: {counters['stats']['unique_graphs']}."]
    return lines, {n: (compile_s[n], sum(v) / len(v)) for n, v in savings.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines, measured = _compare(args.repeats)
    summaries, bn_inputs = _summaries_per_cnn_logging_step()
    verdicts = []
    for name, (compile_s, saving_us) in measured.items():
        if saving_us <= 0:
            verdicts.append(f"{name}: slower per call on average ({-saving_us:.1f} us), never pays back")
        else:
            calls = compile_s / (saving_us * 1e-6)
            per_step, what = (bn_inputs, "batch-norm inputs") if "channel" in name else (summaries, "summaries")
            verdicts.append(f"{name}: {saving_us:.1f} us saved per call on average, break-even after {calls:,.0f} "
                            f"calls, i.e. {calls / per_step:,.0f} logging steps of the CNN example ({per_step} "
                            f"{what} each)")
    verdict = "Break-even, compile time over the mean saving: " + "; ".join(verdicts) + "."
    command = "python -m benchmarks.compiled_summaries " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        "## A torch.compile'd fused summary on the CPU\n\n"
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, 1 thread; Python {platform.python_version()}.\n\n"
        f"Command: `{command.strip()}`\n\nMedian CPU time of {args.repeats} calls per cell, side by side in "
        "one process, float32 ReLU outputs; compiled: `torch.compile`, inductor (first calls: wall time).\n\n"
        + "\n".join(lines) + f"\n\n{verdict}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
