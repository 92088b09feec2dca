"""recalibrate_bn: exact population statistics against references on the concatenated data, one and two processes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import recalibrate_bn
from lightning_bn.layers import build_norm
from lightning_bn.recalibrate import RecalibrationReport, default_forward, recalibratable_layers
from tests.dist import run_distributed

TOL = {"rtol": 1e-10, "atol": 1e-12}


class Net(nn.Module):
    """Channels-first and channels-last batch norm, a layer called twice, frozen and untracked ones, dropout."""

    def __init__(self, sync_first: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.SyncBatchNorm(6) if sync_first else nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = build_norm("ghost_batch", 6, virtual_batch_size=4)
        self.frozen = build_norm("frozen_batch", 6)
        self.proj = nn.Linear(6, 5)
        self.tok_bn = build_norm("batch", 5, layout="channels_last")
        self.free = nn.BatchNorm1d(5, track_running_stats=False)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():  # affine parameters and old statistics away from their defaults
            for m in (self.bn1, self.bn2, self.tok_bn, self.free, self.frozen):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            for m in (self.bn1, self.bn2, self.tok_bn):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
            self.frozen.running_mean.uniform_(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.frozen(self.bn2(self.conv2(h)))
        t = self.proj(h.flatten(2).transpose(1, 2))  # (B, H*W, 5) tokens, channels last
        t = self.tok_bn(t) + self.tok_bn(2.0 * t + 1.0)  # one layer, two calls per forward
        return self.head(self.drop(self.free(t.mean(1))))


def make_net(sync_first: bool = False) -> Net:
    torch.manual_seed(0)
    return Net(sync_first).double()


def make_batches(sizes: tuple[int, ...] = (8, 5, 8, 3), seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 1.5 + 0.7 for n in sizes]


def _train_bn(x: Tensor, m: nn.Module, cdim: int = 1) -> Tensor:
    moved = x.movedim(cdim, 1)
    return F.batch_norm(moved, None, None, m.weight, m.bias, True, 0.0, m.eps).movedim(1, cdim)


def _eval_bn(x: Tensor, mean: Tensor, var: Tensor, m: nn.Module, cdim: int = 1) -> Tensor:
    moved = x.movedim(cdim, 1)
    return F.batch_norm(moved, mean, var, m.weight, m.bias, False, 0.0, m.eps).movedim(1, cdim)


def _population(inputs: list[Tensor], cdim: int) -> tuple[Tensor, Tensor]:
    flat = torch.cat([x.movedim(cdim, -1).reshape(-1, x.shape[cdim]) for x in inputs])
    return flat.mean(0), flat.var(0, unbiased=True)


@torch.no_grad()
def reference(net: Net, batches: list[Tensor], exact_eval: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """The statistics written by hand: each layer's inputs over all batches, concatenated, mean and unbiased var.

    Default: upstream layers normalize with their batch statistics. ``exact_eval``: upstream layers in eval mode
    with their recomputed statistics.
    """
    a1 = [net.conv1(x) for x in batches]
    stats = {"bn1": _population(a1, 1)}
    if exact_eval:
        h1 = [F.relu(_eval_bn(a, *stats["bn1"], net.bn1)) for a in a1]
    else:
        h1 = [F.relu(_train_bn(a, net.bn1)) for a in a1]
    a2 = [net.conv2(h) for h in h1]
    stats["bn2"] = _population(a2, 1)
    if exact_eval:
        h2 = [net.frozen(_eval_bn(a, *stats["bn2"], net.bn2)) for a in a2]
    else:
        h2 = [net.frozen(_train_bn(a, net.bn2)) for a in a2]
    tokens = [net.proj(h.flatten(2).transpose(1, 2)) for h in h2]
    stats["tok_bn"] = _population(tokens + [2.0 * t + 1.0 for t in tokens], 2)
    return stats


def snapshot(model: nn.Module) -> dict:
    """Every mode, momentum, requires_grad flag, buffer and parameter, and whether a forward was overridden."""
    return {
        "modes": {n: m.training for n, m in model.named_modules()},
        "momenta": {n: getattr(m, "momentum", None) for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "forwards": [n for n, m in model.named_modules() if "forward" in m.__dict__],
    }


def assert_same(a: dict, b: dict, except_keys: tuple[str, ...] = ()) -> None:
    for key in ("modes", "momenta", "requires_grad", "forwards"):
        assert a[key] == b[key], key
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        if k not in except_keys:
            assert torch.equal(a["state"][k], b["state"][k]), k


RECOMPUTED = tuple(f"{layer}.{buf}" for layer in ("bn1", "bn2", "tok_bn") for buf in ("running_mean", "running_var"))


def test_default_pass_equals_reference_on_concatenated_data() -> None:
    net, batches = make_net(), make_batches()
    old = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in recalibratable_layers(net)}
    expected = reference(net, batches)
    report = recalibrate_bn(net, batches)

    assert list(report.layers) == ["bn1", "bn2", "tok_bn"]
    assert report.num_batches == 4 and report.num_passes == 1
    assert report.skipped == {"frozen": "frozen batch norm", "free": "track_running_stats=False"}
    for name, (mean, var) in expected.items():
        m = getattr(net, name)
        torch.testing.assert_close(m.running_mean, mean, **TOL)
        torch.testing.assert_close(m.running_var, var, **TOL)
        layer = report.layers[name]
        old_mean, old_var = old[name]
        assert layer.mean_shift == pytest.approx(float(((old_mean - mean).abs() / (var + m.eps).sqrt()).mean()))
        assert layer.var_shift == pytest.approx(float(((old_var - var).abs() / (var + m.eps)).mean()))
    n = sum(b.shape[0] for b in batches) * 16
    assert [report.layers[k].num_values for k in ("bn1", "bn2", "tok_bn")] == [n, n, 2 * n]
    assert report.metrics()["bn/recal_var_shift/tok_bn"] == report.layers["tok_bn"].var_shift
    assert set(report.metrics()) == {f"bn/recal_{s}_shift/{k}" for s in ("mean", "var") for k in report.layers}
    text = str(report)
    assert "tok_bn" in text and "frozen batch norm" in text and str(2 * n) in text


def test_state_restored_after_a_run_and_after_an_exception() -> None:
    net = make_net()
    net.train()
    net.head.eval()
    net.bn1.momentum, net.tok_bn.momentum = None, 0.3
    net.conv2.weight.requires_grad_(False)
    net.bn2.num_batches_tracked.fill_(7)
    before = snapshot(net)

    calls = []

    def failing_forward(model: nn.Module, batch: Tensor) -> Tensor:
        calls.append(1)
        if len(calls) == 3:
            assert not model.drop.training and model.bn1.training  # dropout off, batch norm on
            raise RuntimeError("boom in the middle")
        return model(batch)

    with pytest.raises(RuntimeError, match="boom"):
        recalibrate_bn(net, make_batches(), forward=failing_forward)
    assert_same(before, snapshot(net))  # running statistics included

    recalibrate_bn(net, make_batches())
    after = snapshot(net)
    assert_same(before, after, except_keys=RECOMPUTED)
    assert int(net.bn2.num_batches_tracked) == 7
    assert not torch.equal(before["state"]["bn1.running_var"], after["state"]["bn1.running_var"])


def test_exception_in_exact_eval_restores_statistics_of_earlier_levels() -> None:
    net = make_net()
    before = snapshot(net)
    batches = make_batches()
    seen = []

    def forward(model: nn.Module, batch: Tensor) -> Tensor:
        seen.append(1)
        if len(seen) == 2 * len(batches) + 1:  # in the third pass, after two levels were written
            raise KeyboardInterrupt
        return model(batch)

    with pytest.raises(KeyboardInterrupt):
        recalibrate_bn(net, batches, forward=forward, exact_eval=True)
    assert_same(before, snapshot(net))


class KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, features: Tensor) -> Tensor:
        return self.bn(self.lin(features))


def test_tensor_tuple_list_and_dict_batches_give_the_same_statistics() -> None:
    torch.manual_seed(0)
    xs = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    ys = [torch.arange(6) for _ in xs]
    results = []
    for batches in (
        xs,
        [(x, y) for x, y in zip(xs, ys)],
        [["label", x] for x in xs],  # the first tensor, wherever it is
        [{"features": x} for x in xs],
        DataLoader(TensorDataset(torch.cat(xs)), batch_size=6),
    ):
        torch.manual_seed(0)
        model = KeywordNet().double()
        recalibrate_bn(model, batches)
        results.append(torch.cat([model.bn.running_mean, model.bn.running_var]))
    torch.manual_seed(0)
    lin_out = KeywordNet().double().lin(torch.cat(xs)).detach()
    for r in results:
        torch.testing.assert_close(r, torch.cat([lin_out.mean(0), lin_out.var(0)]), **TOL)


def test_custom_forward_and_errors_when_the_default_cannot_feed_the_model() -> None:
    torch.manual_seed(0)
    model = KeywordNet().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"model\(\*\*batch\).*'y'.*`forward=") as err:
        recalibrate_bn(model, [{"features": x, "y": torch.zeros(6)}])
    assert "keys ['features', 'y']" in str(err.value)
    with pytest.raises(TypeError, match="holds none.*`forward="):
        recalibrate_bn(model, [("a", 1)])
    with pytest.raises(TypeError, match="got set.*`forward="):
        default_forward(model, {1, 2})
    assert "forward" not in model.bn.__dict__ and model.bn.training  # put back after each error

    class Sample:
        def __init__(self, data: Tensor) -> None:
            self.data = data

    report = recalibrate_bn(model, [Sample(x)], forward=lambda m, b: m(b.data))
    out = model.lin(x).detach()
    torch.testing.assert_close(model.bn.running_var, out.var(0), **TOL)
    assert report.num_batches == 1


class Wrapper(nn.Module):
    """No forward of its own: whoever trains it calls ``self.net``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def test_a_model_without_forward_gets_an_error_saying_what_was_tried() -> None:
    model = Wrapper().double()
    before = snapshot(model)
    message = r"tried model\(\*\*batch\) with keys \['x'\], but Wrapper has no forward of its own.*Pass `forward="
    with pytest.raises(TypeError, match=message):
        recalibrate_bn(model, [{"x": torch.randn(3, 4, dtype=torch.float64)}])
    assert_same(before, snapshot(model))
    x = torch.randn(6, 4, dtype=torch.float64)
    recalibrate_bn(model, [x], forward=lambda m, b: m.net(b))
    torch.testing.assert_close(model.net[1].running_var, model.net[0](x).detach().var(0), **TOL)


