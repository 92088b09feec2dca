"""Real models from Hugging Face transformers (tiny configs, nothing downloaded) and timm: every norm found, swapped
exactly, swapped to batch norm and trained, watched by the monitor's default selection, recalibrated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lightning_bn import describe_norm, swap_norms
from lightning_bn.stats import select_modules
from lightning_bn.taxonomy import find_norms, is_weight_layer

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 6


def _gpt2() -> nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                                                 n_positions=32))


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32,
    ))


def _gemma() -> nn.Module:
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=VOCAB, max_position_embeddings=32,
    ))


def _t5() -> nn.Module:
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=VOCAB,
        decoder_start_token_id=0,
    ))


def _bert() -> nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=32, num_labels=3,
    ))


def _convnext() -> nn.Module:
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
    ))


def _token_batch(model: nn.Module) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, T), generator=g)
    if isinstance(model, transformers.T5ForConditionalGeneration):
        return {"input_ids": ids, "labels": torch.randint(0, VOCAB, (4, T), generator=g)}
    if isinstance(model, transformers.BertForSequenceClassification):
        return {"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def _image_batch(model: nn.Module) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}


HF_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], dict[str, Tensor]], set[str]]] = {
    # name: (build, batch, the norm classes of the model)
    "gpt2": (_gpt2, _token_batch, {"LayerNorm"}),
    "llama": (_llama, _token_batch, {"LlamaRMSNorm"}),
    "gemma": (_gemma, _token_batch, {"GemmaRMSNorm"}),
    "t5": (_t5, _token_batch, {"T5LayerNorm"}),
    "bert": (_bert, _token_batch, {"LayerNorm"}),
    "convnext": (_convnext, _image_batch, {"ConvNextLayerNorm", "LayerNorm"}),  # both data formats, and the head
}


def _hf_output(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).logits


def _norm_like_names(model: nn.Module) -> set[str]:
    """Every module whose class name says it normalizes: what a reader of the model would call its norms."""
    return {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}


def _perturb_norms(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, module, _ in list(find_norms(model)):
            for p in module.parameters(recurse=False):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)  # away from the init (zeros for Gemma, ones)
            for name in ("running_mean", "running_var"):
                buf = getattr(module, name, None)
                if isinstance(buf, Tensor):
                    buf.copy_(torch.rand(buf.shape, generator=g) + (0.5 if name == "running_var" else -0.5))


def _same_kind_swap_is_exact(model: nn.Module, batch: dict[str, Tensor], output: Callable[..., Tensor]) -> None:
    _perturb_norms(model)
    model.eval()
    with torch.no_grad():
        before = output(model, batch)
    by_kind: dict[str, list[str]] = {}
    for name, _, info in find_norms(model):
        by_kind.setdefault(info.kind, []).append(name)
    for kind, names in by_kind.items():
        swap_norms(model, kind, include=names)
    for name, module, info in find_norms(model):
        assert info.source == "class" and type(module).__module__.startswith(("torch.", "lightning_bn.")), name
    with torch.no_grad():
        after = output(model, batch)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def _batch_swap_trains_and_normalizes(
    model: nn.Module, batch: dict[str, Any], loss: Callable[[nn.Module, dict[str, Any]], Tensor]
) -> None:
    norms = {name for name, _, _ in find_norms(model)}
    report = swap_norms(model, "batch")
    assert {r.name for r in report} | set(report.skipped) == norms
    outputs: dict[str, tuple[Tensor, Any]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            outputs[name] = (out.detach(), describe_norm(module[0] if isinstance(module, nn.Sequential) else module))
        return hook

    for record in report:
        record.new.register_forward_hook(keep(record.name))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        value = loss(model, batch)
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert set(outputs) == {r.name for r in report}
    for name, (out, info) in outputs.items():
        assert info is not None and info.kind == "batch", name
        if info.post:
            continue  # an activation after the norm: checked on the norm itself in the timm test
        cdim = 1 if info.layout == "channels_first" else out.dim() - 1
        flat = out.movedim(cdim, -1).reshape(-1, out.shape[cdim]).double()
        scale = info.scale.detach().double() if info.scale is not None else 1.0
        shift = info.shift.detach().double() if info.shift is not None else 0.0
        # Output of the last step (before it): undo the affine map with the weights the forward used.
        normalized = (flat - shift) / scale
        mask = torch.as_tensor(scale).abs() > 1e-3 if info.scale is not None else torch.ones(flat.shape[1], dtype=bool)
        torch.testing.assert_close(normalized.mean(0)[mask], torch.zeros(int(mask.sum()), dtype=torch.float64),
                                   atol=2e-2, rtol=0)
        torch.testing.assert_close(normalized.var(0, unbiased=False)[mask], torch.ones(int(mask.sum()),
                                   dtype=torch.float64), atol=5e-2, rtol=0)


def _weight_leaves(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if n and is_weight_layer(m)}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hugging_face_models(name: str) -> None:
    build, make_batch, norm_classes = HF_MODELS[name]
    torch.manual_seed(0)
    model = build()
    batch = make_batch(model)
    found = {n for n, _, _ in find_norms(model)}
    assert found == _norm_like_names(model) and found
    assert {type(model.get_submodule(n)).__name__ for n in found} == norm_classes
    if name == "convnext":
        layouts = {describe_norm(model.get_submodule(n)).layout for n in found}  # type: ignore[union-attr]
        assert layouts == {"channels_first", "channels_last"}

    selected = {n for n, _ in select_modules(model)}
    assert found <= selected
    leaves = {n for n, m in model.named_modules() if n and next(m.children(), None) is None
              and any(p.dim() >= 2 for p in m.parameters(recurse=False))}
    assert leaves <= selected and selected == found | _weight_leaves(model)
    if name == "gpt2":
        assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "transformer.wte", "lm_head"} <= selected
        assert type(model.get_submodule("transformer.h.0.attn.c_attn")).__name__ == "Conv1D"

    _same_kind_swap_is_exact(model, batch, _hf_output)

    torch.manual_seed(0)
    model = build()
    _batch_swap_trains_and_normalizes(model, batch, lambda m, b: m(**b).loss)


# ---------------------------------------------------------------------------------------------------- the monitor
class CausalLM(L.LightningModule):
    """A LightningModule without a forward of its own: training_step calls the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _token_loader(n: int = 8) -> Any:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    return torch.utils.data.DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=4)


