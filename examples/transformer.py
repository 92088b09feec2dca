"""A small decoder-only transformer trained as a character-level language model on Python's own documentation.

    python -m examples.transformer fit --config examples/configs/transformer.yaml
    python -m examples.transformer fit --config examples/configs/transformer.yaml --model.norm rms
    python -m examples.transformer fit --config examples/configs/transformer.yaml --model.norm batch
    python -m examples.transformer fit --config examples/configs/transformer.yaml \
        --config examples/configs/transformer_padded.yaml          # the padded task, batch norm under the mask

The text is the English documentation that ships with every Python (``pydoc_data.topics``), so it trains offline.
The normalization layer of every pre-norm block (and the final one) is a hyperparameter: ``layer`` (GPT-2),
``rms``, ``batch`` (batch norm over the channels of every token, ``build_norm("batch", C, layout="channels_last")``),
``none``, or any kind in ``lightning_bn.available_norms()``.

A caution for kinds whose statistics span positions: batch norm in train mode pools every token of the batch, and
instance and group norm pool every position of a sequence, so a token's normalization sees a little of its future.
For batch norm over ``B * T`` tokens this leak is of order ``1 / (B * T)``; instance and group norm leak more, and their
validation loss is not a fair language-model score (``layer``, ``rms`` and ``none`` are strictly causal).

Two tasks (``PydocTextDataModule(task=...)``):

- ``windows`` (the default): fixed-length windows of ``block_size`` characters, never padded;
- ``padded``: the text split at paragraph and sentence boundaries into sequences of at most ``block_size + 1``
  characters, right-padded to the longest of each batch. Its batches are mappings ``{"idx", "targets",
  "attention_mask"}``; the loss counts real targets only, and ``CharTransformer`` runs its model under
  ``lightning_bn.padding_mask(attention_mask)``, so batch norm counts real tokens only (``mask_padding=False`` counts
  the padding too, as a plain batch norm would). Causal attention with padding on the right keeps real tokens from
  ever attending to padding: batch statistics are the only way padding reaches a real token.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_bn.layers import available_norms, build_norm, normalize_kind
from lightning_bn.padding import padding_mask

__all__ = [
    "GPTConfig",
    "GPT",
    "Sequences",
    "TASKS",
    "CharTransformer",
    "PydocTextDataModule",
    "CharLMCLI",
    "IGNORE_INDEX",
    "masked_cross_entropy",
    "pad_collate",
    "pydoc_text",
    "split_sequences",
    "unigram_entropy_bits",
    "main",
]


# ----------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    vocab_size: int = 128  # characters; the data module's vocabulary sets it (103 for pydoc_data's text)
    block_size: int = 64  # context length in characters: long enough for words and short phrases, cheap on a CPU
    n_layer: int = 4  # 4 blocks x 128 channels ~ 0.8M parameters: ~2.7 bits/char after 300 steps, ~1 min on 2 cores
    n_head: int = 4  # 32 channels per head
    n_embd: int = 128
    dropout: float = 0.0  # the model sees each character a handful of times in the demo's budget: no overfitting yet
    bias: bool = True  # biases in the linear layers, as GPT-2
    norm: str = "layer"  # any registered kind, built channels-last over the tokens' (B, T, C)
    norm_options: dict[str, Any] = field(default_factory=dict)  # the kind's own options, e.g. {"num_groups": 8}


def make_norm(cfg: GPTConfig) -> nn.Module:
    return build_norm(cfg.norm, cfg.n_embd, layout="channels_last", **cfg.norm_options)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"`n_embd`={cfg.n_embd} must be a multiple of `n_head`={cfg.n_head}")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm: the residual stream itself is never normalized, only what enters attention and the MLP."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` pre-norm blocks, a final norm and a head tied to the embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf, 2017): fewer parameters, faster start
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual branches scaled so the stream's variance stays O(1)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} is longer than `block_size`={self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


# ----------------------------------------------------------------------------------------------------------------
# The LightningModule


class CharTransformer(L.LightningModule):
    """A character-level language model: next-character cross entropy, reported in nats and in bits per character.

    Args:
        norm: the normalization kind of every block and the final norm (see ``lightning_bn.available_norms()``),
            built channels-last over the tokens.
        norm_options: the kind's own options, e.g. ``{"num_groups": 8}`` for ``group``.
        vocab_size: number of distinct characters (linked from the data module by the CLI).
        block_size: context length (linked from the data module by the CLI).
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: channels of the residual stream.
        dropout: dropout after the embeddings, the attention and the MLP.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices (not on biases, embeddings' positions or norm parameters).
        warmup_steps: linear warm-up steps before the cosine decay to ``lr / 10`` over the run's
            ``trainer.estimated_stepping_batches``.
        mask_padding: on batches that carry an ``attention_mask`` (the ``padded`` task), run the model under
            ``lightning_bn.padding_mask(attention_mask)``, so that batch norm's statistics count real tokens only.
            ``False`` lets them count the padding too, as a plain batch norm would; the loss ignores padding
            either way. Kinds that never mix tokens (``layer``, ``rms``) give the same result with both.

    Raises:
        ValueError: an unknown ``norm`` (the message lists the kinds), options the kind does not take, or
            ``n_embd`` not a multiple of ``n_head``.

    Logged metrics:
        ``train/loss`` (nats per character, every logging step), ``val/loss`` (nats per character) and ``val/bpc``
        (bits per character, ``val/loss / ln 2``), both averaged over every predicted validation character of all
        processes (padding excluded).

    Example::

        dm = PydocTextDataModule(block_size=64)
        model = CharTransformer(norm="rms", vocab_size=dm.vocab_size, block_size=dm.block_size)
        L.Trainer(max_steps=300).fit(model, dm)
    """

    def __init__(
        self,
        norm: str = "layer",
        norm_options: dict[str, Any] | None = None,
        vocab_size: int = 128,
        block_size: int = 64,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 30,
        mask_padding: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        try:
            normalize_kind(norm)
        except ValueError:
            raise ValueError(f"`norm` must be one of {', '.join(available_norms())}, got {norm!r}") from None
        if not isinstance(mask_padding, bool):
            raise ValueError(f"`mask_padding` must be True or False, got {mask_padding!r}")
        self.cfg = GPTConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
            dropout=dropout, norm=norm, norm_options=dict(norm_options or {}),
        )
        self.model = GPT(self.cfg)
        self.example_input_array = torch.zeros(2, block_size, dtype=torch.long)

    def forward(
        self, idx: Tensor, attention_mask: Tensor | None = None, targets: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``(B, T, vocab)``; given ``targets`` (``IGNORE_INDEX`` at padding), ``(logits, loss)`` as nanoGPT.

        The arguments are the keys of a padded batch, so ``model(**batch)`` works: that is how
        ``BatchNormRecalibration`` and ``recalibrate_bn`` feed a mapping, so their statistics count real tokens only.
        """
        masked = attention_mask is not None and self.hparams["mask_padding"]
        with padding_mask(attention_mask.bool()) if masked else contextlib.nullcontext():  # type: ignore[union-attr]
            logits = self.model(idx)  # (B, T, vocab)
        if targets is None:
            return logits
        return logits, masked_cross_entropy(logits, targets)

    def _loss(self, batch: tuple[Tensor, Tensor] | Mapping[str, Tensor]) -> tuple[Tensor, int]:
        """The mean loss over the batch's predicted characters, and how many there are."""
        if isinstance(batch, Mapping):  # the padded task
            _, loss = self(**batch)
            return loss, int((batch["targets"] != IGNORE_INDEX).sum())
        x, y = batch  # (B, T), (B, T): y is x shifted by one character
        logits = self(x)  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)), y.numel()

    def training_step(self, batch: tuple[Tensor, Tensor] | Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss, n = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor] | Mapping[str, Tensor], batch_idx: int) -> None:
        loss, n = self._loss(batch)  # weighted by characters: the epoch's figure is the mean over all of them
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log("val/bpc", loss / math.log(2), batch_size=n, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_parameters():
            # matrices and the (tied) token embedding decay; biases, norm scales and positions do not
            (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams["lr"], betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.hparams["warmup_steps"]
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# The data


def pydoc_text() -> str:
    """The English text of ``pydoc_data.topics``: the topics' values concatenated in sorted-key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def unigram_entropy_bits(text: str | None = None) -> float:
    """Entropy in bits of the character distribution of ``text`` (the pydoc text by default).

    A model that has learned only how often each character occurs scores this many bits per character; anything
    below it has learned context.
    """
    text = pydoc_text() if text is None else text
    if not text:
        raise ValueError("`text` must be non-empty to have a character distribution, got ''")
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


class RandomWindows(Dataset):
    """``num_samples`` windows of ``block_size + 1`` characters at start positions drawn once from ``seed``."""

    def __init__(self, data: Tensor, block_size: int, num_samples: int, seed: int) -> None:
        if len(data) <= block_size:
            raise ValueError(f"the text ({len(data)} characters) must be longer than `block_size`={block_size}")
        self.data, self.block_size = data, block_size
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(data) - block_size, (num_samples,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.data[int(self.starts[i]) : int(self.starts[i]) + self.block_size + 1]  # (T + 1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)


class ContiguousWindows(Dataset):
    """The text cut into consecutive non-overlapping windows: every character of it is predicted exactly once."""

    def __init__(self, data: Tensor, block_size: int) -> None:
        if len(data) <= block_size:
            raise ValueError(f"the text ({len(data)} characters) must be longer than `block_size`={block_size}")
        self.data, self.block_size = data, block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.data[i * self.block_size : (i + 1) * self.block_size + 1]  # (T + 1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)


IGNORE_INDEX = -100  # the target at a padded position: F.cross_entropy's default ignore_index


def masked_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-character cross entropy over the real targets: those at padding (``IGNORE_INDEX``) do not count."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def split_sequences(text: str, max_len: int) -> list[str]:
    """``text`` cut at blank lines and after sentence ends into pieces of 2 to ``max_len`` characters.

    Leading and trailing whitespace of a piece goes; a piece longer than ``max_len`` is cut at its last space
    within ``max_len`` characters (inside a word only when it has no space).
    """
    if max_len < 2:
        raise ValueError(f"`max_len` must be at least 2 (one input and one target), got {max_len}")
    pieces = []
    for part in re.split(r"\n\s*\n|(?<=[.!?])\s+", text):
        part = part.strip()
        while len(part) > max_len:
            cut = part.rfind(" ", 2, max_len + 1)
            cut = max_len if cut < 2 else cut
            pieces.append(part[:cut])
            part = part[cut:].lstrip()
        if len(part) >= 2:
            pieces.append(part)
    return pieces


def pad_collate(sequences: list[Tensor]) -> dict[str, Tensor]:
    """Right-pad sequences of character ids (each of 2 or more) to the longest of the batch.

    Returns ``idx`` (padding 0), ``targets`` (``idx`` shifted by one, ``IGNORE_INDEX`` at padding) and
    ``attention_mask`` (True at a real token), each ``(B, T)`` with ``T`` the longest sequence's length minus one.
    The padding's id is an ordinary character: with causal attention and padding on the right, no real token
    attends to it, so only batch statistics that count it could carry it to a real token.
    """
    T = max(len(s) for s in sequences) - 1
    idx = torch.zeros(len(sequences), T, dtype=torch.long)
    targets = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(sequences), T, dtype=torch.bool)
    for i, s in enumerate(sequences):
        n = len(s) - 1
        idx[i, :n], targets[i, :n], mask[i, :n] = s[:-1], s[1:], True
    return {"idx": idx, "targets": targets, "attention_mask": mask}  # (B, T) each


class Sequences(Dataset):
    """Variable-length sequences, in order, or ``num_samples`` of them drawn with replacement from ``seed``."""

    def __init__(self, sequences: list[Tensor], num_samples: int | None = None, seed: int = 0) -> None:
        if not sequences:
            raise ValueError("the text gave no sequence of 2 or more characters")
        self.sequences = sequences
        generator = torch.Generator().manual_seed(seed)
        self.order = (torch.arange(len(sequences)) if num_samples is None
                      else torch.randint(0, len(sequences), (num_samples,), generator=generator))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> Tensor:
        return self.sequences[int(self.order[i])]  # (length,) with 2 <= length <= block_size + 1


TASKS = ("windows", "padded")


class PydocTextDataModule(L.LightningDataModule):
    """Python's documentation text, split once into a leading training part and a trailing validation part.

    The vocabulary is every character of the text (sorted), so validation has no unknown characters.

    - ``task="windows"``: training batches are windows at random positions drawn from ``seed`` (the same windows for
      every run with the same arguments); validation is the validation text cut into consecutive windows.
    - ``task="padded"``: each part is split at blank lines and sentence ends (:func:`split_sequences`) into
      sequences of 2 to ``block_size + 1`` characters; training draws ``samples_per_epoch`` of them from ``seed``,
      validation takes every validation sequence in order. Batches are right-padded by :func:`pad_collate` to
      mappings ``{"idx", "targets", "attention_mask"}``. The first character of each sequence is never predicted, so
      bits per character are not those of the windows task.

    Args:
        block_size: characters of context per window (the longest input of the padded task).
        batch_size: windows or sequences per batch (per process under DDP).
        val_fraction: the share of the text, taken from its end, held out for validation.
        samples_per_epoch: random training windows or sequences in one epoch (the DDP sampler shares them among
            processes).
        seed: seed of the training windows' positions (or sequences) and order.
        num_workers: DataLoader workers.
        task: ``"windows"`` (fixed length, never padded) or ``"padded"`` (variable length, padded).

    Raises:
        ValueError: ``val_fraction`` outside (0, 1), a non-positive ``block_size``, ``batch_size`` or
            ``samples_per_epoch``, or an unknown ``task``.
    """

    def __init__(
        self,
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        samples_per_epoch: int = 32_000,
        seed: int = 0,
        num_workers: int = 0,
        task: str = "windows",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {', '.join(TASKS)}, got {task!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("samples_per_epoch", samples_per_epoch)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.block_size, self.batch_size, self.val_fraction = block_size, batch_size, val_fraction
        self.samples_per_epoch, self.seed, self.num_workers = samples_per_epoch, seed, num_workers
        self.task = task
        self.text = pydoc_text()
        self.chars = sorted(set(self.text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        data = torch.tensor([self.stoi[ch] for ch in self.text], dtype=torch.long)
        n_train = int(len(data) * (1.0 - val_fraction))
        self.train_data, self.val_data = data[:n_train], data[n_train:]
        self.train_sequences: list[Tensor] = []
        self.val_sequences: list[Tensor] = []
        if task == "padded":
            self.train_sequences, self.val_sequences = (
                [torch.tensor(self.encode(s), dtype=torch.long) for s in split_sequences(part, block_size + 1)]
                for part in (self.text[:n_train], self.text[n_train:])
            )

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        return [self.stoi[ch] for ch in s]

    def decode(self, ids: list[int] | Tensor) -> str:
        return "".join(self.chars[i] for i in (ids.tolist() if isinstance(ids, Tensor) else ids))

    def train_dataloader(self) -> DataLoader:
        if self.task == "padded":
            samples: Dataset = Sequences(self.train_sequences, self.samples_per_epoch, self.seed)
        else:
            samples = RandomWindows(self.train_data, self.block_size, self.samples_per_epoch, self.seed)
        return DataLoader(
            samples, batch_size=self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed), collate_fn=self._collate(),
        )

    def val_dataloader(self) -> DataLoader:
        samples = Sequences(self.val_sequences) if self.task == "padded" else ContiguousWindows(
            self.val_data, self.block_size)
        return DataLoader(samples, batch_size=self.batch_size, num_workers=self.num_workers,
                          collate_fn=self._collate())

    def _collate(self) -> Any:
        return pad_collate if self.task == "padded" else None  # None: the DataLoader's default stacking


# ----------------------------------------------------------------------------------------------------------------
# The command line


class CharLMCLI(LightningCLI):
    """LightningCLI with the model's context length and vocabulary taken from the data module."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.block_size", "model.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> CharLMCLI:
    """``python -m examples.transformer fit --config examples/configs/transformer.yaml``; returns the CLI object."""
    return CharLMCLI(CharTransformer, PydocTextDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
