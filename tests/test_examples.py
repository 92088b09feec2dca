"""The examples through LightningCLI with their YAML configs: every norm kind, NormSwap, DDP on CPU, W&B offline,
the transformer's data (fixed split, vocabulary, unigram entropy) and its padded task (sequences, padding, masked
loss, the padding mask around the model)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn

from examples.cnn import CNN, DigitsDataModule
from examples.loggers import AutoWandbLogger, wandb_offline_default
from examples.transformer import (
    IGNORE_INDEX,
    CharTransformer,
    ContiguousWindows,
    PydocTextDataModule,
    lr_factor,
    main,
    masked_cross_entropy,
    pad_collate,
    pydoc_text,
    split_sequences,
    unigram_entropy_bits,
)
from lightning_bn.callbacks import BatchNormRecalibration, LayerStatsMonitor, NormSwap
from lightning_bn.layers import available_norms, is_batch_norm
from lightning_bn.layers._batch import BatchNormChannelsLast
from lightning_bn.padding import active_padding_mask
from lightning_bn.swap import find_norms
from tests.dist import run_distributed
from tests.tb_utils import find_wandb_offline_runs, read_tb_scalars, read_wandb_offline_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
# A small transformer: the CLI tests check wiring, not learning.
TINY_GPT = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--data.block_size", "16",
            "--data.batch_size", "8", "--data.samples_per_epoch", "64"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _transformer_args(tmp: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "transformer.yaml"), *TINY_GPT, *QUIET,
            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp), *extra]


def _cnn_args(tmp: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "cnn.yaml"), "--model.width", "8", *QUIET,
            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp), *extra]


def _cnn_cli(args: list[str]) -> LightningCLI:
    # examples.cnn.main(args) builds this same CLI; called here to get the trainer and model back
    return LightningCLI(CNN, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


def _norms(model: nn.Module) -> list[tuple[str, str, str]]:
    return [(name, info.kind, info.layout) for name, _, info in find_norms(model)]


def _metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI(args=...) warns when sys.argv holds other arguments (here pytest's)."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])


# ---------------------------------------------------------------------------------------------------------------------
# Every norm kind through LightningCLI


@pytest.mark.parametrize("kind", available_norms())
def test_transformer_cli_every_norm(kind, tmp_path):
    cli = main(_transformer_args(tmp_path, "--model.norm", kind, "--trainer.fast_dev_run", "1"))
    assert cli.model.hparams.norm == kind
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size == 103  # linked from the data module
    assert cli.model.hparams.block_size == 16
    norms = _norms(cli.model)
    if kind == "none":
        assert norms == []
        assert isinstance(cli.model.model.blocks[0].ln_1, nn.Identity)
    else:  # ln_1, ln_2 of the one block and ln_f, all channels-last over the tokens
        assert norms == [(n, kind, "channels_last") for n in ("model.blocks.0.ln_1", "model.blocks.0.ln_2",
                                                               "model.ln_f")]
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, (LayerStatsMonitor, BatchNormRecalibration))] \
        == [LayerStatsMonitor, BatchNormRecalibration]
    metrics = _metrics(cli.trainer)
    assert cli.trainer.global_step == 1
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-6)
    assert metrics["val/loss"] < 2 * math.log(103)  # near chance (ln 103) after one step, not diverged


@pytest.mark.parametrize("kind", available_norms())
def test_cnn_cli_every_norm(kind, tmp_path):
    cli = _cnn_cli(_cnn_args(tmp_path, "--model.norm", kind, "--trainer.fast_dev_run", "1"))
    norms = _norms(cli.model)
    if kind == "none":
        assert norms == []
    else:  # stem, two blocks of two, one shortcut
        assert len(norms) == 6 and {(k, layout) for _, k, layout in norms} == {(kind, "channels_first")}
    metrics = _metrics(cli.trainer)
    assert cli.trainer.global_step == 1
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["val/acc"] <= 1.0


def test_norm_swap_config_swaps_and_is_overridable(tmp_path):
    base = _cnn_args(tmp_path, "--config", str(CONFIGS / "norm_swap.yaml"), "--trainer.fast_dev_run", "1")
    cli = _cnn_cli(base)
    assert isinstance(cli.trainer.callbacks[2], NormSwap) and cli.trainer.callbacks[2].to == "group"
    assert {k for _, k, _ in _norms(cli.model)} == {"group"}  # the model was built with batch norm (cnn.yaml)
    cli = _cnn_cli([*base, "--trainer.callbacks.to", "layer"])
    assert {(k, layout) for _, k, layout in _norms(cli.model)} == {("layer", "channels_first")}
    assert not any(is_batch_norm(m) for m in cli.model.modules())


def test_python_dash_m_form(tmp_path):
    cmd = [sys.executable, "-m", "examples.transformer", *_transformer_args(
        tmp_path, "--model.norm", "rms", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (log_dir,) = (tmp_path / "transformer").iterdir()
    scalars = read_tb_scalars(log_dir)
    assert [s for s, _ in scalars["train/loss"]] == [0, 1]
    ((step, bpc),) = scalars["val/bpc"]
    ((_, loss),) = scalars["val/loss"]
    assert step == 1 and bpc == pytest.approx(loss / math.log(2), rel=1e-6)
    assert any(tag.startswith("act/std/model.blocks.0.ln_1") for tag in scalars)  # the monitor from the config
    assert "norm: rms" in (log_dir / "config.yaml").read_text()  # the CLI saved the resolved config


# ---------------------------------------------------------------------------------------------------------------------
# Two DDP processes on CPU: the same CLI with --trainer.devices 2 --trainer.strategy ddp


def _ddp_examples(rank: int, world_size: int, tmp: str) -> dict:
    ddp = ["--trainer.devices", str(world_size), "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    gpt = main(_transformer_args(
        Path(tmp) / "gpt", "--model.norm", "batch", "--data.block_size", "64", "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", *ddp))
    cnn = _cnn_cli(_cnn_args(
        Path(tmp) / "cnn", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.log_every_n_steps", "1", *ddp))
    return {
        "world_size": gpt.trainer.world_size,
        "gpt_state": {k: v.clone() for k, v in gpt.model.state_dict().items()},
        "gpt_metrics": _metrics(gpt.trainer),
        "gpt_steps": gpt.trainer.global_step,
        "cnn_state": {k: v.clone() for k, v in cnn.model.state_dict().items()},
        "cnn_metrics": _metrics(cnn.trainer),
        "recalibrations": [c.num_recalibrations for c in gpt.trainer.callbacks + cnn.trainer.callbacks
                           if isinstance(c, BatchNormRecalibration)],
    }


def test_examples_ddp_two_processes_match_one_process(tmp_path):
    results = run_distributed(_ddp_examples, 2, str(tmp_path), timeout=400, init_process_group=False)
    r0, r1 = results
    assert r0["world_size"] == r1["world_size"] == 2 and r0["gpt_steps"] == 2
    assert r0["recalibrations"] == r1["recalibrations"] == [1, 1]
    for key in ("gpt_state", "cnn_state"):  # DDP keeps the replicas equal, running statistics included
        assert r0[key].keys() == r1[key].keys()
        for name in r0[key]:
            torch.testing.assert_close(r0[key][name], r1[key][name], rtol=0, atol=0, msg=name)
    assert r0["gpt_metrics"]["val/loss"] == r1["gpt_metrics"]["val/loss"]
    assert r0["cnn_metrics"]["val/acc"] == r1["cnn_metrics"]["val/acc"]

    # The validation the two processes reported, computed in one process on all the data with the final weights.
    dm = PydocTextDataModule(block_size=64, batch_size=8)
    val = ContiguousWindows(dm.val_data, 64)
    assert len(val) % 2 == 0  # the DistributedSampler splits it evenly, without padding
    gpt = CharTransformer(norm="batch", vocab_size=dm.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    gpt.load_state_dict(r0["gpt_state"])
    gpt.eval()
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        loss = F.cross_entropy(gpt(x).flatten(0, 1), y.flatten())
    assert r0["gpt_metrics"]["val/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert r0["gpt_metrics"]["val/bpc"] == pytest.approx(loss.item() / math.log(2), rel=1e-5)

    digits = DigitsDataModule()
    digits.setup("fit")
    xs, ys = digits.val_set.tensors
    padded = list(range(len(xs))) + list(range(-len(xs) % 2))  # DistributedSampler pads to a multiple of 2
    cnn = CNN(norm="batch", width=8)
    cnn.load_state_dict(r0["cnn_state"])
    cnn.eval()
    with torch.no_grad():
        per_rank = [cnn(xs[padded[r::2]]) for r in range(2)]
    acc = np.mean([(logits.argmax(-1) == ys[padded[r::2]]).float().mean().item() for r, logits in enumerate(per_rank)])
    cnn_loss = np.mean([F.cross_entropy(logits, ys[padded[r::2]]).item() for r, logits in enumerate(per_rank)])
    assert r0["cnn_metrics"]["val/acc"] == pytest.approx(acc, abs=1e-6)
    assert r0["cnn_metrics"]["val/loss"] == pytest.approx(cnn_loss, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# W&B: offline without an API key, online with one


def test_wandb_offline_default_reads_the_environment():
    assert wandb_offline_default({}) is True
    assert wandb_offline_default({"WANDB_API_KEY": ""}) is True
    assert wandb_offline_default({"WANDB_API_KEY": "0123abcd"}) is False
    assert wandb_offline_default({"WANDB_API_KEY": "0123abcd", "WANDB_MODE": "offline"}) is True
    assert wandb_offline_default({"WANDB_MODE": "disabled"}) is False  # W&B itself follows the variable
    with pytest.raises(ValueError, match=r"`WANDB_MODE`.*offline.*got 'sometimes'"):
        wandb_offline_default({"WANDB_MODE": "sometimes"})


def test_auto_wandb_logger_picks_the_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert AutoWandbLogger().chose_offline is True  # no run starts until the logger's experiment is used
    monkeypatch.setenv("WANDB_API_KEY", "0123abcd")
    assert AutoWandbLogger().chose_offline is False
    assert AutoWandbLogger(offline=True).chose_offline is True  # an explicit choice wins


def test_wandb_config_writes_an_offline_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards (WandbLogger sets it for the process)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    args = _transformer_args(tmp_path, "--config", str(CONFIGS / "wandb.yaml"), "--trainer.max_steps", "2",
                             "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                             "--trainer.log_every_n_steps", "1")
    try:
        cli = main(args)
    finally:
        wandb.finish()
    tb, wb = cli.trainer.loggers
    assert isinstance(wb, AutoWandbLogger) and wb.chose_offline
    assert "val/bpc" in read_tb_scalars(tb.log_dir)  # TensorBoard is still written beside W&B

    (run_dir,) = find_wandb_offline_runs(tmp_path)
    run = read_wandb_offline_run(run_dir)
    assert run["project"] == "lightning-bn"
    history = run["history"]
    train_steps = [r["trainer/global_step"] for r in history if "train/loss" in r]
    assert train_steps == [0, 1]
    (val_row,) = [r for r in history if "val/bpc" in r]
    metrics = _metrics(cli.trainer)
    assert val_row["val/bpc"] == pytest.approx(metrics["val/bpc"], rel=1e-6)
    assert val_row["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-6)
    assert any(k.startswith("act/std/model.blocks.0.attn.c_attn") for r in history for k in r)  # the monitor's keys
    assert run["summary"]["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The transformer's data and model


def test_pydoc_data_module_split_vocab_and_windows():
    text = pydoc_text()
    a, b = PydocTextDataModule(), PydocTextDataModule()
    assert a.chars == sorted(set(text)) and a.vocab_size == len(set(text))
    assert a.decode(a.encode(text[:5000])) == text[:5000]
    # a fixed contiguous 90/10 split, the same for every instance
    assert torch.equal(a.train_data, b.train_data) and torch.equal(a.val_data, b.val_data)
    assert len(a.train_data) == int(len(text) * 0.9) and len(a.train_data) + len(a.val_data) == len(text)
    assert a.decode(a.val_data) == text[int(len(text) * 0.9):]
    # random training windows: the same for the same seed, others for another; targets shifted by one
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    xc, _ = next(iter(PydocTextDataModule(seed=1).train_dataloader()))
    assert xa.shape == ya.shape == (32, 64) and xa.dtype == torch.long
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    train_text = a.decode(a.train_data)
    assert all(a.decode(torch.cat([x, y[-1:]])) in train_text for x, y in zip(xa, ya))
    # validation: consecutive windows predicting every validation character after the first exactly once
    val = ContiguousWindows(a.val_data, 64)
    ys = torch.cat([val[i][1] for i in range(len(val))])
    assert torch.equal(ys, a.val_data[1 : 1 + 64 * len(val)]) and len(a.val_data) - 1 - len(ys) < 64


def test_data_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \(0, 1\), got 1.5"):
        PydocTextDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="`block_size` must be a positive int, got 0"):
        PydocTextDataModule(block_size=0)


def test_unigram_entropy_bits_against_a_direct_computation():
    assert unigram_entropy_bits("aab") == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert unigram_entropy_bits("zzzz") == 0.0
    text = pydoc_text()
    counts = np.array(list(Counter(text).values()), dtype=np.float64)
    p = counts / counts.sum()
    assert unigram_entropy_bits() == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12)
    assert 4.0 < unigram_entropy_bits() < 5.0
    with pytest.raises(ValueError, match="`text` must be non-empty"):
        unigram_entropy_bits("")


@pytest.mark.parametrize("kind", ["layer", "rms", "none"])
def test_transformer_is_causal(kind):
    torch.manual_seed(0)
    model = CharTransformer(norm=kind, vocab_size=20, block_size=12, n_layer=2, n_head=2, n_embd=16).eval()
    x = torch.randint(0, 20, (3, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 20  # change the future from position 7 on
    with torch.no_grad():
        out, out2 = model(x), model(x2)
    assert out.shape == (3, 12, 20)
    torch.testing.assert_close(out[:, :7], out2[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 7:], out2[:, 7:])


def test_transformer_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`norm` must be one of batch, .*layer.*, got 'bogus'"):
        CharTransformer(norm="bogus")
    with pytest.raises(ValueError, match="`n_embd`=30 must be a multiple of `n_head`=4"):
        CharTransformer(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="does not take option"):
        CharTransformer(norm="layer", norm_options={"num_groups": 4})
    model = CharTransformer(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match="sequence length 9 is longer than `block_size`=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)  # halfway through the cosine: (1 + 0.1) / 2
    assert lr_factor(100, 10, 100) == pytest.approx(0.1) and lr_factor(500, 10, 100) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------------------------------
# The padded task


def test_split_sequences_cuts_at_paragraphs_and_sentences_within_the_length():
    text = "First one. Second one?\n\nA paragraph  with a long sentence that goes on and on\nand on."
    pieces = split_sequences(text, 20)
    assert pieces[:2] == ["First one.", "Second one?"]
    assert all(2 <= len(p) <= 20 for p in pieces)
    # nothing but the whitespace at the cuts is lost, and the order is the text's
    assert "".join(pieces).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")
    assert split_sequences("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # no space: cut inside the word
    assert split_sequences("I am. A b", 5) == ["I am.", "A b"] and split_sequences("x.\n\nyz", 5) == ["x.", "yz"]
    assert split_sequences("a\n\nbc", 5) == ["bc"]  # a one-character piece has no target
    with pytest.raises(ValueError, match="`max_len` must be at least 2 .* got 1"):
        split_sequences("abc", 1)
    dm = PydocTextDataModule(task="padded", block_size=64)
    lengths = [len(s) for s in dm.train_sequences + dm.val_sequences]
    assert min(lengths) >= 2 and max(lengths) == 65  # the longest fills the context exactly
    assert dm.decode(dm.train_sequences[0]) in dm.decode(dm.train_data)
    assert dm.decode(dm.val_sequences[-1]) in dm.decode(dm.val_data)


def test_pad_collate_pads_on_the_right_with_ignored_targets():
    seqs = [torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2]), torch.tensor([9, 3, 4])]
    batch = pad_collate(seqs)
    assert torch.equal(batch["idx"], torch.tensor([[5, 6, 7], [1, 0, 0], [9, 3, 0]]))
    assert torch.equal(batch["targets"], torch.tensor([[6, 7, 8], [2, -100, -100], [3, 4, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[True, True, True], [True, False, False],
                                                              [True, True, False]]))
    assert IGNORE_INDEX == -100 and torch.equal(batch["attention_mask"], batch["targets"] != IGNORE_INDEX)


def test_masked_loss_is_the_loss_on_the_real_tokens_alone():
    torch.manual_seed(0)
    seqs = [torch.randint(0, 11, (n,)) for n in (9, 3, 6, 2)]
    batch = pad_collate(seqs)
    logits = torch.randn(4, 8, 11, dtype=torch.float64)
    logits[~batch["attention_mask"]] = torch.tensor([-1e3] + [0.0] * 10, dtype=torch.float64)  # must not count
    by_hand, count = 0.0, 0
    for i, s in enumerate(seqs):
        for t in range(len(s) - 1):
            row = logits[i, t]
            by_hand += float(torch.logsumexp(row, 0) - row[s[t + 1]])
            count += 1
    assert count == 16
    loss = masked_cross_entropy(logits, batch["targets"])
    assert loss.item() == pytest.approx(by_hand / count, rel=1e-12)
    # negative control: the mean over every position, padding (target 0 there) included, is another number
    everything = F.cross_entropy(logits.flatten(0, 1), batch["targets"].clamp(min=0).flatten())
    assert everything.item() > 100.0 > loss.item()


def test_padded_data_module_batches_and_bad_task():
    dm = PydocTextDataModule(task="padded", block_size=32, batch_size=16, samples_per_epoch=64)
    again = PydocTextDataModule(task="padded", block_size=32, batch_size=16, samples_per_epoch=64)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for batch, same in zip(batches, again.train_dataloader()):  # the same sequences for the same seed
        assert batch.keys() == {"idx", "targets", "attention_mask"}
        assert all(torch.equal(batch[k], same[k]) for k in batch)
        assert batch["idx"].shape == batch["attention_mask"].shape and batch["idx"].shape[1] <= 32
        assert batch["attention_mask"][:, 0].all() and batch["attention_mask"].any(0).all()  # no all-padding column
    assert any(not b["attention_mask"].all() for b in batches)  # padding occurs
    val = list(dm.val_dataloader())
    assert sum(int(b["attention_mask"].sum()) for b in val) == sum(len(s) - 1 for s in dm.val_sequences)
    assert PydocTextDataModule().task == "windows"  # the default task is unchanged
    with pytest.raises(ValueError, match="`task` must be one of windows, padded, got 'packed'"):
        PydocTextDataModule(task="packed")
    with pytest.raises(ValueError, match="`mask_padding` must be True or False, got 'yes'"):
        CharTransformer(mask_padding="yes")


class _RecordMask(nn.Module):
    """A forward pre-hook target: remembers the padding mask active when the layer runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor | None] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.seen.append(active_padding_mask())


