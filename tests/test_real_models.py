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
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
    ))


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
    """Every module whose class name says it normalizes and that holds no weight matrix (timm's
    ``NormMlpClassifierHead`` is a head): what a reader of the model would call its norms."""
    return {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()
            and all(p.dim() < 2 for p in m.parameters())}


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
    outputs: dict[str, tuple[Tensor, Tensor, Any, Tensor | None, Tensor | None]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            info = describe_norm(module)
            assert info is not None
            scale, shift = (None if t is None else t.detach().clone() for t in (info.scale, info.shift))
            # clone: an in-place activation after the norm (timm: SiLU(inplace=True)) would change them
            outputs[name] = (args[0].detach().clone(), out.detach().clone(), info, scale, shift)
        return hook

    for record in report:  # on the norm itself, also when an activation follows it (Sequential(norm, act))
        norm = record.new[0] if isinstance(record.new, nn.Sequential) else record.new
        norm.register_forward_hook(keep(record.name))
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
    for name, (x, out, info, scale, shift) in outputs.items():
        assert info.kind == "batch", name
        cdim = 1 if info.layout == "channels_first" else out.dim() - 1
        flat_in = x.movedim(cdim, -1).reshape(-1, x.shape[cdim]).double()
        flat = out.movedim(cdim, -1).reshape(-1, out.shape[cdim]).double()
        channels = flat.shape[1]
        weight = scale.double() if scale is not None else torch.ones(channels, dtype=torch.float64)
        normalized = (flat - (shift.double() if shift is not None else 0.0)) / weight
        kept = weight.abs() > 1e-3
        # Per channel over every batch item and position of its layout: mean 0, variance var / (var + eps).
        var_in = flat_in.var(0, unbiased=False)
        expected = var_in / (var_in + info.eps)
        torch.testing.assert_close(normalized.mean(0)[kept], torch.zeros(int(kept.sum()), dtype=torch.float64),
                                   atol=2e-3, rtol=0, msg=name)
        torch.testing.assert_close(normalized.var(0, unbiased=False)[kept], expected[kept], atol=2e-3, rtol=0,
                                   msg=name)


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


# ---------------------------------------------------------------------------------------------------- timm
def _timm_model(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    options = {}
    if name == "efficientnet":  # timm's tiny test model when it has one
        name = "test_efficientnet" if "test_efficientnet" in timm.list_models() else "efficientnet_b0"
    else:
        options["conv_mlp"] = False  # blocks normalize channels-last tokens (LayerNorm), the rest NCHW (LayerNorm2d)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **options)


def _image_classes() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(4, 3, 32, 32, generator=g), "y": torch.randint(0, 10, (4,), generator=g)}


def _classify(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(batch["x"])


@pytest.mark.parametrize(("name", "norm_classes"), [
    ("convnext_atto", {"LayerNorm2d", "LayerNorm"}),
    ("efficientnet", {"BatchNormAct2d"}),
])
def test_timm_models(name: str, norm_classes: set[str]) -> None:
    model = _timm_model(name)
    batch = _image_classes()
    found = {n for n, _, _ in find_norms(model)}
    assert found == _norm_like_names(model) and found
    assert {type(model.get_submodule(n)).__name__ for n in found} == norm_classes
    selected = {n for n, _ in select_modules(model)}
    assert selected == found | _weight_leaves(model)
    assert any(isinstance(model.get_submodule(n), nn.Conv2d) for n in selected)

    act = model.bn1.act if name == "efficientnet" else None
    _same_kind_swap_is_exact(model, batch, _classify)
    if act is not None:  # the stem's BatchNormAct2d: its activation, the same module, follows the new norm
        assert type(model.bn1) is nn.Sequential and type(model.bn1[0]) is nn.BatchNorm2d and model.bn1[1] is act

    model = _timm_model(name)
    _batch_swap_trains_and_normalizes(
        model, batch, lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"])
    )


def test_timm_batch_norm_act_is_recalibrated_and_synchronized_with_its_activation() -> None:
    import copy

    from lightning_bn import recalibrate_bn
    from lightning_bn.plugins import SyncNormPlugin

    model = _timm_model("efficientnet")
    _perturb_norms(model)
    x = _image_classes()["x"]
    # Reference: one training-mode forward with cumulative running statistics reset gives each layer's batch mean
    # and unbiased variance, each layer seeing the batch-statistics output (activation included) of the ones before.
    reference = copy.deepcopy(model)
    for _, module, _ in find_norms(reference):
        module.reset_running_stats()
        module.momentum = None
    reference.train()
    with torch.no_grad():
        reference(x)
    report = recalibrate_bn(model, [x])
    assert len(report.layers) == len(list(find_norms(model)))
    for (name, module, _), (_, ref, _) in zip(find_norms(model), find_norms(reference)):
        torch.testing.assert_close(module.running_mean, ref.running_mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(module.running_var, ref.running_var, rtol=1e-4, atol=1e-5, msg=name)

    keys = list(model.state_dict())
    model.train()
    with torch.no_grad():
        before = model(x)
    plugin = SyncNormPlugin()
    plugin.apply(model)
    assert list(model.state_dict()) == keys  # the activation modules kept their names
    synced = [(type(m).__name__, info.kind, info.post) for _, m, info in find_norms(model)]
    # With an activation: kept after the synchronized norm; without one (apply_act=False): plain SyncBatchNorm.
    assert len(synced) == len(report.layers)
    assert set(synced) == {("_SyncBatchNormThen", "sync_batch", ("act",)), ("SyncBatchNorm", "sync_batch", ())}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    plugin.revert(model)
    assert {type(m).__name__ for _, m, _ in find_norms(model)} == {"BatchNormAct2d"}