def test_layer_stats_monitor_watches_every_norm_and_linear_like_layer_of_gpt2(tmp_path) -> None:
    from lightning_bn.callbacks import LayerStatsMonitor

    torch.manual_seed(0)
    module = CausalLM(_gpt2())
    monitor = LayerStatsMonitor(log_every_n_steps=1, heatmap_every_n_logs=None)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(module, _token_loader())
    norms = {f"model.{n}" for n, _, _ in find_norms(module.model)}
    leaves = {f"model.{n}" for n in _weight_leaves(module.model)}
    assert len(norms) == 5 and len(leaves) >= 2 * 4 + 3
    keys = set(monitor.last_metrics)
    missing = sorted(n for n in norms | leaves if f"act/std/{n}" not in keys)
    assert not missing
    assert all(f"act_in/std/{n}" in keys for n in norms)


def test_batch_norm_recalibration_with_defaults_on_a_module_without_forward(tmp_path) -> None:
    from lightning_bn import recalibrate_bn
    from lightning_bn.callbacks import BatchNormRecalibration

    torch.manual_seed(0)
    module = CausalLM(_gpt2())
    swap_norms(module, "batch")
    norms = [f"model.{n}" for n, _, _ in find_norms(module.model)]
    callback = BatchNormRecalibration(num_batches=None, when="fit_end")
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, _token_loader())
    assert callback.last_report is not None and list(callback.last_report.layers) == norms
    # The same as recalibrate_bn fed by hand through the inner model.
    recalibrated = {n: module.get_submodule(n).running_var.clone() for n in norms}
    recalibrate_bn(module, list(_token_loader()), forward=lambda m, b: m.model(**b))
    for n in norms:
        torch.testing.assert_close(module.get_submodule(n).running_var, recalibrated[n])
