import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_bn import declare_norm_layout, describe_norm, insert_norms, swap_norms
from lightning_bn.layers import (
    BatchNormChannelsLast,
    BatchNormNd,
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    GroupNormChannelsLast,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
    available_norms,
)
from lightning_bn.swap import format_report


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


class Tokens(nn.Module):
    """Transformer-ish: channels-last norms over (B, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.norm1 = nn.LayerNorm(12)
        self.blocks = nn.ModuleList([nn.Linear(12, 12), nn.Linear(12, 12)])
        self.norms = nn.ModuleDict({"a": nn.RMSNorm(12), "b": nn.LayerNorm(12)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.proj(x))
        x = self.norms["a"](self.blocks[0](x))
        return self.norms["b"](self.blocks[1](x))


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    out = model(x)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", [k for k in available_norms()])
def test_every_kind_on_conv_net(kind: str) -> None:
    model = conv_net()
    records = swap_norms(model, kind)
    assert [r.name for r in records] == ([] if kind == "batch" else ["1", "4"])  # batch -> batch changes nothing
    if kind != "batch":
        assert all(describe_norm(r.new) is None or describe_norm(r.new).kind == kind for r in records)
    forward_backward(model, torch.randn(4, 3, 6, 6))


@pytest.mark.parametrize("kind", [k for k in available_norms()])
def test_every_kind_on_tokens(kind: str) -> None:
    model = Tokens()
    swap_norms(model, kind)
    forward_backward(model, torch.randn(4, 5, 6))
    if kind != "none":
        info = describe_norm(model.norm1)
        assert info is not None and info.layout == "channels_last" and info.kind == kind


def test_layout_preserved_and_classes() -> None:
    model = Tokens()
    swap_norms(model, "batch")
    assert isinstance(model.norm1, BatchNormChannelsLast)
    swap_norms(model, "group", num_groups=3)
    assert isinstance(model.norm1, GroupNormChannelsLast) and model.norm1.num_groups == 3
    cnn = conv_net()
    swap_norms(cnn, "layer")
    assert isinstance(cnn[1], LayerNormChannelsFirst)
    swap_norms(cnn, "rms")
    assert isinstance(cnn[1], RMSNormChannelsFirst)
    swap_norms(cnn, "batch")
    assert type(cnn[1]) is BatchNormNd  # spatial dims are unknown after group/layer norm: any-dim batch norm


def test_affine_and_running_stats_copied_device_dtype_mode() -> None:
    model = conv_net().double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1, 1)
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    model[1].weight.requires_grad_(False)
    model.eval()
    old = copy.deepcopy(model[1])
    swap_norms(model, "batch_renorm", rmax=2.0)
    new = model[1]
    assert isinstance(new, BatchRenorm) and new.rmax == 2.0
    assert not new.training
    assert new.weight.dtype == torch.float64
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(new, name), getattr(old, name))
    assert new.weight.requires_grad is False and new.bias.requires_grad is True
    # In eval both are batch norm with running statistics: same outputs.
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(new(x), old(x))
    # Between batch-norm kinds and back.
    swap_norms(model, "ghost_batch", virtual_batch_size=2)
    assert isinstance(model[1], GhostBatchNorm)
    torch.testing.assert_close(model[1].running_var, old.running_var)
    swap_norms(model, "frozen_batch")
    assert isinstance(model[1], FrozenBatchNorm)
    torch.testing.assert_close(model[1](x), old(x))


def test_eps_and_momentum_inherited() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=0.3))
    swap_norms(model, "ghost_batch")
    assert model[0].eps == 1e-3 and model[0].momentum == 0.3
    swap_norms(model, "group", num_groups=2)
    assert model[0].eps == 1e-3


def test_nested_shared_module_and_root() -> None:
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Sequential(nn.Linear(4, 4), shared))
    records = swap_norms(model, "layer")
    assert len(records) == 1 and records[0].aliases == ("2.1",)
    assert model[1] is model[2][1] and isinstance(model[1], LayerNormChannelsFirst)
    forward_backward(model, torch.randn(3, 4))

    root = nn.GroupNorm(2, 4)
    report = swap_norms(root, "batch")
    assert isinstance(report.model, nn.modules.batchnorm._BatchNorm) and report[0].name == ""
    assert isinstance(root, nn.GroupNorm)  # the caller's object is untouched; the new root is in report.model


def test_idempotent() -> None:
    model = conv_net()
    swap_norms(model, "group")
    first = model[1]
    assert len(swap_norms(model, "group")) == 0
    assert model[1] is first


def test_include_exclude_by_name_and_class() -> None:
    model = Tokens()
    records = swap_norms(model, "rms", include="norms.*")
    assert sorted(r.name for r in records) == ["norms.b"]  # norms.a is RMSNorm already
    assert isinstance(model.norm1, nn.LayerNorm)
    model = Tokens()
    records = swap_norms(model, "batch", include=nn.LayerNorm, exclude=["norm1"])
    assert [r.name for r in records] == ["norms.b"]


def test_optimizer_sees_new_parameters_after_swap() -> None:
    model = conv_net()
    swap_norms(model, "group")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[1].weight.detach().clone()
    forward_backward(model, torch.randn(4, 3, 6, 6))
    opt.step()
    assert not torch.equal(before, model[1].weight)


class PermutingLayerNorm(nn.LayerNorm):
    """A LayerNorm with its own forward over channels-first input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class DoubledBatchNorm(nn.BatchNorm2d):
    """A forward of its own that is no batch norm of its parameters: twice the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_subclass_with_own_forward_probed_and_skipped_until_declared() -> None:
    # What the forward computes decides: a layer norm over the channels of (N, C, H, W).
    model = nn.Sequential(nn.Conv2d(3, 4, 1), PermutingLayerNorm(4))
    info = describe_norm(model[1])
    assert info is not None and (info.kind, info.layout, info.source) == ("layer", "channels_first", "probe")
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    before = model(x)
    assert len(swap_norms(model, "layer")) == 1 and type(model[1]) is LayerNormChannelsFirst
    torch.testing.assert_close(model(x), before)

    model = nn.Sequential(nn.Conv2d(3, 4, 1), DoubledBatchNorm(4))
    with pytest.warns(UserWarning, match="DoubledBatchNorm: it looks like.*subclasses BatchNorm2d.*declare_norm_"):
        report = swap_norms(model, "group")
    assert len(report) == 0 and isinstance(model[1], DoubledBatchNorm) and "1" in report.skipped
    declare_norm_layout(DoubledBatchNorm, "channels_first")
    records = swap_norms(model, "group")
    assert len(records) == 1 and type(model[1]) is nn.GroupNorm
    forward_backward(model, torch.randn(2, 3, 5, 5))


def test_only_the_exact_target_class_is_left_and_the_report_says_so() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), BatchNormNd(4),
                          nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4))
    report = swap_norms(model, "batch")
    assert [r.name for r in report] == ["5"] and type(model[5]) is BatchNormNd  # torch's sync: replaced
    assert report.skipped == {"1": "already BatchNorm2d", "3": "already BatchNormNd"}
    assert "left as they were (2):" in format_report(report) and "1: already BatchNorm2d" in format_report(report)


def test_a_shift_the_new_kind_cannot_hold_is_reported() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with torch.no_grad():
        model[1].bias.fill_(0.5)
    with pytest.warns(UserWarning, match=r"swap to 'rms': the new layers have no bias, so the shift of 1 is dropped"):
        swap_norms(model, "rms")
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))  # a zero bias: nothing is lost, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_norms(model, "rms")


def test_sharded_norm_is_refused_with_advice() -> None:
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from tests.dist import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        model[1].weight = nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Replicate()]))
        with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\): its weight is a DTensor, already sharded by "
                                             r"fully_shard\. Swap normalization layers before sharding"):
            swap_norms(model, "batch")
        assert isinstance(model[1], nn.LayerNorm)
    finally:
        dist.destroy_process_group()


def test_bad_input() -> None:
    model = conv_net()
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="Unknown norm kind 'groupp'.*batch, group"):
        swap_norms(model, "groupp")
    with pytest.raises(ValueError, match="does not take option.*virtual_batch_size"):
        swap_norms(model, "group", virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"layer '4'.*16 channels.*num_groups`=3"):
        swap_norms(model, "group", num_groups=3, include=["4"])
    with pytest.raises(ValueError, match="num_groups"):
        swap_norms(model, "group", num_groups=3)  # 8 channels: '1' fails; nothing may have changed
    assert all(isinstance(model[i], nn.BatchNorm2d) for i in (1, 4))
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="`include` pattern 'nothing.*' matched no candidate"):
        swap_norms(model, "group", include="nothing.*")
    with pytest.warns(UserWarning, match="no normalization layer"):
        assert len(swap_norms(nn.Linear(2, 2), "group")) == 0
    with pytest.raises(TypeError, match="`include` takes"):
        swap_norms(model, "group", include=[3])
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        swap_norms("model", "group")  # type: ignore[arg-type]


def test_insert_norms_keeps_keys_and_skips_output_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    keys_before = set(model.state_dict())
    records = insert_norms(model, "batch")
    assert [r.name for r in records] == ["0", "3"]
    assert keys_before <= set(model.state_dict())
    assert {"0.norm.weight", "3.norm.running_mean"} <= set(model.state_dict())
    assert not hasattr(model[5], "norm")
    # The norm sits between the layer and the activation: the conv's output is normalized per channel.
    captured = {}
    model[1].register_forward_hook(lambda m, i, o: captured.setdefault("relu_in", i[0]))
    model.train()
    model(torch.randn(16, 1, 8, 8) * 5 + 3)
    per_channel_mean = captured["relu_in"].mean(dim=(0, 2, 3))
    torch.testing.assert_close(per_channel_mean, torch.zeros(4), atol=1e-5, rtol=0)
    forward_backward(model, torch.randn(4, 1, 8, 8))
    # Again: nothing more is inserted.
    assert len(insert_norms(model, "batch")) == 0
    # The output layer only when named.
    assert [r.name for r in insert_norms(model, "layer", include=["5"])] == ["5"]
    # Loading the original weights into the model with norms: only the new keys are missing.
    fresh = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    missing, unexpected = model.load_state_dict(fresh.state_dict(), strict=False)
    assert unexpected == [] and all(".norm." in k for k in missing)


def test_insert_bad_input() -> None:
    with pytest.raises(ValueError, match="Unknown norm kind"):
        insert_norms(nn.Linear(2, 2), "nope")
    with pytest.raises(ValueError, match=r"after layer '0' \(6 channels\).*num_groups"):
        insert_norms(nn.Sequential(nn.Linear(2, 6), nn.Linear(6, 1)), "group", num_groups=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="no layer of"):
            insert_norms(nn.Sequential(nn.ReLU()), "batch")