class OwnBatchNorm(nn.Module):
    """A batch norm that is no torch class (a third-party one): recognized by the probe, recalibrated the same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.eps, self.momentum = 1e-3, 0.1
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.rand(channels) - 0.5)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


def test_a_third_party_batch_norm_is_recalibrated_through_the_taxonomy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), OwnBatchNorm(5), nn.ReLU(), nn.Linear(5, 5), OwnBatchNorm(5)).double()
    assert [n for n, _ in recalibratable_layers(model)] == ["1", "4"]
    batches = [torch.randn(n, 4, dtype=torch.float64) * 2 + 1 for n in (6, 3, 7)]
    report = recalibrate_bn(model, batches)
    assert set(report.layers) == {"1", "4"}
    with torch.no_grad():
        first = [model[0](x) for x in batches]
        torch.testing.assert_close(model[1].running_mean, torch.cat(first).mean(0), **TOL)
        # The second layer saw what the first gives in batch-statistics mode, with its own eps and affine.
        second = [model[3](F.relu(F.batch_norm(a, None, None, model[1].weight, model[1].bias, True, 0.0, 1e-3)))
                  for a in first]
        torch.testing.assert_close(model[4].running_var, torch.cat(second).var(0), **TOL)


def test_model_without_batch_norm_warns_and_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), build_norm("frozen_batch", 4))
    before = snapshot(model)
    with pytest.warns(UserWarning, match="no batch-norm layer.*2 \\(frozen batch norm\\).*unchanged"):
        report = recalibrate_bn(model, [torch.randn(3, 4)])
    assert report.layers == {} and report.num_passes == 0
    assert_same(before, snapshot(model))


def test_empty_loader_is_a_clear_error_and_leaves_the_model_unchanged() -> None:
    net = make_net()
    before = snapshot(net)
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 4, 4)), batch_size=4)
    with pytest.raises(ValueError, match="`batches` gave no batch on any process.*DataLoader"):
        recalibrate_bn(net, empty)
    with pytest.raises(ValueError, match="`batches` gave no batch"):
        recalibrate_bn(net, [], exact_eval=True)
    assert_same(before, snapshot(net))


def test_num_batches_caps_and_a_larger_cap_uses_everything() -> None:
    batches = make_batches()
    capped, larger, full = make_net(), make_net(), make_net()
    r_capped = recalibrate_bn(capped, iter(batches), num_batches=2)
    r_larger = recalibrate_bn(larger, batches, num_batches=100)
    recalibrate_bn(full, batches)
    expected = reference(make_net(), batches[:2])
    torch.testing.assert_close(capped.bn2.running_var, expected["bn2"][1], **TOL)
    assert r_capped.num_batches == 2 and r_larger.num_batches == 4
    for a, b in zip(larger.state_dict().values(), full.state_dict().values()):
        assert torch.equal(a, b)


def test_exact_eval_equals_layer_by_layer_reference_and_ignores_batching() -> None:
    batches = make_batches()
    net = make_net()
    expected = reference(make_net(), batches, exact_eval=True)
    report = recalibrate_bn(net, batches, exact_eval=True)
    assert report.num_passes == 3  # bn1, then bn2, then tok_bn
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(getattr(net, name).running_mean, mean, **TOL)
        torch.testing.assert_close(getattr(net, name).running_var, var, **TOL)
    # eval-mode features do not depend on how samples are grouped; the default pass does
    rebatched = list(torch.cat(batches).split(12))
    net2, net3 = make_net(), make_net()
    recalibrate_bn(net2, rebatched, exact_eval=True)
    recalibrate_bn(net3, rebatched)
    torch.testing.assert_close(net2.tok_bn.running_var, net.tok_bn.running_var, **TOL)
    assert not torch.allclose(net3.tok_bn.running_var, net.tok_bn.running_var, rtol=1e-6)
    with pytest.raises(ValueError, match="`exact_eval=True`.*re-iterable.*one-shot iterator"):
        recalibrate_bn(make_net(), iter(batches), exact_eval=True)


def test_modules_selects_layers_and_the_others_run_in_eval_mode() -> None:
    batches = make_batches()
    net = make_net()
    before = snapshot(net)
    report = recalibrate_bn(net, batches, modules=["bn2", net.tok_bn])
    assert list(report.layers) == ["bn2", "tok_bn"] and report.skipped["bn1"] == "not selected by `modules`"
    assert torch.equal(net.bn1.running_var, before["state"]["bn1.running_var"])
    with torch.no_grad():
        a2 = [net.conv2(F.relu(_eval_bn(net.conv1(x), net.bn1.running_mean, net.bn1.running_var, net.bn1)))
              for x in batches]
    torch.testing.assert_close(net.bn2.running_mean, _population(a2, 1)[0], **TOL)


def test_argument_errors_name_the_argument() -> None:
    net = make_net()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"`num_batches` must be a positive int or None.*got {bad!r}"):
            recalibrate_bn(net, make_batches(), num_batches=bad)
    with pytest.raises(ValueError, match="`modules` names 'bn9'.*can be recalibrated are: bn1, bn2, tok_bn"):
        recalibrate_bn(net, make_batches(), modules=["bn9"])
    with pytest.raises(ValueError, match="`modules` selects 'frozen' \\(FrozenBatchNorm\\)"):
        recalibrate_bn(net, make_batches(), modules=["frozen"])
    with pytest.raises(TypeError, match="`batches` must be an iterable.*got Tensor"):
        recalibrate_bn(net, torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError, match="`forward` must be callable"):
        recalibrate_bn(net, make_batches(), forward="model")


def test_layer_that_sees_no_input_warns_and_keeps_its_statistics() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    model = Branchy()
    model.unused.running_var.fill_(3.0)
    with pytest.warns(UserWarning, match="no input reached unused"):
        report = recalibrate_bn(model, [torch.randn(4, 3)])
    assert report.skipped == {"unused": "saw no input"}
    assert torch.equal(model.unused.running_var, torch.full((3,), 3.0))


# ---- two processes over gloo ----------------------------------------------------------------------------------


def _ddp_recalibrate(rank: int, world_size: int, batches: list[Tensor]) -> dict:
    """Even shards, uneven shards (rank 1 with one odd-sized batch), and exact_eval with rank 1 holding nothing."""
    even = batches[rank::world_size]
    uneven = batches[:3] if rank == 0 else batches[3:]
    out = {}
    for case, shard, kwargs in (
        ("even", even, {}),
        ("uneven", uneven, {}),
        ("exact_eval_one_empty", batches if rank == 0 else [], {"exact_eval": True}),
    ):
        net = make_net(sync_first=True)  # torch's SyncBatchNorm cannot run in train mode on CPU: never synced here
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = recalibrate_bn(net, shard, **kwargs)
        out[case] = ({k: v for k, v in net.state_dict().items() if "running" in k}, report.num_batches,
                     report.num_passes)
    return out


def test_two_processes_equal_one_process_on_all_the_data() -> None:
    batches = make_batches((8, 5, 8, 3, 6))
    ranks = run_distributed(_ddp_recalibrate, 2, batches, timeout=120)
    for case, kwargs in (("even", {}), ("uneven", {}), ("exact_eval_one_empty", {"exact_eval": True})):
        single = make_net()
        report = recalibrate_bn(single, batches, **kwargs)
        expected = {k: v for k, v in single.state_dict().items() if "running" in k}
        for rank_result in ranks:
            stats, num_batches, num_passes = rank_result[case]
            assert num_batches == 5 and num_passes == report.num_passes
            for key, value in expected.items():
                torch.testing.assert_close(stats[key], value, **TOL, msg=f"{case} {key}")
        for key in expected:  # identical on both processes, bit for bit
            assert torch.equal(ranks[0][case][0][key], ranks[1][case][0][key])


def test_report_is_a_plain_dataclass() -> None:
    report = RecalibrationReport()
    assert report.metrics() == {} and "0 layer(s)" in str(report)
    assert copy.deepcopy(report) == report


# ------------------------------------------------------------------------------------- padded sequences (issue #16)


class _PaddedNet(nn.Module):
    """Tokens (N, T, 6): a channels-last batch norm after a linear layer, and a PowerNorm on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.bn = build_norm("batch", 6, layout="channels_last")
        self.power = build_norm("power", 6, layout="channels_last", num_groups=2, warmup_iters=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.proj(x)) + self.power(x)