@pytest.mark.parametrize("mask_padding", [True, False])
def test_padded_task_trains_with_the_mask_set_around_the_model(mask_padding):
    import lightning as L

    L.seed_everything(0, verbose=False)
    dm = PydocTextDataModule(task="padded", block_size=32, batch_size=16, samples_per_epoch=16 * 30)
    model = CharTransformer(norm="batch", vocab_size=dm.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32,
                            warmup_steps=3, mask_padding=mask_padding)
    assert all(isinstance(m, BatchNormChannelsLast) for m in (model.model.blocks[0].ln_1, model.model.ln_f))
    record = _RecordMask()
    model.model.blocks[0].ln_1.register_forward_pre_hook(record)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            expected = batch["attention_mask"] if mask_padding else None
            seen = record.seen[-1]
            assert (seen is None) if expected is None else torch.equal(seen, expected)

    trainer = L.Trainer(accelerator="cpu", max_steps=30, limit_val_batches=2, val_check_interval=30, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Losses()])
    trainer.fit(model, dm)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.25  # it learns: below chance (ln 103 = 4.63)
    assert active_padding_mask() is None  # nothing left active after training
    metrics = _metrics(trainer)
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-6)


def test_padded_validation_is_the_mean_over_real_characters(tmp_path):
    """``val/loss`` weights each batch by its real targets: the mean over every validation character, computed here
    in one pass over the concatenated real tokens."""
    import lightning as L

    dm = PydocTextDataModule(task="padded", block_size=32, batch_size=64, samples_per_epoch=64)
    model = CharTransformer(norm="layer", vocab_size=dm.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=3, default_root_dir=tmp_path)
    (result,) = trainer.validate(model, dm, verbose=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in list(dm.val_dataloader())[:3]:
            logits = model(batch["idx"])
            real = batch["attention_mask"]
            nll += float(F.cross_entropy(logits[real], batch["targets"][real], reduction="sum"))
            count += int(real.sum())
    assert result["val/loss"] == pytest.approx(nll / count, rel=1e-5)


def test_padded_config_through_the_cli(tmp_path):
    cli = main(_transformer_args(tmp_path, "--config", str(CONFIGS / "transformer_padded.yaml"),
                                 "--trainer.fast_dev_run", "2"))
    assert cli.datamodule.task == "padded" and cli.model.hparams.mask_padding is True
    assert _norms(cli.model)[0] == ("model.blocks.0.ln_1", "batch", "channels_last")
    assert isinstance(cli.model.model.ln_f, BatchNormChannelsLast)
    assert cli.trainer.global_step == 2 and math.isfinite(_metrics(cli.trainer)["val/loss"])
    off = main(_transformer_args(tmp_path, "--config", str(CONFIGS / "transformer_padded.yaml"),
                                 "--model.mask_padding", "false", "--trainer.fast_dev_run", "1"))
    assert off.model.hparams.mask_padding is False


def test_padded_model_under_the_mask_ignores_the_padding_in_train_mode():
    """Batch norm in train mode under the model's mask: logits at real tokens and the running statistics are those of
    the real tokens alone, whatever the padding is (more of it, other ids). Without the mask they change."""
    torch.manual_seed(0)
    seqs = [torch.randint(0, 20, (n,)) for n in (9, 4, 7, 2)]
    batch = pad_collate(seqs)
    longer = {k: F.pad(v, (0, 5), value=v.new_tensor(0).item() if k != "targets" else IGNORE_INDEX)
              for k, v in batch.items()}
    longer["idx"][~longer["attention_mask"]] = 13  # other padding ids too
    results = {}
    for mask_padding in (True, False):
        model = CharTransformer(norm="batch", vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                mask_padding=mask_padding).double().train()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        outs = []
        for b in (batch, longer):
            model.load_state_dict(state)
            logits, loss = model(**b)
            outs.append((logits[b["attention_mask"]], loss, model.model.ln_f.running_var.clone()))
        results[mask_padding] = outs
    (a, loss_a, var_a), (b, loss_b, var_b) = results[True]
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var_a, var_b, rtol=1e-10, atol=1e-10)
    (a, loss_a, var_a), (b, loss_b, var_b) = results[False]  # negative control: the padding counts
    assert not torch.allclose(a, b, atol=1e-6) and not torch.allclose(var_a, var_b, atol=1e-6)


