import logging

import lightning as L
import pytest
import torch
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
    ckpt = torch.load(ckpt_path, weights_only=False)
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
