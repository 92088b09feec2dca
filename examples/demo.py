"""The main job (``make demo``): train the examples with batch norm and its alternatives, and show the results.

    python -m examples.demo                 # the full demo (about 4 minutes on 2 CPU cores)
    python -m examples.demo --quick         # a few steps of a few runs (the end-to-end test uses it)
    python -m examples.demo --logdir DIR    # where the logs go (default: demo_logs)
    python -m examples.demo --no-wandb      # TensorBoard only
    python -m examples.demo --threads 2     # torch threads (default 1)

Every run starts from the example as written (the CNN with batch norm, the transformer with layer norm) and gets
its normalization from ``NormSwap``; every run has ``LayerStatsMonitor`` on (per-layer statistics, histograms and
heatmaps) and, where the model has batch norm, ``BatchNormRecalibration`` (exact population statistics before each
validation). Logs go to TensorBoard and to an offline W&B run (online when ``WANDB_API_KEY`` is set).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from typing_extensions import override

from examples.cnn import CNN, DigitsDataModule
from examples.transformer import CharTransformer, PydocTextDataModule, unigram_entropy_bits
from lightning_bn.callbacks import BatchNormRecalibration, LayerStatsMonitor, NormSwap

BATCH_KINDS = ("batch", "sync_batch", "batch_renorm", "ghost_batch")


@dataclass
class Run:
    """One training run of the demo."""

    task: str
    norm: str
    make_model: Callable[[], L.LightningModule]
    make_data: Callable[[], L.LightningDataModule]
    metric: str
    target: float
    higher_is_better: bool
    trainer_args: dict[str, Any] = field(default_factory=dict)
    swap_options: dict[str, Any] = field(default_factory=dict)
    base_norm: str = "batch"  # the norm the model is written with; NormSwap puts `norm` in its place


@dataclass
class Result:
    task: str
    norm: str
    params: int
    metric_name: str
    metric: float
    steps_to_target: int | None
    target: float
    seconds: float
    steps: int
    recalibrated: bool
    tb_dir: str
    wandb_dir: str | None


class MetricHistory(Callback):
    """Records ``(global_step, value)`` of one validation metric after every validation (for steps-to-target)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.history: list[tuple[int, float]] = []

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is not None and not trainer.sanity_checking:
            self.history.append((trainer.global_step, float(value)))


def steps_to_target(history: list[tuple[int, float]], target: float, higher_is_better: bool) -> int | None:
    """The first step whose validation metric reached ``target``, or None."""
    for step, value in history:
        if (value >= target) if higher_is_better else (value <= target):
            return step
    return None


def cnn_runs(quick: bool) -> list[Run]:
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("batch", {}),
        ("group", {"num_groups": 8}),
        ("layer", {}),
        ("batch_renorm", {"warmup_steps": 50}),  # open rmax/dmax within the demo's ~220 steps
        ("ghost_batch", {"virtual_batch_size": 16}),
        ("none", {}),
    ]
    if quick:
        kinds = [kinds[0], kinds[1]]
    return [
        Run("cnn", kind, lambda: CNN(norm="batch"), lambda: DigitsDataModule(batch_size=64), "val/acc", 0.95, True,
            {"max_epochs": 10}, options)
        for kind, options in kinds
    ]


def transformer_runs(quick: bool) -> list[Run]:
    def data() -> PydocTextDataModule:
        return PydocTextDataModule(block_size=64, batch_size=32)

    def model() -> CharTransformer:
        dm = data()
        dm.prepare_data()
        dm.setup("fit")
        size = {"n_layer": 1, "n_embd": 32} if quick else {}  # the quick demo checks the plumbing, not the model
        return CharTransformer(norm="layer", vocab_size=dm.vocab_size, block_size=dm.block_size, **size)

    kinds = ["batch"] if quick else ["layer", "batch"]
    return [
        Run("transformer", kind, model, data, "val/bpc", 3.0, False,
            {"max_steps": 300, "val_check_interval": 50, "limit_val_batches": 20}, base_norm="layer")
        for kind in kinds
    ]


