"""The five parts of the study. Each runs its sweep and returns a :class:`Section`: Markdown and figures.

Every number a section writes comes from its runs; the sentences comparing with the papers are chosen by the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from examples import cnn as cnn_example
from examples import transformer as tf_example
from lightning_bn.callbacks import LayerStatsMonitor, LossLandscapeProbe
from lightning_bn.layers import available_norms, build_norm, is_batch_norm
from study._config import StudyConfig
from study._train import EvalBothStats, RunResult, set_bn_option, train_cnn, train_transformer

__all__ = ["Section", "PARTS"]

Log = Callable[[str], None]


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    figure_at: list[int] = field(default_factory=list)  # per figure, the number of text lines before it
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, *lines: str) -> None:
        self.text.extend(lines)


# ------------------------------------------------------------------------------------------------ helpers


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return float("nan"), float("nan"), 0
    return statistics.fmean(ok), (statistics.stdev(ok) if len(ok) > 1 else 0.0), len(ok)


def fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1, total: int | None = None) -> str:
    """``mean ± std`` over the finite values (``(k/n)`` appended when only k of n runs gave one)."""
    m, s, k = mean_std(values)
    n = len(values) if total is None else total
    if k == 0:
        return "—"
    text = f"{m * scale:.{digits}f}" if n == 1 or k == 1 else f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"
    return text if k == n else f"{text} ({k}/{n})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def plt_figure(ncols: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    """A figure of ``ncols`` axes side by side, on its own Agg canvas: matplotlib's object API, so neither the
    user's backend nor pyplot's figures are touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, axes[0]


def save(fig: Any, out: Path, name: str, section: Section, caption: str) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    section.figures.append((name, caption))
    section.figure_at.append(len(section.text))  # the figure goes where the text has got to


STUCK = 0.2  # final validation accuracy below this: the run did not train (chance is 0.1)


def stuck(r: RunResult) -> bool:
    return not r.diverged and not r.final >= STUCK


def steps_to(curve: Sequence[tuple[int, float]], target: float) -> float:
    return next((float(step) for step, acc in curve if acc >= target), float("nan"))


# ------------------------------------------------------------------------------------------------ part 1


def part_learning_rate(cfg: StudyConfig, out: Path, log: Log) -> Section:
    sec = Section("1. Learning rate and speed (Ioffe & Szegedy, 2015)")
    runs: dict[tuple[str, float], list[RunResult]] = {}
    for norm in cfg.lr_norms:
        for lr in cfg.lrs:
            for seed in range(cfg.seeds):
                r = train_cnn(norm, seed=seed, lr=lr, epochs=cfg.lr_epochs, width=cfg.width,
                              val_every=cfg.lr_val_every, limit_train_batches=cfg.limit_train_batches)
                runs.setdefault((norm, lr), []).append(r)
                log(f"  part 1 {norm:>6} lr={lr:<5} seed={seed}: acc={r.final:.3f} steps={r.steps} "
                    f"diverged={r.diverged} ({r.seconds:.1f}s)")
    target = cfg.target_acc
    rows = []
    for norm in cfg.lr_norms:
        for lr in cfg.lrs:
            rs = runs[(norm, lr)]
            rows.append([
                norm, f"{lr:g}", fmt([r.final for r in rs], 100),
                fmt([steps_to(r.curve, target) for r in rs], digits=0),
                f"{sum(r.diverged for r in rs)} / {sum(stuck(r) for r in rs)} of {len(rs)}",
            ])
    sec.add(
        "**Paper.** Batch norm reached the baseline Inception's accuracy in 14 times fewer training steps and allowed "
        "much higher learning rates (Ioffe & Szegedy, 2015, section 4.2).",
        "",
        f"**Setup.** `examples.cnn.CNN(norm=..., width={cfg.width})` (SGD, momentum 0.9, cosine decay) on the "
        f"scikit-learn digits, batch 64, {cfg.lr_epochs} epochs, validation every {cfg.lr_val_every} steps, "
        f"{cfg.seeds} seed(s) per cell (mean ± std over seeds). *Steps to {target:.0%}*: first optimizer step at "
        f"which validation accuracy reached {target:.0%} (`(k/n)`: only k of n seeds got there). *NaN / stuck*: "
        f"runs whose training loss became NaN or Inf (training stopped), and runs that ended below {STUCK:.0%} "
        "validation accuracy (chance is 10%).",
        "",
    )
    sec.add(*table(["norm", "lr", "final val acc %", f"steps to {target:.0%}", "NaN / stuck"], rows))
    summary, best_steps = [], {}
    for norm in cfg.lr_norms:
        scores = {lr: mean_std([r.final for r in runs[(norm, lr)]])[0] for lr in cfg.lrs}
        finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
        best = max(finite, key=lambda lr: finite[lr]) if finite else None
        reach = {lr: mean_std([steps_to(r.curve, target) for r in runs[(norm, lr)]]) for lr in cfg.lrs}
        fastest = [(m, lr) for lr, (m, _, k) in reach.items() if k == cfg.seeds]
        fast_steps, fast_lr = min(fastest) if fastest else (float("nan"), None)
        best_steps[norm] = fast_steps
        trained = [lr for lr in cfg.lrs if all(not r.diverged and r.final >= target for r in runs[(norm, lr)])]
        summary.append([
            norm, "—" if best is None else f"{best:g}", "—" if best is None else f"{100 * finite[best]:.1f}",
            "never" if fast_lr is None else f"{fast_steps:.0f} (lr {fast_lr:g})",
            ", ".join(f"{lr:g}" for lr in trained) or "none",
        ])
    sec.add("Per normalization:", "")
    sec.add(*table(["norm", "best lr", "best final acc %", f"fewest steps to {target:.0%}",
                    f"learning rates where every seed reached {target:.0%}"], summary))
    sec.data["best_steps"] = best_steps
    # verdict
    b, n = best_steps.get("batch", float("nan")), best_steps.get("none", float("nan"))
    if "none" in best_steps and "batch" in best_steps:
        if math.isfinite(b) and math.isfinite(n):
            sec.add(f"**Agreement.** Speed: batch norm reached {target:.0%} in {b:.0f} steps against {n:.0f} without "
                    f"normalization, {n / b:.1f}x fewer (paper: 14x on ImageNet).", "")
        elif math.isfinite(b):
            sec.add(f"**Agreement.** Speed: batch norm reached {target:.0%} in {b:.0f} steps; without normalization "
                    f"no learning rate of the grid got every seed there within {cfg.lr_epochs} epochs (paper: 14x "
                    "fewer steps with batch norm). The direction agrees; the ratio is not measurable here.", "")
        else:
            sec.add(f"**Agreement.** Batch norm did not reach {target:.0%} at every seed of any learning rate here: "
                    "this run does not reproduce the speed-up.", "")
        ok = {norm: [lr for lr in cfg.lrs if all(not r.diverged and r.final >= target for r in runs[(norm, lr)])]
              for norm in cfg.lr_norms}
        top: dict[str, float | None] = {norm: max(v) if v else None for norm, v in ok.items()}
        parts = [f"{norm}: {'none' if v is None else f'{v:g}'}" for norm, v in top.items()]
        top_batch, top_none = top.get("batch"), top.get("none")
        higher = top_batch is not None and (top_none is None or top_batch > top_none)
        sec.add(f"Learning rate: the largest learning rate at which every seed trained to {target:.0%} was "
                f"{'; '.join(parts)}. " + ("Batch norm tolerated a higher learning rate than no normalization, as "
                                           "the paper reports." if higher else
                                           "Batch norm did not tolerate a higher learning rate than no normalization "
                                           "in this grid: this part of the paper is not reproduced here."), "")
    fig, (ax1, ax2) = plt_figure(2)
    for norm in cfg.lr_norms:
        ms = [mean_std([r.final for r in runs[(norm, lr)]]) for lr in cfg.lrs]
        ax1.errorbar(cfg.lrs, [100 * m for m, _, _ in ms], yerr=[100 * s for _, s, _ in ms], marker="o", label=norm,
                     capsize=3)
        means = [(mean_std([r.final for r in runs[(norm, lr)]])[0], lr) for lr in cfg.lrs]
        ranked = [(m, lr) for m, lr in means if math.isfinite(m)]
        if ranked:
            lr = max(ranked)[1]
            curve = runs[(norm, lr)][0].curve
            ax2.plot([s for s, _ in curve], [100 * a for _, a in curve], label=f"{norm} (lr {lr:g}, seed 0)")
    ax1.set(xscale="log", xlabel="learning rate", ylabel="final validation accuracy %",
            title="accuracy vs lr (mean ± std over seeds)")
    ax2.axhline(100 * target, color="gray", ls=":")
    ax2.set(xlabel="optimizer step", ylabel="validation accuracy %", title="training at each norm's best lr")
    ax1.legend(), ax2.legend(fontsize=8)
    save(fig, out, "study_lr.png", sec, "Final accuracy over the learning-rate grid, and validation curves at the best "
         "learning rate of each normalization.")
    return sec


