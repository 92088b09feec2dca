"""The taxonomy: known classes, registered kinds, declared layouts, and the probe that classifies unknown norms by
what they compute (every formula in every layout, look-alikes refused, the probed module untouched, caching)."""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bn import taxonomy
from lightning_bn.layers import build_norm, register_norm, unregister_norm
from lightning_bn.swap import swap_norms
from lightning_bn.taxonomy import declare_norm_layout, describe_norm, is_weight_layer, probe_norm, weight_layer_output

C = 6


class RefNorm(nn.Module):
    """One reference formula written with torch.nn.functional (not a torch norm class, so only the probe can tell
    what it is): scale ``weight + offset``, optional bias, eps under any attribute name or none at all."""

    def __init__(
        self, kind: str, layout: str, *, groups: int = 3, offset: float = 0.0, bias: bool = True, eps: float = 1e-5,
        eps_attr: str | None = "eps",
    ) -> None:
        super().__init__()
        self.kind, self.layout, self.groups, self.offset = kind, layout, groups, offset
        g = torch.Generator().manual_seed(hash((kind, layout)) % 1000)
        self.weight = nn.Parameter(torch.rand(C, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.rand(C, generator=g) - 0.5) if bias else None
        self._hidden_eps = eps
        if eps_attr is not None:
            setattr(self, eps_attr, eps)
        if kind in ("batch", "frozen"):
            self.register_buffer("running_mean", torch.rand(C, generator=g))
            self.register_buffer("running_var", torch.rand(C, generator=g) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        cf = x.movedim(-1, 1) if self.layout == "channels_last" else x  # (N, C, *)
        w, b, eps = self.weight + self.offset, self.bias, self._hidden_eps
        if self.kind == "layer":
            out = F.layer_norm(cf.movedim(1, -1), (C,), w, b, eps).movedim(-1, 1)
        elif self.kind == "rms":
            out = F.rms_norm(cf.movedim(1, -1), (C,), w, eps).movedim(-1, 1)
            out = out if b is None else out + b.view(1, -1, *[1] * (cf.dim() - 2))
        elif self.kind == "batch":
            flat = cf.reshape(cf.shape[0], C, -1)
            out = F.batch_norm(flat, self.running_mean, self.running_var, w, b, self.training, 0.1, eps).view_as(cf)
        elif self.kind == "frozen":
            shape = (1, -1, *[1] * (cf.dim() - 2))
            out = (cf - self.running_mean.view(shape)) / (self.running_var.view(shape) + eps).sqrt()
            out = out * w.view(shape) + (0 if b is None else b.view(shape))
        elif self.kind == "instance":
            out = F.instance_norm(cf, weight=w, bias=b, eps=eps)
        else:
            out = F.group_norm(cf, self.groups, w, b, eps)
        return out.movedim(1, -1) if self.layout == "channels_last" else out


LAYOUTS = ("channels_first", "channels_last")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["layer", "rms", "batch", "instance", "group", "frozen"])
def test_every_formula_in_every_layout(kind: str, layout: str) -> None:
    module = RefNorm(kind, layout, bias=kind != "rms")
    info = describe_norm(module)
    assert info is not None and info.source == "probe"
    expected = {"frozen": "frozen_batch"}.get(kind, kind)
    assert (info.kind, info.layout, info.num_features, info.eps) == (expected, layout, C, 1e-5)
    assert info.scale is module.weight and info.scale_name == "weight"
    assert info.shift is module.bias
    assert info.batch_stats == (kind == "batch") and info.running_stats == (kind == "batch")
    assert info.num_groups == (3 if kind == "group" else None)
    assert info.dims is None  # the module takes any rank


@pytest.mark.parametrize(
    ("options", "eps"),
    [
        ({"offset": 1.0, "bias": False}, 1e-6),  # Gemma: x * (1 + weight)
        ({"eps_attr": "variance_epsilon", "bias": False}, 1e-6),  # Llama's attribute name
        ({"eps_attr": None, "bias": False}, 1e-6),  # no eps attribute: found on an input whose variance is about eps
        ({"eps_attr": None, "bias": False}, 1e-12),
        ({"eps_attr": None, "bias": False}, 0.0),
    ],
)
def test_scale_convention_and_eps(options: dict, eps: float) -> None:
    module = RefNorm("rms", "channels_last", eps=eps, **options)
    info = describe_norm(module)
    assert info is not None and info.kind == "rms" and info.eps == pytest.approx(eps, rel=1e-6, abs=0)
    offset = options.get("offset", 0.0)
    torch.testing.assert_close(info.scale, module.weight.detach() + offset)
    # The swap to the same kind is exact: torch's RMSNorm with 1 + weight as its weight, the same eps.
    model = nn.Sequential(module)
    x = torch.randn(3, 4, C) * 3 + 1
    before = model(x)
    report = swap_norms(model, "rms")
    assert type(model[0]) is nn.RMSNorm and len(report) == 1
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


class ScaleNorm(nn.Module):
    """Named like a norm, with a weight of C values and an eps, but only scales."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(C) + 0.5)
        self.eps = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class UnbiasedStdNorm(nn.Module):
    """``x / std(x)`` with the unbiased std over the channels (timm's SimpleNorm): no kind computes this."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        return x / (x.var(-1, keepdim=True) + self.eps).sqrt() * self.weight


class NormProj(nn.Linear):
    pass


def test_look_alikes_are_not_taken_for_norms() -> None:
    model = nn.Sequential()
    model.norm_proj = nn.Linear(C, C)
    model.scale = ScaleNorm()
    model.simple = UnbiasedStdNorm()
    model.proj2 = NormProj(C, C)
    for _, module in model.named_children():
        assert describe_norm(module) is None
    assert probe_norm(model.scale) is None and probe_norm(model.simple) is None
    with pytest.warns(UserWarning) as caught:
        report = swap_norms(model, "batch")
    messages = [str(w.message) for w in caught]
    assert any(re.match(r"Skipping ScaleNorm: it looks like a normalization layer.*exclude=\[ScaleNorm\].*"
                        r"Layers: scale\.", m) for m in messages), messages
    assert any(m.startswith("Skipping UnbiasedStdNorm") for m in messages)
    assert len(report) == 0 and {"scale", "simple"} <= set(report.skipped) and "norm_proj" not in report.skipped
    assert isinstance(model.scale, ScaleNorm)
    with warnings.catch_warnings():  # excluded by the user: no warning about them
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "Sequential has no normalization layer")
        swap_norms(model, "batch", exclude=[ScaleNorm, "simple"])


def test_probe_changes_nothing_in_the_module_nor_the_random_state() -> None:
    module = RefNorm("batch", "channels_first")
    module.eval()
    calls: list[int] = []
    module.register_forward_hook(lambda *args: calls.append(1))
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    info = probe_norm(module, layouts=LAYOUTS)
    taxonomy._PROBE_CACHE.clear()
    assert probe_norm(module) == info and info is not None and info.kind == "batch"
    assert torch.equal(torch.get_rng_state(), rng)
    assert not module.training and calls == []
    for n, p in module.named_parameters():
        assert torch.equal(p, params[n]) and p.requires_grad
    for n, b in module.named_buffers():
        assert torch.equal(b, buffers[n])


class CountingNorm(RefNorm):
    forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        type(self).forwards += 1
        return super().forward(x)


class FormatNorm(nn.Module):
    """One class, two layouts by instance (as Hugging Face's ConvNextLayerNorm's ``data_format``)."""

    def __init__(self, data_format: str) -> None:
        super().__init__()
        self.data_format = data_format
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C)), 1e-6

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_first":
            return F.layer_norm(x.permute(0, 2, 3, 1), (C,), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        return F.layer_norm(x, (C,), self.weight, self.bias, self.eps)


def test_probe_is_cached_per_class_and_configuration() -> None:
    CountingNorm.forwards = 0
    first = describe_norm(CountingNorm("layer", "channels_last"))
    probed = CountingNorm.forwards
    assert first is not None and probed > 0
    for _ in range(3):
        assert describe_norm(CountingNorm("layer", "channels_last")) == first
    assert CountingNorm.forwards == probed  # same configuration: no new probe
    other = describe_norm(CountingNorm("layer", "channels_last", eps=1e-3))  # another eps: probed again
    assert other is not None and other.eps == 1e-3 and CountingNorm.forwards > probed

    first_infos = [describe_norm(FormatNorm(f)) for f in ("channels_first", "channels_last")]
    assert [(i.kind, i.layout) for i in first_infos if i] == [("layer", "channels_first"), ("layer", "channels_last")]
    assert first_infos[0] is not None and first_infos[0].dims == 2  # it permutes (N, C, H, W) only


def test_known_third_party_classes_match_the_probe() -> None:
    """Every recorded transformers class the test environment has is described as the probe finds it."""
    modules = {
        "LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3",
        "Phi3RMSNorm": "phi3", "T5LayerNorm": "t5", "GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma2",
        "Gemma3RMSNorm": "gemma3", "CohereLayerNorm": "cohere", "ConvNextLayerNorm": "convnext",
    }
    recorded = [name for (root, name) in taxonomy._NAMED_TABLE if root == "transformers"]  # timm: test below
    assert sorted(recorded) == sorted(modules)  # a new entry needs its line here
    pytest.importorskip("transformers")
    checked = 0
    for name, package in modules.items():
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{package}.modeling_{package}"), name)
        except (ImportError, AttributeError):
            continue
        instances = [cls(C, data_format=f) for f in LAYOUTS] if name == "ConvNextLayerNorm" else [cls(C)]
        for module in instances:
            _assert_table_matches_probe(module)
            checked += 1
    assert checked >= 8


def _assert_table_matches_probe(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-0.5, 0.5)  # perturbed: 1 + weight and weight differ visibly
    table = describe_norm(module)
    probed = probe_norm(module)
    name = type(module).__name__
    assert table is not None and table.source == "class", name
    assert probed is not None, name
    assert (table.kind, table.layout, table.eps, table.running_stats) == (
        probed.kind, probed.layout, probed.eps, probed.running_stats
    ), name
    for attr in ("scale", "shift"):
        a, b = getattr(table, attr), getattr(probed, attr)
        assert (a is None) == (b is None), (name, attr)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_known_timm_and_torchvision_classes_match_the_probe() -> None:
    layers = pytest.importorskip("timm.layers")
    tv_misc = pytest.importorskip("torchvision.ops.misc")
    modules = [
        layers.LayerNorm(C), layers.LayerNorm2d(C), layers.RmsNorm(C), layers.RmsNorm2d(C),
        layers.GroupNorm(C, num_groups=3), layers.GroupNorm1(C),
        layers.BatchNormAct2d(C, apply_act=False), layers.FrozenBatchNormAct2d(C, apply_act=False),
        layers.GroupNormAct(C, num_groups=3, apply_act=False), layers.LayerNormAct(C, apply_act=False),
        layers.LayerNormAct2d(C, apply_act=False), tv_misc.FrozenBatchNorm2d(C),
    ]
    for module in modules:
        with torch.no_grad():
            for name in ("running_mean", "running_var"):
                if isinstance(getattr(module, name, None), Tensor):
                    getattr(module, name).uniform_(0.5, 1.5)
        _assert_table_matches_probe(module)
    act = describe_norm(layers.BatchNormAct2d(C, act_layer=nn.SiLU))
    assert act is not None and act.kind == "batch" and act.post == ("act",) and act.dims == 2


class OwnLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass with a forward of its own that computes something else (twice the layer norm)."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class TanhNorm(nn.Module):
    def __init__(self, num_features: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.gain = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x) * self.gain


def test_register_norm_and_declare_norm_layout_fill_the_taxonomy() -> None:
    assert describe_norm(TanhNorm(4, "channels_first")) is None
    register_norm("tanh_norm", lambda num_features, layout, dims: TanhNorm(num_features, layout))
    try:
        info = describe_norm(TanhNorm(4, "channels_last"))
        assert info is not None and (info.kind, info.layout, info.num_features, info.source) == (
            "tanh_norm", "channels_last", 4, "registered"
        )
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        swap_norms(model, "tanh_norm")
        assert isinstance(model[1], TanhNorm) and len(swap_norms(model, "tanh_norm")) == 0
    finally:
        unregister_norm("tanh_norm")
    assert describe_norm(TanhNorm(4, "channels_first")) is None

    # A subclass whose forward is not its base's formula is not recognized until its layout is declared.
    assert describe_norm(OwnLayerNorm(4)) is None
    declare_norm_layout(OwnLayerNorm, "channels_last")
    try:
        info = describe_norm(OwnLayerNorm(4))
        assert info is not None and (info.kind, info.layout, info.source) == ("layer", "channels_last", "declared")
    finally:
        taxonomy._DECLARED.pop(OwnLayerNorm)
        taxonomy.clear_caches()


def test_weight_layers() -> None:
    lstm = nn.LSTM(3, 4)
    for module in (nn.Linear(2, 3), nn.Conv2d(1, 2, 3), nn.Embedding(5, 2), lstm, nn.LazyLinear(3)):
        assert is_weight_layer(module), module
    for module in (nn.LayerNorm(3), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)), nn.PReLU()):
        assert not is_weight_layer(module), module
    assert weight_layer_output(nn.Conv2d(1, 5, 3)) == (5, "channels_first", 2)
    assert weight_layer_output(nn.Linear(2, 7)) == (7, "channels_last", None)
    assert weight_layer_output(lstm) is None
    assert describe_norm(build_norm("group", 4)) is not None


class LinearLike(nn.Module):
    """Hugging Face's Conv1D in spirit: a leaf with an (in, out) weight, no nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


def test_select_modules_default_rules() -> None:
    from lightning_bn.stats import select_modules

    model = nn.Module()
    model.embed = nn.Embedding(10, C)
    model.block = nn.Sequential(LinearLike(), RefNorm("rms", "channels_last", bias=False), nn.GELU(), nn.Dropout())
    model.proj = nn.Linear(C, C)
    model.lstm = nn.LSTM(C, C)
    model.scale = ScaleNorm()
    model.pool = nn.AdaptiveAvgPool1d(1)
    from lightning_bn import insert_norms

    insert_norms(model, "layer", include=["proj"])  # the Linear now has a child: still watched, and its norm too
    assert [n for n, _ in select_modules(model)] == ["embed", "block.0", "block.1", "proj", "proj.norm", "lstm"]
