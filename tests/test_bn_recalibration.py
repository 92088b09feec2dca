"""BatchNormRecalibration in real Trainers: validation, logging, DDP over gloo, SWA, mixed precision, AdaBN."""

from __future__ import annotations

import copy
import glob
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import recalibrate_bn
from lightning_bn.callbacks import BatchNormRecalibration
from lightning_bn.callbacks.bn_recalibration import fresh_loader, should_recalibrate
from tests.dist import run_distributed

LAYERS = ("bn1", "bn2")


class TinyNet(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, momentum=0.9)  # a moving average that lags: recalibration changes a lot
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6, momentum=0.9)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(self.drop(h.mean((2, 3))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def dataset(n: int = 64, shift: float = 0.0, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) + y.view(-1, 1, 1, 1).float() + shift
    return TensorDataset(x, y)


def loader(ds: TensorDataset | None = None, shuffle: bool = False, **kwargs) -> DataLoader:
    return DataLoader(ds if ds is not None else dataset(), batch_size=16, shuffle=shuffle, **kwargs)


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=2, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        num_sanity_val_steps=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def running(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def exact_stats(model: nn.Module, batches, **kwargs) -> dict[str, Tensor]:
    ref = copy.deepcopy(model)
    recalibrate_bn(ref, batches, **kwargs)
    return running(ref)


def assert_stats(actual: dict, expected: dict, **tol) -> None:
    assert actual.keys() == expected.keys()
    for k in actual:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=k)


class Recorder(Callback):
    """Running statistics seen by each validation, and the weights at each train-epoch end."""

    def __init__(self) -> None:
        self.at_validation: list[dict] = []
        self.weights: list[dict] = []

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.at_validation.append(running(pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def test_recalibrates_before_each_validation_logs_and_leaves_training_alone(tmp_path) -> None:
    torch.manual_seed(0)
    model, recorder = TinyNet(), Recorder()
    # exact_eval: statistics of eval-mode features, independent of how the shuffled loader groups the samples
    callback = BatchNormRecalibration(num_batches=None, exact_eval=True)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(tmp_path, [callback, recorder], logger=logger).fit(model, loader(shuffle=True), loader())

    assert callback.num_recalibrations == 2  # two epochs, not the sanity check
    # the last validation saw the exact statistics of the final weights over the whole train set
    expected = exact_stats(model, loader(), exact_eval=True)
    assert_stats(recorder.at_validation[-1], expected, rtol=1e-5, atol=1e-6)
    assert callback.last_report is not None and callback.last_report.num_batches == 4
    assert callback.last_report.layers["bn1"].var_shift > 0.01  # momentum 0.9: the moving average lagged

    # the same training without the callback ends with the same weights (loader, RNG and weights untouched)
    torch.manual_seed(0)
    plain = TinyNet()
    trainer(tmp_path, []).fit(plain, loader(shuffle=True), loader())
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    assert not torch.allclose(model.bn1.running_var, plain.bn1.running_var, rtol=1e-3)

    # the per-layer shifts reached TensorBoard, once per recalibration, at the global step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(os.path.join(logger.log_dir, "events.out.tfevents.*"))[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"bn/recal_{s}_shift/{layer}" for s in ("mean", "var") for layer in LAYERS} <= tags
    var_shift = events.Scalars("bn/recal_var_shift/bn2")
    assert [e.step for e in var_shift] == [4, 8]
    assert var_shift[-1].value == pytest.approx(callback.last_report.layers["bn2"].var_shift, rel=1e-6)


def test_with_swa_recalibrates_the_averaged_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model, recorder = TinyNet(lr=0.2), Recorder()
    swa = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=2, annealing_epochs=1)
    callback = BatchNormRecalibration(num_batches=None, when="train_epoch_end")
    trainer(tmp_path, [swa, callback, recorder], max_epochs=3, num_sanity_val_steps=0).fit(model, loader(), loader())

    # SWA averaged the weights at the starts of epochs 1 and 2: those after epochs 0 and 1
    for name, p in model.named_parameters():
        avg = (recorder.weights[0][name] + recorder.weights[1][name]) / 2
        torch.testing.assert_close(p.detach(), avg, rtol=1e-5, atol=1e-6)
    last = torch.cat([w.flatten() for w in recorder.weights[2].values()])
    assert not torch.allclose(torch.cat([p.detach().flatten() for p in model.parameters()]), last)  # not the last
    # ... and the statistics are the exact ones of those averaged weights, not SWA's average of batch variances
    assert_stats(running(model), exact_stats(model, loader()), rtol=1e-5, atol=1e-6)
    assert callback.num_recalibrations == 4  # three epochs plus SWA's batch-norm epoch
    torch.manual_seed(0)
    swa_only = TinyNet(lr=0.2)
    swa2 = StochasticWeightAveraging(swa_lrs=0.1, swa_epoch_start=2, annealing_epochs=1)
    trainer(tmp_path, [swa2], max_epochs=3, num_sanity_val_steps=0).fit(swa_only, loader(), loader())
    for p, q in zip(model.parameters(), swa_only.parameters()):
        assert torch.equal(p, q)
    assert not torch.allclose(swa_only.bn2.running_var, model.bn2.running_var, rtol=1e-4)


def test_mixed_precision_accumulation_and_adabn_on_new_data(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    shifted = loader(dataset(48, shift=3.0, seed=5))
    at_fit_end = BatchNormRecalibration(num_batches=None, dataloader=shifted, when="fit_end", exact_eval=True)
    at_test = BatchNormRecalibration(num_batches=2, dataloader=loader(dataset(48, shift=-2.0, seed=6)),
                                     when="test_start")
    fit = trainer(tmp_path, [at_fit_end, at_test], precision="bf16-mixed", accumulate_grad_batches=2)
    fit.fit(model, loader(), loader())

    def autocast_forward(m: nn.Module, batch) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(batch[0])

    expected = exact_stats(model, shifted, forward=autocast_forward, exact_eval=True)
    assert_stats(running(model), expected, rtol=1e-6, atol=1e-6)
    assert at_fit_end.last_report.num_passes == 2 and at_test.num_recalibrations == 0
    on_train_data = exact_stats(model, loader(), forward=autocast_forward, exact_eval=True)
    assert not torch.allclose(on_train_data["bn1.running_mean"], expected["bn1.running_mean"], atol=0.1)

    before_test = copy.deepcopy(model)
    fit.test(model, loader(dataset(48, shift=-2.0, seed=6)), verbose=False)
    assert at_test.num_recalibrations == 1 and at_test.last_report.num_batches == 2
    adapted = exact_stats(before_test, loader(dataset(48, shift=-2.0, seed=6)), forward=autocast_forward,
                          num_batches=2)
    assert_stats(running(model), adapted, rtol=1e-6, atol=1e-6)


def _ddp_fit(rank: int, world_size: int, tmp: str) -> dict:
    torch.manual_seed(0)
    model = TinyNet()
    callback = BatchNormRecalibration(num_batches=None, exact_eval=True)
    fit = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, precision="64-true", callbacks=[callback],
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp, num_sanity_val_steps=0, limit_val_batches=1,
    )
    fit.fit(model, loader(dataset(96)), loader())
    # what this process alone would compute from its shard (a group of one process: no reduction)
    alone = [torch.distributed.new_group([r]) for r in range(world_size)][rank]
    shard = [(x.double(), y) for x, y in fit.train_dataloader]
    own = copy.deepcopy(model)
    recalibrate_bn(own, shard, exact_eval=True, group=alone)
    return {"running": running(model), "own": running(own), "state": model.state_dict(),
            "num_batches": callback.last_report.num_batches}


def test_ddp_each_process_its_shard_one_reduction_identical_statistics(tmp_path) -> None:
    ranks = run_distributed(_ddp_fit, 2, str(tmp_path), timeout=180, init_process_group=False)
    for key, value in ranks[0]["running"].items():
        assert torch.equal(value, ranks[1]["running"][key]), key  # identical on both processes, bit for bit
    assert ranks[0]["num_batches"] == 6  # 3 batches of the 48-sample shard on each of 2 processes
    # one process on all the data (the shards cover the 96 samples once) with the same weights
    final = TinyNet().double()
    final.load_state_dict(ranks[0]["state"])
    expected = exact_stats(final, [(x.double(), y) for x, y in loader(dataset(96))], exact_eval=True)
    assert_stats(ranks[0]["running"], expected, rtol=1e-10, atol=1e-12)
    # each shard alone gives other statistics: without the reduction the processes would disagree
    assert not torch.allclose(ranks[0]["own"]["bn2.running_var"], ranks[1]["own"]["bn2.running_var"], rtol=1e-3)


def test_persistent_worker_loaders_are_rebuilt_and_others_reused() -> None:
    plain = loader()
    assert fresh_loader(plain) is plain
    persistent = loader(num_workers=1, persistent_workers=True)
    rebuilt = fresh_loader(persistent)
    assert rebuilt is not persistent and not rebuilt.persistent_workers
    assert rebuilt.batch_sampler is persistent.batch_sampler and rebuilt.dataset is persistent.dataset
    batches = list(fresh_loader([plain, plain]))
    assert len(batches) == 4 and len(batches[0]) == 2  # several loaders combined as the fit loop does


def test_when_and_every_n_epochs_schedule() -> None:
    assert should_recalibrate("validation_start", "validation_start", 0, 1)
    assert not should_recalibrate("validation_start", "validation_start", 0, 1, sanity_checking=True)
    assert not should_recalibrate("validation_start", "train_epoch_end", 0, 1)
    assert [should_recalibrate("train_epoch_end", "train_epoch_end", e, 3) for e in range(6)] == [
        False, False, True, False, False, True,
    ]
    assert should_recalibrate("fit_end", "fit_end", 4, 3)


def test_constructor_errors_name_the_argument_and_state_round_trips() -> None:
    with pytest.raises(MisconfigurationException, match="`when` must be one of validation_start, .*got 'val'"):
        BatchNormRecalibration(when="val")
    with pytest.raises(MisconfigurationException, match="`every_n_epochs` must be a positive int, got 0"):
        BatchNormRecalibration(every_n_epochs=0)
    with pytest.raises(MisconfigurationException, match="`num_batches` must be a positive int or None.*got -3"):
        BatchNormRecalibration(num_batches=-3)
    with pytest.raises(MisconfigurationException, match="`when='test_start'`.*`dataloader`"):
        BatchNormRecalibration(when="test_start")
    callback = BatchNormRecalibration()
    callback.num_recalibrations = 5
    other = BatchNormRecalibration()
    other.load_state_dict(callback.state_dict())
    assert other.num_recalibrations == 5
    other.load_state_dict({})  # an older checkpoint without the field
    assert other.num_recalibrations == 0
    assert BatchNormRecalibration(when="fit_end").state_key != callback.state_key


class NoForward(L.LightningModule):
    """No forward of its own: training_step calls the inner model (and logs), as Hugging Face wrappers do."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5, momentum=0.9), nn.Linear(5, 3))
        self.automatic_optimization = not manual
        self.logged: list[str] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def log(self, name: str, *args, **kwargs) -> None:  # type: ignore[override]
        self.logged.append(name)
        super().log(name, *args, **kwargs)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_defaults_feed_a_module_without_forward_through_its_training_step(tmp_path) -> None:
    torch.manual_seed(0)
    model = NoForward()
    callback = BatchNormRecalibration(num_batches=None)
    trainer(tmp_path, [callback], max_epochs=1, num_sanity_val_steps=0).fit(model, loader(), loader())
    assert callback.num_recalibrations == 1 and set(callback.last_report.layers) == {"model.2"}
    # The population statistics of the BN input over the whole train loader, with the weights after the epoch.
    with torch.no_grad():
        inputs = torch.cat([model.model[1](model.model[0](x)) for x, _ in loader()])
    torch.testing.assert_close(model.model[2].running_mean, inputs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.model[2].running_var, inputs.var(0), rtol=1e-5, atol=1e-6)
    steps = len(loader())
    assert model.logged.count("train/loss") == steps  # the recalibration's training_step calls logged nothing
    assert "log" not in model.__dict__


def test_module_without_forward_under_manual_optimization_needs_forward(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match="no forward of its own.*manual optimization.*`forward="):
        trainer(tmp_path, [BatchNormRecalibration()], max_epochs=1).fit(NoForward(manual=True), loader(), loader())