class _ReferenceMaskedBatchNorm(nn.Module):
    """Batch norm by its formula over the real tokens of ``mask`` (train mode, biased variance), for comparison."""

    def __init__(self, bn: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.mask = bn.weight, bn.bias, bn.eps, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        real = x[self.mask]  # (n_real, C)
        mean, var = real.mean(0), real.var(0, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def test_padded_model_loss_and_gradients_match_batch_norm_over_real_tokens_by_formula():
    """The whole padded model under its mask against the same model whose batch norms are the formula over the real
    tokens: the loss and every parameter's gradient, in float64."""
    import copy

    torch.manual_seed(0)
    batch = pad_collate([torch.randint(0, 20, (n,)) for n in (9, 4, 7, 2, 12, 3)])
    model = CharTransformer(norm="batch", vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16).double()
    reference = copy.deepcopy(model)
    for block in reference.model.blocks:
        block.ln_1 = _ReferenceMaskedBatchNorm(block.ln_1, batch["attention_mask"])
        block.ln_2 = _ReferenceMaskedBatchNorm(block.ln_2, batch["attention_mask"])
    reference.model.ln_f = _ReferenceMaskedBatchNorm(reference.model.ln_f, batch["attention_mask"])
    _, loss = model(**batch)
    _, expected = reference(**batch)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    # negative control: the same model counting the padding is another loss
    model.hparams["mask_padding"] = False
    _, counted = model(**batch)
    assert abs(counted.item() - expected.item()) > 1e-3


def test_recalibration_of_the_padded_model_gives_the_real_tokens_population_statistics():
    """``recalibrate_bn``'s default feed gives a mapping batch as ``model(**batch)``, whose forward enters the mask:
    the first norm's running statistics become the mean and unbiased variance of its inputs at the real tokens
    (no batch norm comes before it, so a hook gathers those inputs afterwards in eval mode)."""
    from lightning_bn.recalibrate import recalibrate_bn

    torch.manual_seed(0)
    batches = [pad_collate([torch.randint(0, 20, (int(n),)) for n in torch.randint(2, 15, (6,))]) for _ in range(3)]
    model = CharTransformer(norm="batch", vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16).double()
    recalibrate_bn(model, batches)
    # with the recalibrated buffers, in eval mode: the first norm's input does not depend on any batch norm
    ln_1 = model.model.blocks[0].ln_1
    inputs: list[torch.Tensor] = []
    handle = ln_1.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            model(batch["idx"])
    handle.remove()
    real = torch.cat([x[b["attention_mask"]] for x, b in zip(inputs, batches)])  # (n_real, C)
    torch.testing.assert_close(ln_1.running_mean, real.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ln_1.running_var, real.var(0, unbiased=True), rtol=1e-10, atol=1e-12)
    # negative control: counting the padding gives other statistics
    everything = torch.cat([x.flatten(0, 1) for x in inputs])
    assert not torch.allclose(ln_1.running_mean, everything.mean(0), atol=1e-4)
