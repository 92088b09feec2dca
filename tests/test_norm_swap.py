import logging
import pickle
import re

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict as FabricAttributeDict
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.parsing import AttributeDict
from torch import nn

from examples.cnn import CNN, DigitsDataModule
from lightning_bn.callbacks import NormSwap
from lightning_bn.layers import BatchNormNd, GhostBatchNorm


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        default_root_dir=tmp_path, max_steps=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def norm_classes(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}


def test_fit_swaps_before_optimizer(tmp_path) -> None:
    model = CNN(norm="batch")
    swap = NormSwap(to="group", num_groups=4)
    t = trainer(tmp_path, [swap], enable_checkpointing=False)
    t.fit(model, DigitsDataModule(batch_size=32))
    assert norm_classes(model) == {"GroupNorm"}
    assert model.model.layer1.bn1.num_groups == 4
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == opt_params
    assert len(swap.last_report) == 6
    # Later stages do not swap again: the trained layers stay the same objects.
    layer = model.model.layer1.bn1
    t.validate(model, DigitsDataModule(batch_size=32), verbose=False)
    t.test(model, DigitsDataModule(batch_size=32), verbose=False)
    assert model.model.layer1.bn1 is layer


def test_validate_and_predict_see_swapped_model(tmp_path) -> None:
    model = CNN(norm="batch")
    t = trainer(tmp_path, [NormSwap(to="layer")], enable_checkpointing=False)
    t.validate(model, DigitsDataModule(batch_size=32), verbose=False)
    assert norm_classes(model) == {"LayerNormChannelsFirst"}


def test_table_printed_on_rank_zero(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer(tmp_path, [NormSwap(to="ghost_batch", virtual_batch_size=8)], enable_checkpointing=False).fit(
            CNN(), DigitsDataModule(batch_size=32)
        )
    text = caplog.text
    assert "NormSwap('ghost_batch') swapped 6 layer(s)" in text
    assert "model.layer1.bn1" in text and "BatchNorm2d" in text and "GhostBatchNorm" in text


def test_resume_and_rebuild_from_checkpoint(tmp_path) -> None:
    dm = DigitsDataModule(batch_size=32)
    L.seed_everything(0)
    model = CNN(norm="batch")
    t = trainer(tmp_path, [NormSwap(to="ghost_batch", virtual_batch_size=8)], max_steps=4)
    t.fit(model, dm)
    ckpt_path = t.checkpoint_callback.best_model_path
    ckpt = torch.load(ckpt_path, weights_only=True)  # what the Trainer writes needs no pickled class
    assert any(k.startswith("NormSwap{") for k in ckpt["callbacks"])

    # Outside the Trainer: rebuilt with the swap and the trained weights.
    rebuilt = NormSwap.load_model(CNN, ckpt_path)
    assert isinstance(rebuilt.model.layer1.bn1, GhostBatchNorm) and rebuilt.model.layer1.bn1.virtual_batch_size == 8
    rebuilt.eval()
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x))

    # Resume: a fresh model built with batch norm is swapped at setup, then the checkpoint restores into it.
    resumed = CNN(norm="batch")
    t2 = trainer(tmp_path, [NormSwap(to="ghost_batch", virtual_batch_size=8)], max_steps=6)
    t2.fit(resumed, dm, ckpt_path=ckpt_path)
    assert t2.global_step == 6
    assert isinstance(resumed.model.layer1.bn1, GhostBatchNorm)


def test_insert_mode(tmp_path) -> None:
    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Plain()
    trainer(tmp_path, [NormSwap(to="batch", insert=True)], enable_checkpointing=False, limit_val_batches=0).fit(
        model, DigitsDataModule(batch_size=32)
    )
    assert isinstance(model.net[0].norm, nn.BatchNorm2d)
    assert int(model.net[0].norm.num_batches_tracked) == 3


def test_state_dict_roundtrip_and_classes() -> None:
    swap = NormSwap(to="batch", include=[nn.GroupNorm, "model.*"], exclude="fc")
    state = swap.state_dict()
    assert state["include"] == ["class:torch.nn.modules.normalization.GroupNorm", "model.*"]
    again = NormSwap.from_state(state)
    assert again.include == [nn.GroupNorm, "model.*"] and again.exclude == "fc"
    model = nn.Sequential(nn.GroupNorm(2, 4))
    again.apply(model)
    assert isinstance(model[0], BatchNormNd)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown norm kind 'gruop'.*group"):
        NormSwap(to="gruop")
    with pytest.raises(ValueError, match="does not take option.*momentum"):
        NormSwap(to="group", momentum=0.1)
    with pytest.raises(TypeError, match="`include` takes"):
        NormSwap(to="group", include=[1])
    with pytest.raises(TypeError, match="`insert` must be a bool"):
        NormSwap(to="group", insert="yes")
    with pytest.raises(ValueError, match="holds no NormSwap settings"):
        NormSwap.apply_from_checkpoint(nn.Linear(1, 1), {"callbacks": {}})


def swapped_checkpoint(hyper_parameters: dict, **extra) -> tuple[CNN, dict]:
    """A small swapped CNN and the checkpoint dict a Trainer would write for it (weights, settings, hparams)."""
    torch.manual_seed(0)
    model = CNN(norm="batch", width=8)
    swap = NormSwap(to="group", num_groups=4, verbose=False)
    swap.apply(model)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": hyper_parameters,
            "callbacks": {swap.state_key: swap.state_dict()}, **extra}
    return model, ckpt


