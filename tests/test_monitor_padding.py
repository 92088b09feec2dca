"""LayerStatsCollector under lightning_bn.padding_mask: the figures of channels-last tensors count real tokens only.

The reference is the same model on the real tokens alone, packed into one sequence (every layer here acts on each
token by itself, so the real tokens' values and gradients are the same in both runs), and a hand computation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_bn import padding_mask
from lightning_bn.layers import BatchNormChannelsLast
from lightning_bn.stats import LayerStatsCollector, select_modules
from lightning_bn.stats._collector import real_tokens

D = torch.float64
LENGTHS = [4, 2, 1]


class TokenNet(nn.Module):
    """Per-token layers only: no bias in ``fc1``, so padding (zeros) stays exactly zero up to the batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5, bias=False)
        self.bn = BatchNormChannelsLast(5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]  # (N, T)
    x = torch.randn(len(LENGTHS), max(LENGTHS), 3, generator=g, dtype=D) * mask[..., None]
    return x, mask


def _net() -> TokenNet:
    torch.manual_seed(0)
    net = TokenNet().double()
    with torch.no_grad():  # running statistics away from their defaults, so the shift figures are not trivial
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()  # batch norm with running statistics: every layer acts on each token by itself


def _collect(
    net: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, keep: dict | None = None, loss_mask: bool = True
) -> dict:
    collector = LayerStatsCollector(select_modules(net))
    collector.attach()
    try:
        if mask is None:
            out = net(x)
        else:
            with padding_mask(mask):
                out = net(x)
            if loss_mask:
                out = out * mask[..., None]  # a masked loss: padding gets no gradient
        if keep is not None:
            keep["out"] = out
        out.square().sum().backward()  # the gradient hooks run after the mask's block was left
    finally:
        collector.detach()
    return collector.finalize().scalars


def test_figures_under_a_mask_equal_those_of_the_real_tokens_alone() -> None:
    x, mask = _padded()
    net = _net()
    masked = _collect(net, x, mask)
    packed = _collect(copy.deepcopy(net), x[mask][None], None)  # (1, R, C): the real tokens alone
    assert masked.keys() == packed.keys()
    assert {"act/frac_zero/fc1", "act_in/std/bn", "act_grad/rms/fc1", "bn/mean_shift/bn", "bn/var_shift/bn"} <= (
        masked.keys()
    )
    for key, value in packed.items():
        assert masked[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key

    # the same figures by hand, from the real tokens of fc1's output
    h = net.fc1(x)[mask]  # (R, 5)
    assert masked["act/mean/fc1"] == pytest.approx(h.mean().item(), rel=1e-12)
    assert masked["act/std/fc1"] == pytest.approx(h.std(unbiased=False).item(), rel=1e-9)
    assert masked["act/frac_zero/fc1"] == 0.0

    # negative control: without the mask the padding counts, and fc1's zeros at padded tokens look like dead units
    whole = _collect(copy.deepcopy(net), x, None)
    padded_fraction = 1 - mask.float().mean().item()
    assert whole["act/frac_zero/fc1"] == pytest.approx(padded_fraction)
    assert whole["act/std/fc1"] != pytest.approx(masked["act/std/fc1"], rel=1e-3)
    assert whole["bn/mean_shift/bn"] != pytest.approx(masked["bn/mean_shift/bn"], rel=1e-3)


def test_gradient_figures_use_the_mask_of_their_forward() -> None:
    x, mask = _padded()
    net = _net()
    keep: dict = {}
    figures = _collect(net, x, mask, keep)
    # fc2's output gradient is 2 * out at real tokens, 0 at padding; its RMS over real tokens only
    grad = 2 * keep["out"].detach()[mask]
    assert figures["act_grad/rms/fc2"] == pytest.approx(grad.square().mean().sqrt().item(), rel=1e-12)


def test_tensors_that_do_not_fit_the_mask_are_summarized_whole() -> None:
    x, _ = _padded()
    net = _net()
    net.bn = nn.Identity()  # a batch-statistics layer would refuse a mask that does not fit its input
    other = torch.ones(5, 7, dtype=torch.bool)  # fits no tensor of this model
    whole = _collect(copy.deepcopy(net), x, None)
    unfit = _collect(copy.deepcopy(net), x, other, loss_mask=False)
    assert whole.keys() == unfit.keys() and "act_grad/rms/fc1" in whole
    for key, value in whole.items():
        assert unfit[key] == pytest.approx(value, rel=1e-12), key


def test_real_tokens_selects_rows_in_either_layout() -> None:
    x, mask = _padded()
    assert torch.equal(real_tokens(x, mask), x[mask])
    first = x.transpose(1, 2)  # (N, C, T)
    assert torch.equal(real_tokens(first, mask, channel_dim=1), x[mask])
    assert real_tokens(first, mask) is first  # channels last asked: (N, C) does not fit the (N, T) mask
    assert real_tokens(x, None) is x


def test_monitor_on_the_padded_example_counts_real_tokens_in_a_trainer() -> None:
    """The padded transformer task: the LightningModule enters the mask around its model; the monitor's figures of a
    batch norm's input and output at step 0 are those of the real tokens, computed by hand from the same tensors."""
    import lightning as L

    from examples.transformer import CharTransformer, PydocTextDataModule
    from lightning_bn.callbacks import LayerStatsMonitor
    from lightning_bn.padding import active_padding_mask

    L.seed_everything(0, verbose=False)
    dm = PydocTextDataModule(task="padded", block_size=32, batch_size=16, samples_per_epoch=16 * 4)
    model = CharTransformer(norm="batch", vocab_size=dm.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    model = model.double()
    with torch.no_grad():  # the padding's id (0, also a character) far from the others: padding would show
        model.model.wte.weight[0].fill_(3.0)
    bn = model.model.blocks[0].ln_1
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    handle = bn.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach(),
                                                                        active_padding_mask())))
    monitor = LayerStatsMonitor(log_every_n_steps=1, heatmap_every_n_logs=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, precision="64-true",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[monitor])
    try:
        trainer.fit(model, dm)
    finally:
        handle.remove()
    (x, out, mask), = seen
    assert mask is not None and not bool(mask.all())  # a padded batch, run under its mask
    name = "model.blocks.0.ln_1"
    figures = dict(monitor.history[0][1])
    x_real, out_real = x[mask], out[mask]
    assert figures[f"act_in/mean/{name}"] == pytest.approx(x_real.mean().item(), rel=1e-9)
    assert figures[f"act_in/std/{name}"] == pytest.approx(x_real.std(unbiased=False).item(), rel=1e-9)
    assert figures[f"act/std/{name}"] == pytest.approx(out_real.std(unbiased=False).item(), rel=1e-9)
    # normalized over the real tokens: per channel mean 0 and variance 1 there (up to eps), not over the padding
    assert out_real.mean(0).abs().max().item() < 1e-9
    # negative control: with the padding counted, the input's figures would be far off (padding id 0 was made loud)
    assert figures[f"act_in/std/{name}"] < 0.5 * x.std(unbiased=False).item()
