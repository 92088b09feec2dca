"""BatchNormRecalibration: exact batch-norm statistics before validation, at epoch end or at the end of fit."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_bn._checks import check_choice, check_positive_int
from lightning_bn.callbacks._training_step import muted_training_step
from lightning_bn.recalibrate import ForwardFn, RecalibrationReport, default_forward, has_own_forward, recalibrate_bn

__all__ = ["BatchNormRecalibration", "default_feed", "should_recalibrate", "fresh_loader"]

WHEN = ("validation_start", "train_epoch_end", "fit_end", "test_start")
# An automatic progress bar (``progress=None``) appears when a recalibration runs more batches than this.
PROGRESS_MIN_BATCHES = 50


def should_recalibrate(when: str, hook: str, epoch: int, every_n_epochs: int, sanity_checking: bool = False) -> bool:
    """Whether the callback configured with ``when`` and ``every_n_epochs`` recalibrates at ``hook`` in ``epoch``
    (0-based). Never during the sanity check; ``fit_end`` and ``test_start`` ignore ``every_n_epochs``."""
    if hook != when or sanity_checking:
        return False
    if when in ("fit_end", "test_start"):
        return True
    return (epoch + 1) % every_n_epochs == 0


def default_feed(pl_module: nn.Module) -> ForwardFn:
    """How the callback feeds a batch when no ``forward`` is given: a module with a ``forward`` of its own gets the
    batch as :func:`lightning_bn.recalibrate.default_forward` gives it (a tensor, the first tensor of a tuple or list,
    a mapping as keywords); a module without one (its ``training_step`` calls an inner model) runs its own
    ``training_step(batch, 0)`` with ``self.log`` muted, so the batch-norm layers see the inputs training gives them.
    """
    if has_own_forward(pl_module):
        return default_forward

    def training_step(model: nn.Module, batch: Any) -> Any:
        return muted_training_step(model, batch, 0)  # type: ignore[arg-type]

    return training_step


def fresh_loader(loader: Any) -> Any:
    """An iterable over the same batches as ``loader`` whose iterator is independent of any other.

    A DataLoader gives a new iterator on each ``iter()``, except with ``persistent_workers`` where it resets the
    one iterator it keeps, which the fit loop may be using; that one is rebuilt with the same dataset, sampler
    (a ``DistributedSampler`` included) and collate function, without persistent workers. Several loaders (a list
    or mapping, as ``trainer.train_dataloader`` may be) are combined as the fit loop does (``max_size_cycle``).
    """
    if isinstance(loader, DataLoader):
        if not (loader.persistent_workers and loader.num_workers > 0):
            return loader
        common = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "prefetch_factor": loader.prefetch_factor,
            "persistent_workers": False,
        }
        if isinstance(loader.dataset, IterableDataset):
            return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
        if loader.batch_sampler is not None:
            return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, **common)
        return DataLoader(loader.dataset, batch_size=None, sampler=loader.sampler, **common)
    if isinstance(loader, (list, tuple, Mapping)):
        return _Batches(CombinedLoader(loader, mode="max_size_cycle"))
    return loader


class _Batches:
    """Re-iterable view of a CombinedLoader that yields only the batches."""

    def __init__(self, combined: CombinedLoader) -> None:
        self.combined = combined

    def __iter__(self) -> Iterator[Any]:
        for batch, _, _ in iter(self.combined):
            yield batch


class _Transferred:
    """Re-iterable: the LightningModule's batch-transfer hooks and the precision plugin's input conversion applied
    to each batch, as the fit loop would."""

    def __init__(self, batches: Iterable[Any], trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.batches, self.trainer, self.pl_module = batches, trainer, pl_module

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        module, precision = self.pl_module, self.trainer.precision_plugin
        for batch in self.batches:
            batch = module.on_before_batch_transfer(batch, 0)
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            batch = module.on_after_batch_transfer(batch, 0)
            yield precision.convert_input(batch)


class BatchNormRecalibration(Callback):
    """Set batch-norm running statistics to exact population statistics during training.

    Calls :func:`lightning_bn.recalibrate_bn` on the LightningModule: by default before each validation, from a
    fresh iterator over the trainer's train dataloader (the training loop's own iterator is not touched, and the
    random number generators are left as they were, so training runs exactly as without the callback). Under DDP
    each process uses its shard (the loader's ``DistributedSampler``) and the statistics are reduced in one
    collective, so every process, and the checkpoint, holds the statistics of the whole data. Batches go through
    the module's batch-transfer hooks and the trainer's precision (autocast for mixed precision), without
    gradients; the model's modes, momenta and flags are restored afterwards.

    A ``dataloader`` of new data instead adapts the statistics to it (AdaBN, Li et al., 2016), for example with
    ``when="test_start"`` before ``trainer.test`` on a shifted domain.

    With ``StochasticWeightAveraging``: SWA puts the averaged weights in place at the start of the extra epoch it
    adds to update batch norm; validation, ``train_epoch_end`` and ``fit_end`` of that epoch all come after, so the
    final statistics are those of the averaged weights, exact rather than SWA's average of batch variances.

    Args:
        num_batches: batches per process per recalibration (``None``: the whole loader).
        dataloader: where the batches come from (default: the trainer's train dataloader).
        every_n_epochs: for ``validation_start`` and ``train_epoch_end``, recalibrate in every n-th epoch.
        when: ``"validation_start"`` (before each validation of ``fit``, not the sanity check),
            ``"train_epoch_end"``, ``"fit_end"`` or ``"test_start"`` (requires ``dataloader``).
        exact_eval: recompute depth level by level from eval-mode features (see :func:`recalibrate_bn`; one pass
            per level).
        forward: ``forward(model, batch)`` to feed a batch. Default (:func:`default_feed`): a module with a
            ``forward`` of its own gets the batch as a tensor, the first tensor of a tuple or list, or a mapping as
            keywords; a module without one runs its own ``training_step(batch, 0)`` with ``self.log`` muted.
        modules: only these batch-norm layers (names or modules).
        progress: a progress bar on rank zero; ``None`` shows one when the trainer has a progress bar and a
            recalibration runs more than 50 batches.
        log: write the per-layer shifts to the trainer's loggers.
        padding_mask_from: for padded sequences, ``padding_mask_from(batch)`` maps a batch (after the batch-transfer
            hooks) to its boolean ``(N, *)`` mask (True, or nonzero, at a real token), and each batch is fed under
            :func:`lightning_bn.padding_mask` of it, e.g. ``lambda batch: batch["attention_mask"]``. Not needed when
            the feeding sets the mask itself: a LightningModule whose ``training_step`` (the default feed without a
            ``forward`` of its own) or ``forward`` enters ``padding_mask``, or a model with
            :func:`lightning_bn.set_padding_mask_from` hooks. Either way the statistics are those of the real tokens.

    Raises:
        MisconfigurationException: a ``when`` outside the list above, ``every_n_epochs`` or ``num_batches`` not a
            positive int, or ``when="test_start"`` without a ``dataloader``; at setup, a module without a ``forward``
            under manual optimization and no ``forward`` given (its ``training_step`` would step the optimizer);
            ``padding_mask_from`` not callable.

    Logged metrics (rank zero, through every logger of the trainer, at ``trainer.global_step``; the hooks
    ``on_fit_end`` does not allow ``self.log``, so the loggers are called directly):
        - ``bn/recal_mean_shift/<layer>``: mean over channels of ``|old mean - new mean| / new std``.
        - ``bn/recal_var_shift/<layer>``: mean over channels of ``|old var - new var| / new var``.

    Example::

        >>> import lightning as L
        >>> from lightning_bn.callbacks import BatchNormRecalibration
        >>> trainer = L.Trainer(callbacks=[BatchNormRecalibration(num_batches=200)])
    """

    def __init__(
        self,
        num_batches: int | None = 100,
        dataloader: Iterable[Any] | None = None,
        every_n_epochs: int = 1,
        when: str = "validation_start",
        exact_eval: bool = False,
        forward: ForwardFn | None = None,
        modules: Iterable[str | nn.Module] | None = None,
        progress: bool | None = None,
        log: bool = True,
        padding_mask_from: Callable[[Any], Tensor | None] | None = None,
    ) -> None:
        check_choice("when", when, WHEN, error=MisconfigurationException)
        check_positive_int("every_n_epochs", every_n_epochs, error=MisconfigurationException)
        check_positive_int(
            "num_batches", num_batches, allow_none=True, none_means="the whole loader", error=MisconfigurationException
        )
        if when == "test_start" and dataloader is None:
            raise MisconfigurationException(
                "`when='test_start'` adapts the statistics to new data: pass the data as `dataloader`"
            )
        if forward is not None and not callable(forward):
            raise MisconfigurationException(f"`forward` must be callable as forward(model, batch), got {forward!r}")
        if padding_mask_from is not None and not callable(padding_mask_from):
            raise MisconfigurationException(
                f"`padding_mask_from` must be callable as padding_mask_from(batch) -> mask, got {padding_mask_from!r}"
            )
        self.num_batches = num_batches
        self.dataloader = dataloader
        self.every_n_epochs = every_n_epochs
        self.when = when
        self.exact_eval = exact_eval
        self.forward = forward
        self.modules = list(modules) if modules is not None else None
        self.progress = progress
        self.log = log
        self.padding_mask_from = padding_mask_from
        self.num_recalibrations = 0
        self.last_report: RecalibrationReport | None = None
        self._warned_no_loader = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(when=self.when, every_n_epochs=self.every_n_epochs)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.forward is None and not has_own_forward(pl_module) and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"BatchNormRecalibration feeds {type(pl_module).__name__}, which has no forward of its own, through "
                "its training_step, which under manual optimization steps the optimizer; pass "
                "`forward=lambda pl_module, batch: ...` (e.g. `lambda m, b: m.model(b[0])`), got forward=None"
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" or self.dataloader is not None:
            self._maybe_run(trainer, pl_module, "validation_start")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_run(trainer, pl_module, "train_epoch_end")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_run(trainer, pl_module, "fit_end")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_run(trainer, pl_module, "test_start")

    def _maybe_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str) -> None:
        if should_recalibrate(self.when, hook, trainer.current_epoch, self.every_n_epochs, trainer.sanity_checking):
            self.recalibrate(trainer, pl_module)

    def recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RecalibrationReport | None:
        """Recalibrate now (every process must call it) and log the report; None when there is no data."""
        source = self.dataloader if self.dataloader is not None else trainer.train_dataloader
        if source is None:  # the same on every process, so no process is left waiting in the reduction
            if not self._warned_no_loader:
                rank_zero_warn(
                    "BatchNormRecalibration: no train dataloader outside `fit` and no `dataloader` given; "
                    "skipping recalibration"
                )
                self._warned_no_loader = True
            return None
        batches = _Transferred(fresh_loader(source), trainer, pl_module)
        precision, feed = trainer.precision_plugin, self.forward or default_feed(pl_module)

        def forward(model: nn.Module, batch: Any) -> Any:
            with precision.forward_context():
                return feed(model, batch)

        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # a sampler drawing a seed leaves training's randomness alone
            report = recalibrate_bn(
                pl_module,
                batches,
                num_batches=self.num_batches,
                forward=forward,
                modules=self.modules,
                progress=self._show_progress(trainer, batches),
                exact_eval=self.exact_eval,
                padding_mask_from=self.padding_mask_from,
            )
        self.num_recalibrations += 1
        self.last_report = report
        if self.log and trainer.is_global_zero and report.layers:
            metrics = report.metrics()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return report

    def _show_progress(self, trainer: pl.Trainer, batches: Any) -> bool:
        if self.progress is not None:
            return self.progress
        if trainer.progress_bar_callback is None:
            return False
        try:
            total = len(batches)
        except TypeError:
            total = None
        if self.num_batches is not None:
            total = self.num_batches if total is None else min(total, self.num_batches)
        return total is None or total > PROGRESS_MIN_BATCHES

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"num_recalibrations": self.num_recalibrations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_recalibrations = int(state_dict.get("num_recalibrations", 0))
