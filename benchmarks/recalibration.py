"""Batch-norm recalibration: speed against torch's ``update_bn``, and how right each method's statistics are.

    python -m benchmarks.recalibration                 # writes benchmarks/results/recalibration.md
    python -m benchmarks.recalibration --rounds 5 --epochs 6

Throughput: the CNN example's network (``examples.cnn``, a small ResNet on 8x8 digits, 6 batch-norm layers) over
the same batches of the training set, methods interleaved round by round so that they see the same machine load:
``forward`` is the floor (the forward passes alone, batch norm in train mode, no gradients), ``update_bn`` is
``torch.optim.swa_utils.update_bn``, ``recalibrate_bn`` ours (one pass, float64 sums) and ``exact_eval`` ours
level by level (one pass per batch-norm depth level). Ratios are speeds relative to ``update_bn`` (higher is
faster) from the medians.

Accuracy: the CNN example trained with a batch-norm momentum that lags (torch's ``momentum=0.01``, that is 0.99 in
the Keras convention) and one that is noisy (``momentum=0.9``: mostly the last batch); validation accuracy with the
moving-average statistics, after ``update_bn``, after ``recalibrate_bn`` and after ``recalibrate_bn(exact_eval=True)``;
and each method's running variance against the exact population variance of the same layer inputs, computed here
by concatenating every input of every layer over the training set (float64): ``ours`` (pooled sums),
``update_bn`` (cumulative average of per-batch unbiased variances) and per-batch-variance averaging as in pycls and
fvcore (mean of per-batch variances), which both miss the variance of the batch means.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from examples.cnn import CNN, DigitsDataModule
from lightning_bn import recalibrate_bn

RESULTS = Path(__file__).resolve().parent / "results" / "recalibration.md"


def _bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def _forward_only(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def throughput(rounds: int, num_batches: int, batch_size: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup()
    batches = [b for _, b in zip(range(num_batches), dm.train_dataloader())]
    model = CNN(norm="batch", width=32).model
    methods = {
        "forward (floor)": lambda: _forward_only(model, batches),
        "update_bn": lambda: update_bn(batches, model),
        "recalibrate_bn": lambda: recalibrate_bn(model, batches),
        "recalibrate_bn(exact_eval=True)": lambda: recalibrate_bn(model, batches, exact_eval=True),
    }
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["update_bn"])
    return [(k, statistics.median(v), ref / statistics.median(v)) for k, v in times.items()]


@torch.no_grad()
def _feed_bn_inputs(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], record: Callable[[str, Tensor], None]
) -> None:
    """Run the batches with batch norm in train mode (batch statistics), handing each layer's input (float64) to
    ``record(name, x)``; the model's state and modes are restored afterwards."""
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=n: record(name, args[0].double()))
        for n, m in _bn_layers(model)
    ]
    model.eval()
    for _, m in _bn_layers(model):
        m.train()
    saved = copy.deepcopy(model.state_dict())
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.load_state_dict(saved)
        model.eval()


def population_variances(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Exact variance of each layer's inputs (batch norm normalizing with batch statistics), by concatenation."""
    inputs: dict[str, list[Tensor]] = {}
    _feed_bn_inputs(model, batches, lambda name, x: inputs.setdefault(name, []).append(x))
    return {n: torch.cat([t.movedim(1, -1).reshape(-1, t.shape[1]) for t in v]).var(0) for n, v in inputs.items()}


def per_batch_variance_average(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """pycls / fvcore style: the mean over batches of each batch's variance."""
    sums: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        sums[name] = sums.get(name, 0) + x.var((0, 2, 3), unbiased=False)

    _feed_bn_inputs(model, batches, record)
    return {n: s / len(batches) for n, s in sums.items()}


@torch.no_grad()
def val_accuracy(model: nn.Module, dm: DigitsDataModule) -> float:
    model.eval()
    correct = total = 0
    for x, y in dm.val_dataloader():
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def rel_error(var: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """Mean over layers and channels of |var - exact| / exact."""
    errs = [((var[n].double() - ref[n]).abs() / ref[n]).mean() for n in ref]
    return float(torch.stack(errs).mean())


def accuracy_study(momentum: float, epochs: int, batch_size: int) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup()
    module = CNN(norm="batch", width=32)
    for _, m in _bn_layers(module):
        m.momentum = momentum
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    model = module.model
    # the whole training set, in fixed batches (no dropping, no shuffling), for every method alike
    x_all, y_all = dm.train_set.tensors
    batches = list(zip(x_all.split(batch_size), y_all.split(batch_size)))
    out = {"ema": val_accuracy(model, dm)}
    exact = population_variances(model, batches)

    theirs = copy.deepcopy(model)
    update_bn(batches, theirs)
    out["update_bn"] = val_accuracy(theirs, dm)
    out["var_err_update_bn"] = rel_error({n: m.running_var for n, m in _bn_layers(theirs)}, exact)
    out["var_err_per_batch_avg"] = rel_error(per_batch_variance_average(model, batches), exact)

    ours = copy.deepcopy(model)
    recalibrate_bn(ours, batches)
    out["ours"] = val_accuracy(ours, dm)
    out["var_err_ours"] = rel_error({n: m.running_var for n, m in _bn_layers(ours)}, exact)

    eval_exact = copy.deepcopy(model)
    recalibrate_bn(eval_exact, batches, exact_eval=True)
    out["ours_exact_eval"] = val_accuracy(eval_exact, dm)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--num-batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    speed = throughput(args.rounds, args.num_batches, args.batch_size)
    studies = {m: accuracy_study(m, args.epochs, args.batch_size) for m in (0.01, 0.9)}

    cmd = "python -m benchmarks.recalibration " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Batch-norm recalibration",
        "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(torch threads: {args.threads}); torch {torch.__version__}; Python {platform.python_version()}.",
        f"Command: `{cmd.strip()}`",
        "",
        f"## Throughput: {args.num_batches} batches of {args.batch_size} digits through the CNN example "
        f"(6 batch-norm layers), median of {args.rounds} interleaved rounds",
        "",
        "| method | seconds | speed vs update_bn |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {sec:.4f} | {ratio:.2f}x |" for name, sec, ratio in speed]
    lines += [
        "",
        f"## Accuracy: the CNN example trained {args.epochs} epochs (batch {args.batch_size}), statistics from the "
        "whole training set",
        "",
        "Validation accuracy (360 held-out digits):",
        "",
        "| batch-norm momentum (torch) | moving average | update_bn | recalibrate_bn | recalibrate_bn(exact_eval) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, s in studies.items():
        lines.append(
            f"| {m} | {s['ema']:.4f} | {s['update_bn']:.4f} | {s['ours']:.4f} | {s['ours_exact_eval']:.4f} |"
        )
    lines += [
        "",
        "Running variance against the exact population variance of the same inputs (mean over layers and channels "
        "of the relative error):",
        "",
        "| batch-norm momentum (torch) | recalibrate_bn | update_bn | per-batch-variance average |",
        "|---|---:|---:|---:|",
    ]
    for m, s in studies.items():
        lines.append(
            f"| {m} | {s['var_err_ours']:.2e} | {s['var_err_update_bn']:.2e} | {s['var_err_per_batch_avg']:.2e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