def make_loggers(run: Run, logdir: Path, use_wandb: bool) -> list[Logger]:
    loggers: list[Logger] = [
        TensorBoardLogger(save_dir=str(logdir), name=run.task, version=run.norm, default_hp_metric=False)
    ]
    if use_wandb:
        from examples.loggers import AutoWandbLogger

        (logdir / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(AutoWandbLogger(project="lightning-bn-demo", name=f"{run.task}-{run.norm}",
                                       save_dir=str(logdir)))
    return loggers


def train(run: Run, logdir: Path, quick: bool, use_wandb: bool, seed: int = 0) -> Result:
    L.seed_everything(seed, verbose=False)
    model, data = run.make_model(), run.make_data()
    history = MetricHistory(run.metric)
    recalibrate = run.norm in BATCH_KINDS
    callbacks: list[Callback] = [
        LayerStatsMonitor(
            log_every_n_steps=2 if quick else 10,
            histogram_every_n_steps=6 if quick else 50,
            heatmap_every_n_logs=3 if quick else 5,
        ),
        history,
    ]
    if run.norm != run.base_norm:
        callbacks.insert(0, NormSwap(to=run.norm, options=run.swap_options, verbose=False))
    if recalibrate:
        callbacks.append(BatchNormRecalibration(num_batches=2 if quick else 10, progress=False))
    trainer_args = dict(run.trainer_args)
    if quick:
        trainer_args.update(max_epochs=1, max_steps=6, limit_val_batches=1, val_check_interval=3)
    loggers = make_loggers(run, logdir, use_wandb)
    trainer = L.Trainer(
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=2 if quick else 10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not quick,
        num_sanity_val_steps=0,
        **trainer_args,
    )
    start = time.perf_counter()
    try:
        trainer.fit(model, data)
    finally:
        wandb_dir = None
        if use_wandb:
            import wandb

            if wandb.run is not None:
                wandb_dir = str(Path(wandb.run.dir).parent)
            wandb.finish()
    seconds = time.perf_counter() - start
    value = trainer.callback_metrics.get(run.metric)
    return Result(
        task=run.task, norm=run.norm, params=sum(p.numel() for p in model.parameters()),
        metric_name=run.metric, metric=float(value) if value is not None else float("nan"),
        steps_to_target=steps_to_target(history.history, run.target, run.higher_is_better), target=run.target,
        seconds=seconds, steps=trainer.global_step, recalibrated=recalibrate, tb_dir=loggers[0].log_dir,
        wandb_dir=wandb_dir,
    )


def format_table(results: list[Result]) -> str:
    rows = [("task", "norm", "params", "metric", "final", "target", "steps to target", "steps", "s/step")]
    for r in results:
        rows.append((
            r.task, r.norm, f"{r.params:,}", r.metric_name, f"{r.metric:.4f}",
            (">= " if r.metric_name == "val/acc" else "<= ") + f"{r.target:g}",
            "not reached" if r.steps_to_target is None else str(r.steps_to_target),
            str(r.steps), f"{r.seconds / max(r.steps, 1):.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of a few runs (for tests)")
    parser.add_argument("--logdir", default="demo_logs", help="log directory (TensorBoard and W&B)")
    parser.add_argument("--no-wandb", action="store_true", help="write TensorBoard logs only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: these small models gain little from more, and extra threads "
                             "spin against any other load on the cores)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    torch.set_num_threads(args.threads)
    logdir = Path(args.logdir)
    use_wandb = not args.no_wandb
    if use_wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
    runs = cnn_runs(args.quick) + transformer_runs(args.quick)
    results = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.task} with {run.norm} norm ...", flush=True)
        results.append(train(run, logdir, args.quick, use_wandb))
    print()
    print(format_table(results))
    print()
    print(f"The transformer's baseline: the text's unigram entropy is {unigram_entropy_bits():.2f} bits per character "
          f"(a model that ignores context); val/bpc below it is learned context.")
    print("Batch-norm runs recalibrate their running statistics before each validation (BatchNormRecalibration).")
    print()
    print(f"TensorBoard logs: {logdir.resolve()}")
    print(f"  view:  tensorboard --logdir {logdir}")
    print("  then open the SCALARS, CUSTOM SCALARS (one chart per statistic, every layer), HISTOGRAMS and IMAGES tabs")
    if use_wandb:
        runs_dirs = sorted({str(Path(r.wandb_dir).relative_to(Path.cwd())) if r.wandb_dir and
                            Path(r.wandb_dir).is_relative_to(Path.cwd()) else str(r.wandb_dir)
                            for r in results if r.wandb_dir})
        print(f"W&B runs: {len(runs_dirs)} in {logdir / 'wandb'}")
        print(f"  sync:  wandb sync {logdir / 'wandb'}/offline-run-*   (after `wandb login`)")
    if any(math.isnan(r.metric) for r in results):
        print("warning: some runs logged no validation metric")
    return results


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