def _padded_batches(seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for lengths in ([5, 2, 3], [1, 4, 4, 2], [3, 3]):
        mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
        x = torch.randn(len(lengths), 5, 6, generator=gen, dtype=torch.float64) * 2.0 + 1.0
        x = torch.where(mask[..., None], x, torch.full_like(x, 100.0))  # padding far from the real tokens
        batches.append({"x": x, "mask": mask})
    return batches


def _real_token_statistics(model: _PaddedNet, batches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    from lightning_bn.layers._power import group_scaling

    real = torch.cat([b["x"][b["mask"]] for b in batches])  # (M, 6): every real token of every batch
    with torch.no_grad():
        projected = model.proj(real)
    scaled = group_scaling(real, 1, 2)
    return {
        "bn.running_mean": projected.mean(0),
        "bn.running_var": projected.var(0, unbiased=True),
        "power.running_phi": (scaled * scaled).mean(0),
        "count": torch.tensor(len(real)),
    }


def test_recalibration_under_padding_mask_from_equals_real_token_statistics() -> None:
    model = _PaddedNet().double()
    batches = _padded_batches()
    expected = _real_token_statistics(model, batches)
    iters, ema = model.power.iters.clone(), model.power.ema_gz.clone()
    report = recalibrate_bn(
        model, batches, forward=lambda m, b: m(b["x"]), padding_mask_from=lambda b: b["mask"].long()
    )
    torch.testing.assert_close(model.bn.running_mean, expected["bn.running_mean"], **TOL)
    torch.testing.assert_close(model.bn.running_var, expected["bn.running_var"], **TOL)
    torch.testing.assert_close(model.power.running_phi, expected["power.running_phi"], **TOL)
    assert report.layers["bn"].num_values == report.layers["power"].num_values == int(expected["count"])
    assert report.layers["power"].mean_shift == 0.0
    assert torch.equal(model.power.iters, iters) and torch.equal(model.power.ema_gz, ema)
    assert model.training  # modes restored
    # negative control: without the mask the padding enters the statistics
    recalibrate_bn(model, batches, forward=lambda m, b: m(b["x"]))
    assert not torch.allclose(model.bn.running_mean, expected["bn.running_mean"], atol=1e-3)


def test_recalibration_with_the_mask_set_by_the_feeding_itself() -> None:
    from lightning_bn import padding_mask, set_padding_mask_from

    model = _PaddedNet().double()
    batches = _padded_batches(seed=1)
    expected = _real_token_statistics(model, batches)

    def feed(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        with padding_mask(batch["mask"]):
            return m(batch["x"])

    recalibrate_bn(model, batches, forward=feed)
    torch.testing.assert_close(model.bn.running_var, expected["bn.running_var"], **TOL)
    torch.testing.assert_close(model.power.running_phi, expected["power.running_phi"], **TOL)

    class WithAttentionMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _PaddedNet().double()

        def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return self.net(x)

    wrapped = WithAttentionMask()
    wrapped.net.load_state_dict(model.state_dict())
    with set_padding_mask_from(wrapped):  # the model's own hooks read attention_mask
        recalibrate_bn(wrapped, [{"x": b["x"], "attention_mask": b["mask"].long()} for b in batches])
    torch.testing.assert_close(wrapped.net.bn.running_mean, expected["bn.running_mean"], **TOL)


def test_recalibration_mask_errors() -> None:
    model = _PaddedNet().double()
    batches = _padded_batches()
    before = model.bn.running_mean.clone()
    with pytest.raises(ValueError, match=r"bn \(BatchNormChannelsLast\).*\(3, 5, 6\)"):
        recalibrate_bn(model, batches, forward=lambda m, b: m(b["x"]), padding_mask_from=lambda b: b["mask"][:, :4])
    torch.testing.assert_close(model.bn.running_mean, before)
    with pytest.raises(TypeError, match="`padding_mask_from` must return a tensor"):
        recalibrate_bn(model, batches, forward=lambda m, b: m(b["x"]), padding_mask_from=lambda b: [1])
    with pytest.raises(TypeError, match="`padding_mask_from` must be callable"):
        recalibrate_bn(model, batches, padding_mask_from="mask")  # type: ignore[arg-type]