# ------------------------------------------------------------------------------------------------ part 2


def _configure_kind(norm: str, cfg: StudyConfig) -> Callable[[nn.Module, int], None]:
    def configure(model: nn.Module, steps_per_epoch: int) -> None:
        if norm == "ghost_batch":
            set_bn_option(model, virtual_batch_size=cfg.ghost_virtual)
        if norm == "batch_renorm":
            set_bn_option(model, warmup_steps=steps_per_epoch)

    return configure


def part_batch_size(cfg: StudyConfig, out: Path, log: Log) -> Section:
    sec = Section("2. Batch size (Wu & He, 2018)")
    err: dict[tuple[str, int], list[float]] = {}
    for norm in cfg.bs_norms:
        for bs in cfg.batch_sizes:
            for seed in range(cfg.seeds):
                lr = 0.05 * bs / 32
                r = train_cnn(norm, seed=seed, lr=lr, batch_size=bs, epochs=cfg.bs_epochs, width=cfg.width,
                              limit_train_batches=cfg.limit_train_batches, configure=_configure_kind(norm, cfg))
                err.setdefault((norm, bs), []).append(1.0 - r.final)
                log(f"  part 2 {norm:>12} batch={bs:<3} seed={seed}: acc={r.final:.3f} steps={r.steps} "
                    f"({r.seconds:.1f}s)")
    sec.add(
        "**Paper.** On ImageNet with ResNet-50, batch norm's error rose from 23.6% at 32 images per GPU to 34.7% at "
        "2, while group norm stayed at about 24.1% whatever the batch (Wu & He, 2018, figure 1 and table 2).",
        "",
        f"**Setup.** CNN (width {cfg.width}) at batch sizes {', '.join(map(str, cfg.batch_sizes))}, {cfg.bs_epochs} "
        f"epoch(s) for every batch size (matched epochs, so small batches take more steps), learning rate scaled "
        f"linearly with the batch (0.05 x batch / 32), {cfg.seeds} seed(s). `ghost_batch` normalizes virtual "
        f"batches of {cfg.ghost_virtual} samples (Hoffer et al., 2017: it equals `batch` up to batch "
        f"{cfg.ghost_virtual} and normalizes smaller groups above); `batch_renorm`'s bounds (rmax 3, dmax 5) open "
        "over the first epoch. Validation error % "
        "(mean ± std over seeds), the model in eval mode (running statistics):",
        "",
    )
    rows = [[norm] + [fmt(err[(norm, bs)], 100) for bs in cfg.batch_sizes] for norm in cfg.bs_norms]
    sec.add(*table(["norm"] + [f"batch {bs}" for bs in cfg.batch_sizes], rows))
    small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)
    m = {k: mean_std(v)[0] for k, v in err.items()}
    if "batch" in cfg.bs_norms and "group" in cfg.bs_norms:
        rise_bn = m[("batch", small)] - m[("batch", large)]
        rise_gn = m[("group", small)] - m[("group", large)]
        verdict = ("agrees with the paper: batch norm degrades at small batches while group norm does not (or much "
                   "less)" if rise_bn > rise_gn + 0.01 and m[("batch", small)] > m[("group", small)] else
                   "does not reproduce the paper's gap: at this scale batch norm does not degrade more than group "
                   "norm at small batches")
        sec.add(f"**Agreement.** From batch {large} to batch {small} batch norm's error changed by "
                f"{100 * rise_bn:+.1f} points and group norm's by {100 * rise_gn:+.1f} points; at batch {small} "
                f"batch norm {100 * m[('batch', small)]:.1f}% vs group norm {100 * m[('group', small)]:.1f}%. "
                f"This {verdict}. At matched epochs batch {small} takes {large // small} times as many optimizer "
                f"steps as batch {large}.", "")
        if "batch_renorm" in cfg.bs_norms:
            sec.add(f"Batch renormalization at batch {small}: {100 * m[('batch_renorm', small)]:.1f}% (Ioffe (2017) "
                    "proposed it for small or non-i.i.d. batches).", "")
    fig, (ax,) = plt_figure(1, width=6)
    for norm in cfg.bs_norms:
        ms = [mean_std(err[(norm, bs)]) for bs in cfg.batch_sizes]
        ax.errorbar(cfg.batch_sizes, [100 * x for x, _, _ in ms], yerr=[100 * s for _, s, _ in ms], marker="o",
                    label=norm, capsize=3)
    ax.set(xscale="log", xlabel="batch size (log scale)", ylabel="validation error %", title="error vs batch size")
    ax.set_xticks(list(cfg.batch_sizes), [str(b) for b in cfg.batch_sizes])
    ax.set_xticks([], minor=True)
    ax.legend()
    save(fig, out, "study_batch_size.png", sec, "Validation error against batch size at matched epochs.")
    sec.data["err"] = {f"{k[0]}@{k[1]}": v for k, v in err.items()}
    return sec