@pytest.mark.parametrize("hparams_cls", [AttributeDict, FabricAttributeDict])
def test_load_model_reads_attribute_dict_hyper_parameters_without_leaking_the_allow_list(tmp_path, hparams_cls):
    allowed = set(torch.serialization.get_safe_globals())  # torch's own additions (nested tensors, device mesh)
    model, ckpt = swapped_checkpoint(hparams_cls(norm="batch", width=8))
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # torch alone refuses it: the allow-list is ours
        torch.load(path, weights_only=True)
    assert NormSwap.apply_from_checkpoint(CNN(norm="batch", width=8), path)[0][0].name == "model.stem.1"

    class AlreadyAllowed:
        pass

    with torch.serialization.safe_globals([AlreadyAllowed]):  # the caller's own allow-list stays as it was
        rebuilt = NormSwap.load_model(CNN, path)
        assert set(torch.serialization.get_safe_globals()) == allowed | {AlreadyAllowed}
    assert set(torch.serialization.get_safe_globals()) == allowed
    assert isinstance(rebuilt.model.layer1.bn1, nn.GroupNorm) and rebuilt.model.layer1.bn1.num_groups == 4
    model.eval()
    rebuilt.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x))


UNPICKLED: list[str] = []


def _record_unpickling(what: str) -> str:
    UNPICKLED.append(what)
    return what


class _Payload:
    """Runs ``_record_unpickling`` when unpickled, as a malicious pickle would run anything."""

    def __reduce__(self):
        return _record_unpickling, ("payload ran",)


class _UserConfig:
    def __init__(self) -> None:
        self.depth = 3


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path) -> None:
    allowed = set(torch.serialization.get_safe_globals())
    _, ckpt = swapped_checkpoint({"norm": "batch", "width": 8}, config=_UserConfig(), payload=_Payload())
    path = tmp_path / "untrusted.ckpt"
    torch.save(ckpt, path)
    names = [f"{__name__}._UserConfig", f"{__name__}._record_unpickling"]
    UNPICKLED.clear()
    for load in (lambda: NormSwap.load_model(CNN, path), lambda: NormSwap.apply_from_checkpoint(CNN(), str(path))):
        with pytest.raises(pickle.UnpicklingError) as info:
            load()
        message = str(info.value)
        assert repr(str(path)) in message
        assert all(name in message for name in names), message
        what_to_do = (r"If you trust the file.*torch\.serialization\.safe_globals\(\[_UserConfig, _record_unpickling"
                      r"\]\).*`weights_only` set to False\) and pass it as `checkpoint`")
        assert re.search(what_to_do, message), message
    assert UNPICKLED == []
    assert set(torch.serialization.get_safe_globals()) == allowed
    # Negative control: a plain unpickling of the same file runs the payload.
    torch.load(path, weights_only=False)
    assert UNPICKLED == ["payload ran"]
    # What the message says to do for a trusted file works.
    with torch.serialization.safe_globals([_UserConfig, _record_unpickling]):
        rebuilt = NormSwap.load_model(CNN, path)
    assert isinstance(rebuilt.model.layer1.bn1, nn.GroupNorm)


class BuiltInConfigureModel(L.LightningModule):
    """Layers built in configure_model (idempotent, as Lightning documents it), or rebuilt on every call."""

    def __init__(self, idempotent: bool = True) -> None:
        super().__init__()
        self.idempotent = idempotent
        self.model: nn.Module | None = None
        self.calls = 0

    def configure_model(self) -> None:
        self.calls += 1
        if self.idempotent and self.model is not None:
            return
        self.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                                   nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _regression_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit_configure_model(tmp_path, **trainer_kwargs) -> tuple[list[str], bool, int, torch.Tensor]:
    torch.manual_seed(0)
    module = BuiltInConfigureModel()
    swap = NormSwap(to="layer", verbose=False)
    t = trainer(tmp_path, [swap], enable_checkpointing=False, max_steps=2, **trainer_kwargs)
    t.fit(module, _regression_loader())
    assert module.model is not None
    classes = [type(m).__name__ for m in module.model if "Norm" in type(m).__name__]
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    return classes, opt_params == {id(p) for p in module.parameters()}, module.calls, weights


def test_layers_built_in_configure_model_are_swapped(tmp_path) -> None:
    classes, optimizer_has_them, calls, _ = _fit_configure_model(tmp_path)
    assert classes == ["LayerNormChannelsFirst", "LayerNormChannelsFirst"]
    assert optimizer_has_them and calls == 3  # NormSwap's two calls (build, then the check), then Lightning's


def test_configure_model_that_rebuilds_is_refused(tmp_path) -> None:
    module = BuiltInConfigureModel(idempotent=False)
    t = trainer(tmp_path, [NormSwap(to="layer", verbose=False)], enable_checkpointing=False, max_steps=1)
    message = r"again replaced 2 of them \(model\.1, model\.4\).*idempotent.*swap_norms\(self, 'layer'\)"
    with pytest.raises(MisconfigurationException, match=message):
        t.fit(module, _regression_loader())


def _ddp_configure_model(rank: int, world_size: int, root: str) -> tuple[list[str], bool, torch.Tensor]:
    from pathlib import Path

    classes, optimizer_has_them, _, weights = _fit_configure_model(
        Path(root), accelerator="cpu", devices=2, strategy="ddp"
    )
    return classes, optimizer_has_them, weights


def test_layers_built_in_configure_model_are_swapped_under_ddp(tmp_path) -> None:
    from tests.dist import run_distributed

    results = run_distributed(_ddp_configure_model, 2, str(tmp_path), init_process_group=False, timeout=240)
    for classes, optimizer_has_them, _ in results:
        assert classes == ["LayerNormChannelsFirst", "LayerNormChannelsFirst"] and optimizer_has_them
    torch.testing.assert_close(results[0][2], results[1][2])  # DDP trained the swapped layers in step
