"""The main job (``make demo``): train the examples with batch norm and its alternatives, print a table.

    python -m examples.demo                 # the full demo (a few minutes on 2 CPU cores)
    python -m examples.demo --quick         # a few steps of each run (used by the tests)
    python -m examples.demo --logdir DIR    # where the TensorBoard logs go (default: demo_logs)

The CNN starts with batch norm; the other runs put group norm or no norm into the same model with
``NormSwap`` instead of changing the model's code.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from examples.cnn import CNN, DigitsDataModule
from lightning_bn.callbacks import NormSwap


@dataclass
class Run:
    """One training run of the demo."""

    task: str
    norm: str
    make_model: Any
    make_data: Any
    callbacks: list[Callback] = field(default_factory=list)
    metric: str = "val/acc"
    max_epochs: int = 12


@dataclass
class Result:
    task: str
    norm: str
    params: int
    metric_name: str
    metric: float
    seconds: float
    steps: int
    logdir: str


def cnn_runs() -> list[Run]:
    data = lambda: DigitsDataModule(batch_size=64)  # noqa: E731
    return [
        Run("cnn", "batch", lambda: CNN(norm="batch"), data),
        Run("cnn", "group", lambda: CNN(norm="batch"), data, [NormSwap(to="group", verbose=False)]),
        Run("cnn", "none", lambda: CNN(norm="batch"), data, [NormSwap(to="none", verbose=False)]),
    ]


def train(run: Run, logdir: Path, quick: bool, seed: int = 0) -> Result:
    L.seed_everything(seed, verbose=False)
    model, data = run.make_model(), run.make_data()
    logger = TensorBoardLogger(save_dir=str(logdir), name=run.task, version=run.norm, default_hp_metric=False)
    trainer = L.Trainer(
        max_epochs=1 if quick else run.max_epochs,
        max_steps=3 if quick else -1,
        limit_val_batches=1 if quick else None,
        logger=logger,
        callbacks=list(run.callbacks),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not quick,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    value = trainer.callback_metrics.get(run.metric)
    return Result(
        task=run.task,
        norm=run.norm,
        params=sum(p.numel() for p in model.parameters()),
        metric_name=run.metric,
        metric=float(value) if value is not None else float("nan"),
        seconds=seconds,
        steps=trainer.global_step,
        logdir=logger.log_dir,
    )


def format_table(results: list[Result]) -> str:
    rows = [("task", "norm", "params", "metric", "value", "steps", "seconds", "s/step")]
    for r in results:
        rows.append((
            r.task, r.norm, f"{r.params:,}", r.metric_name, f"{r.metric:.4f}", str(r.steps), f"{r.seconds:.1f}",
            f"{r.seconds / max(r.steps, 1):.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps per run (for tests)")
    parser.add_argument("--logdir", default="demo_logs", help="TensorBoard log directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    logdir = Path(args.logdir)
    results = []
    runs = cnn_runs()
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.task} with {run.norm} norm ...", flush=True)
        results.append(train(run, logdir, args.quick))
    print()
    print(format_table(results))
    print()
    print(f"TensorBoard logs: {logdir.resolve()}")
    print(f"View them with:   tensorboard --logdir {logdir}")
    return results


if __name__ == "__main__":
    main()