# ------------------------------------------------------------------------------------------------ part 3


def part_moving_average(cfg: StudyConfig, out: Path, log: Log) -> Section:
    sec = Section("3. Moving-average vs population statistics (Wu & Johnson, 2021)")
    rows_by: dict[float, list[list[dict[str, float]]]] = {}
    split = cnn_example.DigitsDataModule(batch_size=cfg.ma_batch)  # the same split train_cnn uses (seed 0)
    split.setup("fit")
    assert split.train_set is not None and split.val_set is not None
    train_x, (val_x, val_y) = split.train_set.tensors[0], split.val_set.tensors
    for momentum in cfg.momenta:
        for seed in range(cfg.seeds):

            def configure(model: nn.Module, steps: int, momentum: float = momentum) -> None:
                set_bn_option(model, momentum=momentum)

            ev = EvalBothStats(train_x, val_x, val_y)
            r = train_cnn("batch", seed=seed, lr=cfg.ma_lr, batch_size=cfg.ma_batch, epochs=cfg.ma_epochs,
                          width=cfg.width, limit_train_batches=cfg.limit_train_batches, callbacks=[ev],
                          configure=configure, validate=False)
            rows_by.setdefault(momentum, []).append(ev.rows)
            last = ev.rows[-1]
            log(f"  part 3 momentum={momentum:<6} seed={seed}: ema={last['ema_acc']:.3f} recal={last['recal_acc']:.3f}"
                f" ({r.seconds:.1f}s)")
    sec.add(
        "**Paper.** The exponential moving average of batch statistics that batch norm keeps for inference lags the "
        "weights and is noisy; population statistics recomputed with the final weights (\"precise BN\") fix it. "
        "The moving average is least accurate when the weights change fast (early in training, high learning "
        "rates) or when its momentum does not match how fast they change; at the end of a normal schedule the gap "
        "is small (Wu & Johnson, 2021, section 3).",
        "",
        f"**Setup.** CNN with batch norm (width {cfg.width}), batch {cfg.ma_batch}, lr {cfg.ma_lr}, {cfg.ma_epochs} "
        f"epochs, {cfg.seeds} seed(s), each batch-norm layer's `momentum` (torch's: running = (1 - m) running + m "
        "batch) set to m. After every epoch, validation accuracy of the model in eval mode with its moving-average "
        "statistics (EMA) and of a copy recalibrated by `lightning_bn.recalibrate_bn` on the whole training set "
        "(population). *EMA offset*: `recalibrate_bn`'s report of how far the EMA means were from the population "
        "means, in population standard deviations, averaged over layers.",
        "",
    )
    header = ["momentum", "epoch", "EMA acc %", "population acc %", "gain (points)", "EMA offset (std)"]
    rows = []
    epochs_to_show = sorted({1, max(1, cfg.ma_epochs // 2), cfg.ma_epochs})
    gains_end, gains_first = {}, {}
    for momentum in cfg.momenta:
        for epoch in epochs_to_show:
            per_seed = [seed_rows[epoch - 1] for seed_rows in rows_by[momentum] if len(seed_rows) >= epoch]
            ema = [x["ema_acc"] for x in per_seed]
            rec = [x["recal_acc"] for x in per_seed]
            gain = [b - a for a, b in zip(ema, rec)]
            if epoch == cfg.ma_epochs:
                gains_end[momentum] = mean_std(gain)[0]
            if epoch == 1:
                gains_first[momentum] = mean_std(gain)[0]
            rows.append([f"{momentum:g}", str(epoch), fmt(ema, 100), fmt(rec, 100), fmt(gain, 100),
                         fmt([x["mean_shift"] for x in per_seed], digits=3)])
    sec.add(*table(header, rows))
    if gains_end:
        largest = max(gains_end, key=lambda k: gains_end[k])
        never_hurts = all(g >= -0.005 for g in gains_end.values())
        early_larger = statistics.fmean(gains_first.values()) > statistics.fmean(gains_end.values())
        sec.add(
            "**Agreement.** Population statistics changed the final accuracy by "
            + ", ".join(f"{100 * g:+.1f} points at momentum {m:g}" for m, g in gains_end.items())
            + "; after the first epoch by "
            + ", ".join(f"{100 * g:+.1f} at momentum {m:g}" for m, g in gains_first.items()) + ". "
            + f"The largest final gain is at momentum {largest:g}. "
            + ("Recalibration never cost more than half a point, " if never_hurts else
               "Recalibration lowered the accuracy by more than half a point somewhere, unlike the paper, ")
            + ("and its gain is larger after the first epoch than at the end of training, as the paper describes "
               "(the moving average lags most while the weights move fast)." if early_larger else
               "and its gain is not larger early in training than at the end here."),
            "",
        )
    fig, (ax1, ax2) = plt_figure(2)
    for i, momentum in enumerate(cfg.momenta):
        seeds = rows_by[momentum]
        n = min(len(s) for s in seeds)
        epochs = list(range(1, n + 1))
        ema = [statistics.fmean(s[e - 1]["ema_acc"] for s in seeds) for e in epochs]
        rec = [statistics.fmean(s[e - 1]["recal_acc"] for s in seeds) for e in epochs]
        color = f"C{i}"
        ax1.plot(epochs, [100 * v for v in ema], ls="--", color=color, marker="o", label=f"m={momentum:g} EMA")
        ax1.plot(epochs, [100 * v for v in rec], ls="-", color=color, marker="s", label=f"m={momentum:g} population")
        ax2.plot(epochs, [statistics.fmean(s[e - 1]["mean_shift"] for s in seeds) for e in epochs], color=color,
                 marker="o", label=f"m={momentum:g}")
    ax1.set(xlabel="epoch", ylabel="validation accuracy %", title="EMA (dashed) vs population (solid)")
    ax2.set(xlabel="epoch", ylabel="|EMA mean - population mean| / std", yscale="log",
            title="how far the EMA statistics are")
    ax1.legend(fontsize=7), ax2.legend(fontsize=8)
    save(fig, out, "study_moving_average.png", sec, "Accuracy with moving-average vs recalibrated statistics through "
         "training, and the offset of the moving averages, for each momentum.")
    return sec


# ------------------------------------------------------------------------------------------------ part 4


def part_landscape(cfg: StudyConfig, out: Path, log: Log) -> Section:
    sec = Section("4. Loss landscape (Santurkar et al., 2018)")
    history: dict[str, list[list[tuple[int, Any]]]] = {}
    finals: dict[str, list[float]] = {}
    for norm in cfg.land_norms:
        for seed in range(cfg.seeds):
            probe = LossLandscapeProbe(every_n_steps=cfg.land_every, step_sizes=cfg.land_step_sizes)
            r = train_cnn(norm, seed=seed, lr=cfg.land_lr, epochs=cfg.land_epochs, width=cfg.width,
                          limit_train_batches=cfg.limit_train_batches, callbacks=[probe])
            history.setdefault(norm, []).append(list(probe.history))
            finals.setdefault(norm, []).append(r.final)
            log(f"  part 4 {norm:>6} seed={seed}: {len(probe.history)} probes, acc={r.final:.3f} ({r.seconds:.1f}s)")
    keys = ("loss_range", "grad_pred", "beta_smooth", "grad_norm")
    sec.add(
        "**Paper.** With batch norm the loss changes less along the gradient (smaller range of the loss over step "
        "sizes), the gradient changes less (better gradient predictiveness) and the effective beta-smoothness is "
        "smaller, throughout training (Santurkar et al., 2018, section 3.1 and figure 4, VGG on CIFAR-10).",
        "",
        f"**Setup.** CNN (width {cfg.width}) with {', '.join(cfg.land_norms)}, lr {cfg.land_lr}, batch 64, "
        f"{cfg.land_epochs} epochs, {cfg.seeds} seed(s). `lightning_bn.callbacks.LossLandscapeProbe` every "
        f"{cfg.land_every} steps on the step's batch, step sizes {', '.join(map(str, cfg.land_step_sizes))} along "
        "g = grad L(w): `landscape/loss_range` = max - min of L(w - eta g), `landscape/grad_pred` = max ||g - grad "
        "L(w - eta g)||, `landscape/beta_smooth` = max ||g - grad L(w - eta g)|| / ||eta g||. Averages over every "
        "probe of every seed (the first probe, at initialization, included); *relative gradient change* is "
        "grad_pred / ||g|| per probe, averaged.",
        "",
    )
    rows, avg = [], {}
    for norm in cfg.land_norms:
        ms = [m for run in history[norm] for _, m in run]
        avg[norm] = {k: mean_std([getattr(m, k) for m in ms])[0] for k in keys}
        rel = [m.grad_pred / m.grad_norm for m in ms if m.grad_norm > 0]
        avg[norm]["rel"] = mean_std(rel)[0]
        rows.append([norm, str(len(ms))] + [f"{avg[norm][k]:.4g}" for k in keys] + [f"{avg[norm]['rel']:.3g}",
                                                                                   fmt(finals[norm], 100)])
    sec.add(*table(["norm", "probes", "loss range", "grad predictiveness", "beta-smoothness", "gradient norm",
                    "relative gradient change", "final val acc %"], rows))
    if "batch" in avg and "none" in avg:
        b, n = avg["batch"], avg["none"]
        lines = []
        for key, label in (("loss_range", "loss range"), ("grad_pred", "gradient change"),
                           ("beta_smooth", "effective beta-smoothness"), ("rel", "relative gradient change")):
            word = "smaller" if b[key] < n[key] else "larger"
            lines.append(f"{label} {b[key]:.3g} vs {n[key]:.3g} ({word} with batch norm)")
        agree = [b[k] < n[k] for k in ("loss_range", "grad_pred", "beta_smooth")]
        sec.add("**Agreement.** Batch norm vs no normalization: " + "; ".join(lines) + ". "
                + ("All three agree with the paper." if all(agree) else
                   f"{sum(agree)} of the three landscape figures {'agrees' if sum(agree) == 1 else 'agree'} with the "
                   "paper; the others do not at this "
                   "scale (note that the gradient norms differ between the networks, and the step sizes are the "
                   "same absolute values for both)."), "")
        acc_none, acc_batch = mean_std(finals["none"])[0], mean_std(finals["batch"])[0]
        if acc_none < acc_batch - 0.2:
            sec.add(f"Caveat: without normalization the network trained much less in this budget (final accuracy "
                    f"{100 * acc_none:.1f}% vs {100 * acc_batch:.1f}%; its gradient norm {n['grad_norm']:.3g} vs "
                    f"{b['grad_norm']:.3g}): with PyTorch's default initialization its signal shrinks through the "
                    "unnormalized layers, so it sits on a flat, slowly-moving part of the landscape. The paper "
                    "compares two networks that both train; here the comparison mixes landscape and progress.", "")
    last_step = max((st for runs in history.values() for run in runs for st, _ in run), default=0)
    half = last_step / 2
    late_rows, late = [], {}
    for norm in cfg.land_norms:
        ms = [m for run in history[norm] for st, m in run if st >= half]
        late[norm] = {k: mean_std([getattr(m, k) for m in ms])[0] for k in keys}
        late_rows.append([norm, str(len(ms))] + [f"{late[norm][k]:.4g}" for k in keys])
    sec.add(f"The same figures over the second half of training only (probes at steps >= {half:.0f}), away from "
            "the initialization:", "")
    sec.add(*table(["norm", "probes", "loss range", "grad predictiveness", "beta-smoothness", "gradient norm"],
                   late_rows))
    if "batch" in late and "none" in late:
        smaller = [label for key, label in (("loss_range", "loss range"), ("grad_pred", "gradient change"),
                                            ("beta_smooth", "effective beta-smoothness"))
                   if late["batch"][key] < late["none"][key]]
        head = (f"In the second half, batch norm has the smaller {', '.join(smaller)}" if smaller else
                "In the second half, batch norm has none of the three figures smaller than no normalization")
        sec.add(f"{head} ({len(smaller)} of 3 as in the paper).", "")
    fig, axes = plt_figure(3, width=4.3)
    for i, norm in enumerate(cfg.land_norms):
        for j, key in enumerate(("loss_range", "grad_pred", "beta_smooth")):
            for s, run in enumerate(history[norm]):
                axes[j].plot([st for st, _ in run], [getattr(m, key) for _, m in run], color=f"C{i}",
                             alpha=1.0 if s == 0 else 0.4, label=norm if s == 0 else None)
    for ax, title in zip(axes, ("loss range over step sizes", "gradient predictiveness", "effective beta-smoothness")):
        ax.set(xlabel="optimizer step", title=title, yscale="log")
        ax.legend(fontsize=8)
    save(fig, out, "study_landscape.png", sec, "The probe's three figures through training (one line per seed).")
    sec.data["avg"] = avg
    return sec


# ------------------------------------------------------------------------------------------------ part 5


def _bn_shift(history: Sequence[tuple[int, dict[str, float]]], stat: str, skip_fraction: float = 0.25
              ) -> tuple[list[tuple[int, float]], float]:
    """Per logged step the mean over batch-norm layers of ``bn/<stat>/*``; and its mean over the later steps."""
    curve = []
    for step, scalars in history:
        values = [v for k, v in scalars.items() if k.startswith(f"bn/{stat}/") and math.isfinite(v)]
        if values:
            curve.append((step, statistics.fmean(values)))
    if not curve:
        return curve, float("nan")
    last = curve[-1][0]
    later = [v for s, v in curve if s >= skip_fraction * last]
    return curve, statistics.fmean(later)


def _monitor(every: int) -> LayerStatsMonitor:
    return LayerStatsMonitor(log_every_n_steps=every, include=[_BatchNorm], activations=False,
                             activation_grads=False, params=False, batch_norm=True, heatmap_every_n_logs=None)


def padded_label(norm: str, masked: bool) -> str:
    return f"{norm} ({'mask' if masked else 'no mask'})"


def _versus(a: Sequence[float], b: Sequence[float]) -> str:
    """Where the mean of ``a`` lies against that of ``b``: "below" or "above" when they differ by more than twice the
    larger standard deviation over seeds, else "level with"; with one seed the direction alone."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    direction = "below" if ma < mb else "above"
    if min(na, nb) < 2:
        return direction
    return direction if abs(ma - mb) > 2 * max(sa, sb) else "level with"


def _padded_norm_options(norm: str, steps: int) -> dict[str, Any]:
    """PowerNorm's warm-up scaled to the run: the authors' default of 10,000 steps would outlast every run here, and
    PowerNorm would never normalize with its running quadratic mean."""
    return {"warmup_iters": max(1, steps // 4)} if norm == "power" else {}


Curve = list[tuple[int, float]]
PaddedRuns = tuple[dict[str, list[float]], dict[str, dict[str, list[float]]], dict[str, Curve],
                   dict[str, dict[str, Curve]], list[float]]


def _padded_runs(cfg: StudyConfig, rows: Sequence[tuple[str, bool]], tf_batch: int, lr: float, log: Log
                 ) -> PaddedRuns:
    """Every (norm, mask) row over the seeds at ``lr``: bits per character, later bn shifts, seed 0's curves, and
    each run's share of padding."""
    bpc: dict[str, list[float]] = {}
    shifts: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    shift_curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    padding: list[float] = []
    for norm, masked in rows:
        label = padded_label(norm, masked)
        options = _padded_norm_options(norm, cfg.tf_steps)
        batch_stats = is_batch_norm(build_norm(norm, 8, layout="channels_last", **options))
        for seed in range(cfg.seeds):
            cbs = [_monitor(cfg.tf_monitor_every)] if batch_stats else []
            r = train_transformer(norm, seed=seed, steps=cfg.tf_steps, n_layer=cfg.tf_layers, n_embd=cfg.tf_embd,
                                  batch_size=tf_batch, lr=lr, val_batches=cfg.tf_val_batches, callbacks=cbs,
                                  task="padded", mask_padding=masked, norm_options=options)
            bpc.setdefault(label, []).append(r.final)
            padding.append(r.extra["padding"])
            if seed == 0:
                curves[label] = r.curve
            for stat in ("mean_shift", "var_shift"):
                curve, later = _bn_shift(cbs[0].history, stat) if cbs else ([], float("nan"))
                shifts.setdefault(label, {}).setdefault(stat, []).append(later)
                if seed == 0 and curve:
                    shift_curves.setdefault(label, {})[stat] = curve
            log(f"  part 5 padded lr={lr:g} {label:>15} seed={seed}: val bpc={r.final:.3f} ({r.seconds:.1f}s)")
    return bpc, shifts, curves, shift_curves, padding


def _part_transformer_padded(cfg: StudyConfig, out: Path, log: Log, sec: Section, tf_batch: int) -> None:
    """The padded task of part 5: variable-length sequences padded to the longest of each batch, with and without
    the padding mask around the model (issue #16)."""
    known = set(available_norms())
    rows = [(norm, masked) for norm, masked in cfg.tf_padded if norm in known]
    missing = sorted({norm for norm, _ in cfg.tf_padded if norm not in known})
    bpc, shifts, curves, shift_curves, padding = _padded_runs(cfg, rows, tf_batch, 3e-3, log)
    share = statistics.fmean(padding) if padding else float("nan")
    sec.add(
        "### The padded task",
        "",
        "**Padded task.** Real sequence batches are padded; a batch norm that averages the padding into its "
        "statistics normalizes real tokens with the wrong mean and variance, and its running statistics drift from "
        "those of the real data. PowerNorm (Shen et al., 2020) drops the mean and keeps a running quadratic mean "
        "instead of batch statistics, and is the paper's answer to batch norm's fluctuating statistics in "
        "transformers.",
        "",
        f"**Setup.** The same model and training as above on `PydocTextDataModule(task=\"padded\")`: the text split at "
        f"blank lines and sentence ends into sequences of 2 to 65 characters, right-padded to the longest of each "
        f"batch ({share:.0%} of the training batches' positions are padding). The loss counts real targets only; "
        "\"mask\" runs the model under `lightning_bn.padding_mask(attention_mask)` (batch statistics over real "
        "tokens only), \"no mask\" lets them count the padding. With causal attention and padding on the right, "
        "no real token attends to padding: batch statistics are the only path from padding to a real token. Bits "
        "per character over the real characters of "
        f"{cfg.tf_val_batches} validation batches; the first character of each sequence is never predicted, so they "
        "are not comparable with the windows above. `bn/mean_shift` and `bn/var_shift` as above, from the monitor "
        "(under the mask they count real tokens only). PowerNorm (`power`, group scaling with 1 group, "
        f"`warmup_iters={max(1, cfg.tf_steps // 4)}`, a quarter of the run instead of the authors' 10,000) divides "
        "by a quadratic mean and subtracts no mean; it is not a batch norm to the monitor, whose `bn/*` figures "
        "compare batch means and variances with running ones, so its row has none.",
        "",
    )
    if missing:
        sec.add(f"**Not run:** {', '.join(f'`{n}`' for n in missing)} is not a registered kind in this build "
                "(`lightning_bn.available_norms()`), so its row is missing.", "")
    sec.add(*table(["padded task", "val bits/char", "bn/mean_shift", "bn/var_shift"], [
        [label, fmt(bpc[label], digits=3), fmt(shifts[label]["mean_shift"], digits=3),
         fmt(shifts[label]["var_shift"], digits=3)] for label in bpc
    ]))
    m = {label: mean_std(v)[0] for label, v in bpc.items()}
    ms = {label: mean_std(v["mean_shift"])[0] for label, v in shifts.items()}
    vs = {label: mean_std(v["var_shift"])[0] for label, v in shifts.items()}
    with_mask, without_mask = padded_label("batch", True), padded_label("batch", False)
    layer, power = padded_label("layer", True), padded_label("power", True)
    gap_at_default = ""
    if with_mask in m and without_mask in m:
        gap = gap_at_default = _versus(bpc[with_mask], bpc[without_mask])
        verdict = {
            "below": "the mask helps, as the issue expects",
            "above": "the mask makes batch norm worse here, by more than the spread over seeds; the padded model's "
                      "loss and gradients under the mask equal batch norm by formula over the real tokens "
                      "(tests/test_examples.py), so this is the effect of the statistics, not an error in them, and "
                      "these runs do not say why",
            "level with": "the same within the spread over seeds",
        }[gap]
        if cfg.seeds < 2:
            verdict = f"the mask {'helps' if gap == 'below' else 'does not help'} in this one seed"
        mean_vs = _versus(shifts[with_mask]["mean_shift"], shifts[without_mask]["mean_shift"])
        var_vs = _versus(shifts[with_mask]["var_shift"], shifts[without_mask]["var_shift"])
        sentences = [
            f"**Agreement (padded task).** Batch norm over real tokens only scored {m[with_mask]:.3f} bits per "
            f"character against {m[without_mask]:.3f} with the padding counted: {verdict}. Under the mask its mean "
            f"shift ({ms[with_mask]:.3g}) was {mean_vs} that with the padding counted ({ms[without_mask]:.3g}), its "
            f"variance shift ({vs[with_mask]:.3g}) {var_vs} it ({vs[without_mask]:.3g})."
        ]
        if layer in m:
            sentences.append(
                f" Layer norm scored {m[layer]:.3f}, {_versus(bpc[layer], bpc[with_mask])} batch norm with the mask "
                f"and {_versus(bpc[layer], bpc[without_mask])} batch norm without it; the paper has layer norm ahead "
                "of batch norm in transformers."
            )
        if power in m:
            sentences.append(
                f" PowerNorm with the mask scored {m[power]:.3f}, {_versus(bpc[power], bpc[with_mask])} batch norm "
                "with the mask" + (f" and {_versus(bpc[power], bpc[layer])} layer norm" if layer in m else "")
                + "; the paper has PowerNorm ahead of both."
            )
        if cfg.seeds < 2:
            sentences.append(" One seed: no spread over seeds to judge these gaps by.")
        else:
            sentences.append(" (Level with: the means differ by at most twice the larger standard deviation over "
                             "seeds.)")
        sec.add("".join(sentences), "")
    if cfg.tf_padded_check_lr is not None:
        lr = cfg.tf_padded_check_lr
        check, check_shifts, _, _, _ = _padded_runs(cfg, rows, tf_batch, lr, log)
        sec.add(f"**Learning-rate check.** The same rows at learning rate {lr:g} instead of 3e-3 (the windows task's "
                "rate, not tuned for this one):", "")
        sec.add(*table([f"padded task, lr {lr:g}", "val bits/char", "bn/mean_shift", "bn/var_shift"], [
            [label, fmt(check[label], digits=3), fmt(check_shifts[label]["mean_shift"], digits=3),
             fmt(check_shifts[label]["var_shift"], digits=3)] for label in check
        ]))
        check_means = {label: mean_std(v)[0] for label, v in check.items()}
        if with_mask in check_means and without_mask in check_means:
            gap = _versus(check[with_mask], check[without_mask])
            words = {"below": "the mask helps at this rate", "above": "the mask is worse at this rate",
                     "level with": "level within the spread over seeds"}
            text = (f"**Agreement (learning-rate check).** At {lr:g}, batch norm with the mask scored "
                    f"{check_means[with_mask]:.3f} against {check_means[without_mask]:.3f} without it: "
                    f"{words[gap]}.")
            for name, label in (("Layer norm", layer), ("PowerNorm", power)):
                if label in check_means:
                    text += (f" {name} scored {check_means[label]:.3f}, "
                             f"{_versus(check[label], check[with_mask])} batch norm with the mask.")
            if cfg.seeds < 2:
                text += " One seed: no spread to judge by."
            if gap != gap_at_default:
                text += (" Which of batch norm's two variants does better depends on the learning rate here, so "
                         "neither table alone measures the mask's effect on training.")
            sec.add(text, "")
    sec.add(
        "**Scale.** These runs are small: the model sees each character a handful of times, a batch holds "
        f"{tf_batch} sequences, and padding reaches a real token only through batch statistics of a few layers. "
        "A difference smaller than the spread over seeds is not a finding; the paper's gap between PowerNorm and "
        "batch norm was measured on translation and language models orders of magnitude larger.",
        "",
    )
    sec.data["padded"] = {"bpc": bpc, "shifts": shifts, "padding": share, "missing": missing}
    if not curves:
        return
    fig, (ax1, ax2) = plt_figure(2)
    for i, (label, curve) in enumerate(curves.items()):
        ax1.plot([s for s, _ in curve], [v for _, v in curve], marker="o", color=f"C{i}", label=label)
        for stat, ls in (("mean_shift", "-"), ("var_shift", "--")):
            c = shift_curves.get(label, {}).get(stat, [])
            if c:
                ax2.plot([s for s, _ in c], [v for _, v in c], ls=ls, color=f"C{i}", label=f"{label} {stat}")
    ax1.set(xlabel="optimizer step", ylabel="validation bits / char (real characters)", title="padded task (seed 0)")
    ax2.set(xlabel="optimizer step", ylabel="mean over layers", yscale="log",
            title="batch vs running statistics (seed 0)")
    ax1.legend(fontsize=8)
    if shift_curves:
        ax2.legend(fontsize=7)
    save(fig, out, "study_transformer_padded.png", sec, "The padded task: validation bits per character, and how far "
         "batch statistics are from the running ones, with and without the padding mask.")


def part_transformer(cfg: StudyConfig, out: Path, log: Log) -> Section:
    sec = Section("5. Transformers (Shen et al., 2020)")
    bpc: dict[str, list[float]] = {}
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    shifts: dict[str, dict[str, list[float]]] = {"transformer": {}, "cnn": {}}
    shift_curves: dict[str, list[tuple[int, float]]] = {}
    tf_batch = 32
    for norm in cfg.tf_norms:
        for seed in range(cfg.seeds):
            cbs = [_monitor(cfg.tf_monitor_every)] if norm == "batch" else []
            r = train_transformer(norm, seed=seed, steps=cfg.tf_steps, n_layer=cfg.tf_layers, n_embd=cfg.tf_embd,
                                  batch_size=tf_batch, val_batches=cfg.tf_val_batches, callbacks=cbs)
            bpc.setdefault(norm, []).append(r.final)
            curves.setdefault(norm, []).append(r.curve)
            if cbs:
                for stat in ("mean_shift", "var_shift"):
                    curve, later = _bn_shift(cbs[0].history, stat)
                    shifts["transformer"].setdefault(stat, []).append(later)
                    if seed == 0:
                        shift_curves[f"transformer {stat}"] = curve
            log(f"  part 5 transformer {norm:>5} seed={seed}: val bpc={r.final:.3f} ({r.seconds:.1f}s)")
    cnn_epochs = max(1, round(cfg.tf_steps / 22))  # about as many steps as the transformer (22 steps per epoch)
    for seed in range(cfg.seeds):
        mon = _monitor(cfg.tf_monitor_every)
        r = train_cnn("batch", seed=seed, epochs=cnn_epochs, width=cfg.width,
                      limit_train_batches=cfg.limit_train_batches, callbacks=[mon])
        for stat in ("mean_shift", "var_shift"):
            curve, later = _bn_shift(mon.history, stat)
            shifts["cnn"].setdefault(stat, []).append(later)
            if seed == 0:
                shift_curves[f"cnn {stat}"] = curve
        log(f"  part 5 cnn batch seed={seed}: acc={r.final:.3f} ({r.seconds:.1f}s)")
    unigram = tf_example.unigram_entropy_bits()
    sec.add(
        "**Paper.** In transformers for NLP, batch norm does clearly worse than layer norm, and the batch statistics "
        "fluctuate much more around the running statistics than in vision networks (large deviations of the batch "
        "mean and variance through training), which PowerNorm fixes (Shen et al., 2020, sections 3 and 5).",
        "",
        f"**Setup.** `examples.transformer.CharTransformer` ({cfg.tf_layers} pre-norm block(s), {cfg.tf_embd} "
        f"channels, context 64, batch {tf_batch}, AdamW 3e-3 with warm-up and cosine decay) for {cfg.tf_steps} steps "
        f"on `pydoc_data.topics`, {cfg.seeds} seed(s); validation bits per character over {cfg.tf_val_batches} "
        f"validation batches (a unigram model scores {unigram:.2f}). Batch-norm statistics from "
        f"`LayerStatsMonitor` every {cfg.tf_monitor_every} steps: `bn/mean_shift` (|batch mean - running mean| / "
        "running std) and `bn/var_shift` (|log(batch var / running var)|), averaged over channels and layers and over "
        f"the logged steps after the first quarter of training; the same for the CNN with batch norm ({cnn_epochs} "
        "epochs of 22 steps).",
        "",
    )
    sec.add(*table(["norm", "val bits/char"], [[norm, fmt(bpc[norm], digits=3)] for norm in cfg.tf_norms]))
    sec.add(*table(["model (batch norm)", "bn/mean_shift", "bn/var_shift"], [
        [model, fmt(shifts[model].get("mean_shift", []), digits=3), fmt(shifts[model].get("var_shift", []), digits=3)]
        for model in ("transformer", "cnn")
    ]))
    m = {k: mean_std(v)[0] for k, v in bpc.items()}
    if "batch" in m and "layer" in m:
        worse = m["batch"] > m["layer"]
        avg_shift = {(model, stat): mean_std(shifts[model].get(stat, []))[0]
                     for model in ("transformer", "cnn") for stat in ("mean_shift", "var_shift")}
        ts, cs = avg_shift[("transformer", "mean_shift")], avg_shift[("cnn", "mean_shift")]
        tv, cv = avg_shift[("transformer", "var_shift")], avg_shift[("cnn", "var_shift")]
        sec.add(
            f"**Agreement.** Validation bits per character: batch norm {m['batch']:.3f} vs layer norm "
            f"{m['layer']:.3f}" + (f", RMS norm {m['rms']:.3f}" if "rms" in m else "") + ": batch norm is "
            + ("worse, as the paper reports. " if worse else "not worse here, unlike the paper. ")
            + f"Batch statistics vs running statistics: mean shift {ts:.3g} in the transformer vs {cs:.3g} in the "
            f"CNN, variance shift {tv:.3g} vs {cv:.3g}: the transformer's batch statistics wander "
            + ("more, as the paper reports." if ts > cs and tv > cv else
               "more in one of the two figures only." if (ts > cs) != (tv > cv) else
               "less than the CNN's here, unlike the paper."), "")
    fig, (ax1, ax2) = plt_figure(2)
    for i, norm in enumerate(cfg.tf_norms):
        c = curves[norm][0]
        ax1.plot([s for s, _ in c], [v for _, v in c], marker="o", color=f"C{i}", label=f"{norm} (seed 0)")
    ax1.axhline(unigram, color="gray", ls=":", label="unigram")
    ax1.set(xlabel="optimizer step", ylabel="validation bits / char", title="transformer")
    for key, curve in shift_curves.items():
        ax2.plot([s for s, _ in curve], [v for _, v in curve], ls="-" if "mean" in key else "--",
                 color="C3" if key.startswith("transformer") else "C0", label=key)
    ax2.set(xlabel="optimizer step", ylabel="mean over layers", yscale="log",
            title="batch vs running statistics (seed 0)")
    ax1.legend(fontsize=8), ax2.legend(fontsize=8)
    save(fig, out, "study_transformer.png", sec, "Validation bits per character, and how far batch statistics are "
         "from the running ones in the transformer and the CNN.")
    if cfg.tf_padded:
        _part_transformer_padded(cfg, out, log, sec, tf_batch)
    return sec


PARTS: dict[str, Callable[[StudyConfig, Path, Log], Section]] = {
    "lr": part_learning_rate,
    "batch_size": part_batch_size,
    "moving_average": part_moving_average,
    "landscape": part_landscape,
    "transformer": part_transformer,
}
