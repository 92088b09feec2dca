"""lightning_bn.stats: each figure against a manual computation, exact unions, hooks, histograms, alerts, DDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_bn.layers import BatchNormChannelsLast, FrozenBatchNorm
from lightning_bn.moments import SUMMARY_FIELDS, summary_to_figures, tensor_summary
from lightning_bn.stats import (
    ACTIVATION_STATS,
    ALERT_KINDS,
    TENSOR_FIELDS,
    TENSOR_STATS,
    AlertThresholds,
    LayerStats,
    LayerStatsCollector,
    Layout,
    LogBins,
    TensorField,
    TensorStat,
    bin_counts,
    find_alerts,
    histogram_edges,
    select_modules,
    summarize,
    trim_histogram,
)
from tests.dist import run_distributed

D = torch.float64


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _manual(x: torch.Tensor, zero_tol: float = 0.0) -> dict[str, float]:
    x = x.detach().double().reshape(-1)
    finite = x[torch.isfinite(x)]
    return {
        "mean": finite.mean().item(),
        "std": finite.std(unbiased=False).item(),
        "rms": finite.pow(2).mean().sqrt().item(),
        "abs_max": finite.abs().max().item(),
        "frac_zero": (finite.abs() <= zero_tol).sum().item() / x.numel(),
        "frac_nonfinite": (~torch.isfinite(x)).sum().item() / x.numel(),
    }


class Net(nn.Module):
    """conv -> batch norm -> in-place ReLU -> flatten -> linear, the shapes of a tiny CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).flatten(1))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net().to(D)
    with torch.no_grad():  # running statistics away from their defaults, so the shifts are not trivial
        net.bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=D))
        net.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0], dtype=D))
        net.bn.weight.copy_(torch.tensor([1.0, 1e-5, -2e-4], dtype=D))
    return net


# ---------------------------------------------------------------------------------------------------- selection
def test_select_modules_default_class_glob_and_exclude() -> None:
    net = nn.Sequential(nn.Conv1d(2, 2, 1), nn.GroupNorm(1, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2)),
                        FrozenBatchNorm(2), BatchNormChannelsLast(2))
    assert [n for n, _ in select_modules(net)] == ["0", "1", "3.0", "4", "5"]
    assert [n for n, _ in select_modules(net, include=nn.ReLU)] == ["2"]
    assert [n for n, _ in select_modules(net, include=["3.*", nn.GroupNorm])] == ["1", "3.0"]
    assert [n for n, _ in select_modules(net, exclude=[nn.Linear, "4"])] == ["0", "1", "5"]
    with pytest.raises(TypeError, match=r"`include` takes nn.Module classes and module-name globs.*got 3"):
        select_modules(net, include=[3])
    with pytest.raises(TypeError, match=r"`exclude`.*got <class 'int'>"):
        select_modules(net, exclude=int)


def test_collector_rejects_bad_arguments() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"`modules` lists one module twice, as 'a' and 'b'"):
        LayerStatsCollector([("a", lin), ("b", lin)])
    with pytest.raises(ValueError, match=r"`zero_tol` must be >= 0, got -1"):
        LayerStatsCollector([("a", lin)], zero_tol=-1)
    with pytest.raises(ValueError, match=r"`bins_per_decade` must be a positive integer, got 0"):
        LogBins(0)
    with pytest.raises(ValueError, match=r"`low` must be below `high`.*low=3, high=3"):
        LogBins(4, 3, 3)


# ---------------------------------------------------------------------------------------------------- figures
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_tol", [0.0, 0.5])
@pytest.mark.parametrize("sync_free", [None, True])
def test_fast_summaries_equal_the_moments_reference(
    dtype: torch.dtype, zero_tol: float, sync_free: bool | None
) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    x[1, :, 0] = 0.0
    x[2, 0, 0, :2] = torch.tensor([0.5, -0.5])  # exactly at zero_tol=0.5: counted as zero
    finite = x.to(dtype).clone()
    x[0, 1, 2, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x = x.to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for t, nonfinite in ((x, 3), (finite, 0)):  # the all-finite fast path and the masked path
        ref = tensor_summary(t, zero_tol, dtype=torch.float64)
        got = summarize(t, zero_tol, sync_free=sync_free).double()
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
        assert got[5] == nonfinite and got[0] == t.numel() - nonfinite
        assert got[4] == ((t.double().abs() <= zero_tol) & torch.isfinite(t)).sum()
        partial = summarize(t, zero_tol, sync_free=sync_free, full=False).double()  # gradients: no sum, no zeros
        torch.testing.assert_close(partial, ref * torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=ref.dtype),
                                   rtol=tol, atol=tol)
    assert summarize(x[:0], sync_free=sync_free).tolist() == [0.0] * 6


def test_fast_summaries_overflowing_squares_and_large_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # finite float32 values whose squares overflow float32: in torch's float32 accumulation the sum of squares is
    # inf and the other figures stay exact
    x = torch.tensor([3e30, -1.0, 0.0, 2.0, float("nan")], dtype=torch.float32)
    for t in (x, x[:4]):
        got = summarize(t)
        ref = tensor_summary(t, dtype=torch.float32)
        assert torch.equal(got, ref), (got, ref)
        assert not math.isfinite(got[2])
    # counts of 2**24 or more terms are summed in float64 (float32 would stop counting at 2**24)
    import lightning_bn.stats._summary as summary_module

    monkeypatch.setattr(summary_module, "_EXACT_FLOAT32_COUNT", 4)
    y = torch.tensor([0.0, 1.0, -2.0, 0.0, 0.0, float("inf"), 3.0], dtype=torch.float32)
    for sync_free in (None, True):
        for t in (y, y[:5]):
            assert summarize(t, sync_free=sync_free).tolist() == tensor_summary(t, dtype=torch.float64).tolist()


def test_summaries_of_tensors_without_plain_storage() -> None:
    # a __torch_dispatch__ wrapper subclass has no storage of its own (data_ptr 0): torch ops summarize it
    from torch.testing._internal.logging_tensor import LoggingTensor

    from lightning_bn.stats._summary import summary_row

    wrapped = LoggingTensor(torch.tensor([1.0, 0.0, -3.0]))
    assert summary_row(wrapped) == [3.0, -2.0, 10.0, 3.0, 1.0, 0.0]


@pytest.mark.parametrize("warm", [False, True], ids=["first-collection", "fused-channel-sums"])
def test_every_figure_against_manual_computation(warm: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _net()
    x = torch.randn(6, 2, 4, 4, dtype=D)
    mods = select_modules(net)
    assert [n for n, _ in mods] == ["conv", "bn", "fc"]
    collector = LayerStatsCollector(mods, zero_tol=1e-12, gamma_tol=1e-3)
    if warm:
        # an earlier collection: the conv's output was the batch norm's input, so from now on the conv computes the
        # channel sums with its summary (its sum and sum of squares come from them) and the batch norm reuses them
        state = {k: v.clone() for k, v in net.state_dict().items()}
        collector.attach()
        net(torch.randn(6, 2, 4, 4, dtype=D))
        collector.detach()
        collector.finalize()
        net.load_state_dict(state)
        assert collector._feeds_bn == {0: (1, 3)}
    import lightning_bn.stats._collector as collector_module

    fused = []
    original_row = collector_module.summary_row

    def counting_row(*args, **kwargs):
        fused.append(kwargs.get("totals") is not None)
        return original_row(*args, **kwargs)

    monkeypatch.setattr(collector_module, "summary_row", counting_row)
    before = _hooks(net)
    collector.attach()
    assert _hooks(net) == before + 3  # three forward hooks (batch-norm running stats are copied at attach)
    running = (net.bn.running_mean.clone(), net.bn.running_var.clone())

    # reference tensors through the same computation, gradients kept by retain_grad
    conv_out = net.conv(x)
    conv_out.retain_grad()
    bn_out = net.bn(conv_out)
    bn_out.retain_grad()
    bn_out_copy = bn_out.detach().clone()  # before the in-place ReLU changes it
    fc_out = net.fc(net.act(bn_out).flatten(1))
    fc_out.retain_grad()
    loss = fc_out.pow(2).mean()
    loss.backward()
    collector.record_params()
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-6 * p.grad  # small: the batch-norm scales stay as set
    collector.record_updates()
    collector.detach()
    assert _hooks(net) == before
    # conv, bn and fc outputs and their gradients; the bn input is the conv output, summarized once
    assert collector.summaries == 6
    # the conv output's summary from its channel sums once it is known to feed the batch norm
    assert sum(fused) == (1 if warm else 0) and len(fused) == 6
    stats = collector.finalize()
    s = stats.scalars
    assert stats.order == ["conv", "bn", "fc"]

    for name, out in (("conv", conv_out), ("bn", bn_out_copy), ("fc", fc_out)):
        for stat, value in _manual(out, 1e-12).items():
            assert s[f"act/{stat}/{name}"] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, stat)
    for stat, value in _manual(conv_out).items():
        assert s[f"act_in/{stat}/bn"] == pytest.approx(value, rel=1e-12, abs=1e-12)
    assert not any(k.startswith("act_in/") and k.endswith("/conv") for k in s)  # inputs of norm layers only
    # the gradient hook on the batch-norm output sees the gradient before the in-place ReLU
    for name, out in (("conv", conv_out), ("bn", bn_out), ("fc", fc_out)):
        g = out.grad.reshape(-1)
        if name == "bn":  # retain_grad gives the gradient after the in-place ReLU; through it, ReLU's mask
            g = (out.grad * (bn_out_copy > 0)).reshape(-1)
        assert s[f"act_grad/rms/{name}"] == pytest.approx(g.pow(2).mean().sqrt().item(), rel=1e-12)
        assert s[f"act_grad/abs_max/{name}"] == pytest.approx(g.abs().max().item(), rel=1e-12)

    mu = conv_out.detach().mean((0, 2, 3))
    var = conv_out.detach().var((0, 2, 3), unbiased=True)
    rm, rv = running
    eps = net.bn.eps
    assert s["bn/mean_shift/bn"] == pytest.approx(((mu - rm).abs() / (rv + eps).sqrt()).mean().item(), rel=1e-12)
    assert s["bn/var_shift/bn"] == pytest.approx(((var + eps) / (rv + eps)).log().abs().mean().item(), rel=1e-12)
    assert s["bn/running_spread/bn"] == 0.0
    assert s["bn/frac_small_gamma/bn"] == pytest.approx(2 / 3)  # |gamma| = 1e-5 and 2e-4 are below 1e-3

    for name in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"):
        w, g = weights[name], grads[name]
        assert s[f"param/norm/{name}"] == pytest.approx(w.norm().item(), rel=1e-12)
        assert s[f"grad/norm/{name}"] == pytest.approx(g.norm().item(), rel=1e-12)
        if w.norm() > 0:
            assert s[f"update/ratio/{name}"] == pytest.approx((1e-6 * g).norm().item() / w.norm().item(), rel=1e-6)
            assert s[f"grad/ratio/{name}"] == pytest.approx(g.norm().item() / w.norm().item(), rel=1e-12)
    assert "grad/ratio/bn.bias" not in s and "update/ratio/bn.bias" not in s  # ||w|| = 0: no ratio, not inf
    assert find_alerts(stats) == {kind: [] for kind in ALERT_KINDS}


def test_nonfinite_values_and_tuple_dict_outputs() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple:
            return x * 2, {"copy": x.clone(), "index": torch.arange(3), "spectrum": torch.complex(x, x)}

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, d = self.pair(x)
            return self.fc(a) + self.fc(d["copy"])  # fc runs twice: its figures cover both calls

    model = Model().to(D)
    x = torch.tensor([[0.0, 1.0, -2.0, float("nan")], [3.0, 0.0, float("inf"), 0.5]], dtype=D)
    collector = LayerStatsCollector(select_modules(model, include=[Pair, nn.Linear]), activation_grads=False)
    collector.attach()
    model(x)
    collector.detach()
    s = collector.finalize().scalars
    both = torch.cat([x * 2, x])  # the integer and the complex tensors are not activations
    for stat, value in _manual(both).items():
        assert s[f"act/{stat}/pair"] == pytest.approx(value, rel=1e-12), stat
    assert s["act/frac_nonfinite/pair"] == pytest.approx(4 / 16)
    assert s["act/frac_zero/pair"] == pytest.approx(4 / 16)
    # every row of x holds a NaN or an Inf, so every output of fc is non-finite: no finite figure, no NaN either
    assert s["act/frac_nonfinite/fc"] == 1.0
    assert [s[f"act/{stat}/fc"] for stat in ("mean", "std", "rms", "abs_max", "frac_zero")] == [0.0] * 5
    assert collector.forwards == 3
    alerts = find_alerts(LayerStats(s, order=["pair", "fc"]))
    assert alerts["nonfinite"] == ["pair", "fc"] and alerts["std_collapse"] == []


def test_micro_batches_equal_one_batch_and_hooks_fire_only_while_attached() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)).to(D)
    x = torch.randn(8, 3, dtype=D)

    def collect(chunks: int) -> dict[str, float]:
        model.zero_grad()
        collector = LayerStatsCollector(select_modules(model), bins=LogBins(2, -3, 3))
        collector.attach(histograms=True)
        for part in x.chunk(chunks):
            (model(part).pow(2).mean() / chunks).backward()
        collector.record_params()
        collector.detach()
        calls = collector.forwards
        model(x).sum().backward()  # after detach: nothing counted
        assert collector.forwards == calls == 3 * chunks
        stats = collector.finalize()
        flat = dict(stats.scalars)
        for tag, (edges, counts) in stats.histograms.items():
            flat.update({f"{tag}/count{i}": c for i, c in enumerate(counts)})
            flat.update({f"{tag}/edge{i}": e for i, e in enumerate(edges)})
        return flat

    one, four = collect(1), collect(4)
    assert one.keys() == four.keys()
    for key in one:
        assert four[key] == pytest.approx(one[key], rel=1e-10, abs=1e-14), key


def test_attach_twice_raises_and_detach_is_idempotent() -> None:
    net = _net()
    collector = LayerStatsCollector(select_modules(net))
    collector.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        collector.attach()
    collector.detach()
    collector.detach()
    assert _hooks(net) == 0 and collector.num_hooks() == 0


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_does_not_count_recomputed_forwards(reentrant: bool) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.norm, self.fc2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.norm(self.fc1(x))))

    class Model(nn.Module):
        def __init__(self, ckpt: bool) -> None:
            super().__init__()
            self.block, self.head, self.ckpt = Block(), nn.Linear(4, 1), ckpt

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = checkpoint(self.block, x, use_reentrant=reentrant) if self.ckpt else self.block(x)
            return self.head(h)

    torch.manual_seed(0)
    plain = Model(False).to(D)
    ckpt = Model(True).to(D)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(5, 4, dtype=D, requires_grad=reentrant)  # reentrant checkpointing needs an input with grad
    results = []
    for model in (plain, ckpt):
        collector = LayerStatsCollector(select_modules(model))
        collector.attach()
        model(x).pow(2).sum().backward()
        collector.record_params()
        collector.detach()
        results.append((collector.forwards, collector.finalize().scalars))
    (calls_plain, plain_s), (calls_ckpt, ckpt_s) = results
    assert calls_plain == calls_ckpt == 4
    assert plain_s.keys() == ckpt_s.keys()
    assert "act_grad/rms/block.fc1" in ckpt_s
    for key, value in plain_s.items():
        assert ckpt_s[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


# ---------------------------------------------------------------------------------------------------- histograms
def test_bin_counts_against_numpy_and_trim() -> None:
    bins = LogBins(2, -2, 2)
    x = torch.tensor([0.0, 1e-3, -1e-3, 0.05, -0.5, 3.0, -7.0, 99.0, 1e5, -1e9, float("nan"), float("inf")])
    counts = bin_counts(x, bins, torch.float64).numpy()
    edges = histogram_edges(bins, 1e9)
    finite = x[torch.isfinite(x)].double().numpy()
    expected, _ = np.histogram(finite, bins=edges)
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == 10 and len(edges) == len(counts) + 1 == bins.num_bins + 1
    # the zero bin (-1e-2, 1e-2) holds the three smallest magnitudes
    assert counts[bins.num_magnitudes] == 3
    e, c = trim_histogram(edges, counts)
    assert c[0] > 0 and c[-1] > 0 and e[0] == edges[0] and len(e) == len(c) + 1
    e0, c0 = trim_histogram(edges, np.zeros_like(counts))
    assert len(c0) == 1 and len(e0) == 2


# ---------------------------------------------------------------------------------------------------- alerts
def test_alerts_each_kind() -> None:
    s = {
        "act/std/a": 1.0, "act/frac_zero/a": 0.95, "act/frac_nonfinite/a": 0.0, "act_grad/rms/a": 1e-9,
        "act/std/b": 5e-5, "act/frac_nonfinite/b": 0.1, "act_grad/rms/b": 1.0,
        "act/std/c": 2e4, "act_in/frac_nonfinite/c": 0.5, "act_grad/rms/c": 1.0,
    }
    alerts = find_alerts(LayerStats(s, order=["a", "b", "c"]))
    assert alerts == {
        "nonfinite": ["b", "c"], "dead": ["a"], "std_collapse": ["b"], "std_explode": ["c"],
        "grad_vanishing": ["a"], "grad_exploding": [],
    }
    s2 = {"act_grad/rms/a": 1e5, "act_grad/rms/b": 1e-1}
    assert find_alerts(LayerStats(s2, order=["a", "b"]))["grad_exploding"] == ["a"]
    assert find_alerts(LayerStats(s2, order=["a", "b"]), AlertThresholds(grad_ratio=1e7))["grad_exploding"] == []
    with pytest.raises(ValueError, match=r"`dead_fraction` must be in \[0, 1\], got 2"):
        AlertThresholds(dead_fraction=2)


# ---------------------------------------------------------------------------------------------------- DDP
def _halves() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 2, 4, 4, dtype=D, generator=g)
    return x[:4], x[4:]  # uneven: 4 and 6 samples


def _step(model: nn.Module, collector: LayerStatsCollector, parts: list[torch.Tensor], weights: list[float]) -> None:
    collector.attach(histograms=True)
    for part, w in zip(parts, weights):
        (model(part).pow(2).mean() * w).backward()
    inner = model.module if hasattr(model, "module") else model
    collector.record_params()
    with torch.no_grad():
        for p in inner.parameters():
            p -= 0.1 * p.grad
    collector.record_updates()
    collector.detach()


def _ddp_worker(rank: int, world_size: int) -> dict:
    net = _net()
    ddp = nn.parallel.DistributedDataParallel(net)
    collector = LayerStatsCollector(select_modules(net), bins=LogBins(2, -4, 4))
    _step(ddp, collector, [_halves()[rank]], [1.0])
    stats = collector.finalize(act_grad_scale=1.0 / world_size)
    return {"scalars": stats.scalars, "hist": stats.histograms, "running": (net.bn.running_mean, net.bn.running_var),
            "order": stats.order}


def test_two_processes_equal_one_process_on_all_the_data() -> None:
    ranks = run_distributed(_ddp_worker, 2, timeout=120)
    # one process, the same computation: each half through the model (batch norm normalizes per half), the
    # loss DDP optimizes being the mean of the two halves' losses
    net = _net()
    collector = LayerStatsCollector(select_modules(net), bins=LogBins(2, -4, 4))
    _step(net, collector, list(_halves()), [0.5, 0.5])
    ref = collector.finalize()
    for r in ranks:
        assert r["order"] == ref.order
        got = r["scalars"]
        spread = "bn/running_spread/bn"
        assert got.keys() == ref.scalars.keys()
        for key, value in ref.scalars.items():
            if key != spread:
                assert got[key] == pytest.approx(value, rel=1e-10, abs=1e-13), key
        assert got.keys() >= {"act/std/bn", "act_grad/rms/fc", "bn/mean_shift/bn", "grad/norm/conv.weight"}
        # the spread of the two processes' running means, from their buffers
        (m0, v0), (m1, v1) = ranks[0]["running"], ranks[1]["running"]
        std = ((m0 - m1).abs() / 2)  # population std of two values
        expected = (std / ((v0 + v1) / 2 + net.bn.eps).sqrt()).mean().item()
        assert expected > 1e-3 and got[spread] == pytest.approx(expected, rel=1e-10)
        assert r["hist"].keys() == ref.histograms.keys()
        for tag, (edges, counts) in ref.histograms.items():
            np.testing.assert_allclose(r["hist"][tag][1], counts, rtol=0, atol=0)
            np.testing.assert_allclose(r["hist"][tag][0], edges, rtol=1e-12)
    assert math.isclose(sum(ranks[0]["hist"]["act/hist/conv"][1]), 10 * 3 * 16)


def test_host_figures_match_the_torch_definitions() -> None:
    # finalize computes the figures on the host in numpy: moments.summary_to_figures on an array, as on a tensor
    from lightning_bn.moments import summary_to_figures

    rng = np.random.default_rng(0)
    table = np.abs(rng.normal(size=(9, 6))) * np.array([50.0, 3.0, 80.0, 4.0, 10.0, 2.0])
    table[0] = 0.0  # a slot that saw nothing
    table[1, 2] = 0.0  # std clamped at 0
    ref = summary_to_figures(torch.from_numpy(table))
    got = {k: v.tolist() for k, v in summary_to_figures(table).items()}
    assert set(got) == set(ref)
    for key, values in got.items():
        np.testing.assert_allclose(values, ref[key].numpy(), rtol=1e-12, atol=0, err_msg=key)


def test_counts_of_2_pow_24_and_more_float32_values_are_exact() -> None:
    # float32 cannot hold 2**24 + 3: the counts are kept in float64 on every path
    n = 2**24 + 3
    x = torch.ones(n)
    x[5] = 0.0
    y = x.clone()
    y[7] = float("nan")
    for sync_free in (None, True):
        got = summarize(x, sync_free=sync_free).tolist()
        assert got[0] == n and got[4] == 1 and got[5] == 0, (sync_free, got)
        got = summarize(y, sync_free=sync_free).tolist()  # the masked path
        assert got[0] == n - 1 and got[4] == 1 and got[5] == 1, (sync_free, got)


def test_parameter_norms_with_mixed_dtypes() -> None:
    wide, half = nn.Linear(3, 2).double(), nn.Linear(3, 2).half()
    model = nn.Sequential(wide, half)
    collector = LayerStatsCollector(select_modules(model))
    collector.attach()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    collector.record_params()
    collector.record_updates()
    collector.detach()
    s = collector.finalize().scalars
    for name, p in model.named_parameters():
        assert s[f"param/norm/{name}"] == pytest.approx(p.double().norm().item(), rel=1e-6), name
        assert s[f"grad/norm/{name}"] == pytest.approx(math.sqrt(p.numel()), rel=1e-6), name


# ---------------------------------------------------------------------------------------------------- named fields
def test_layout_places_fields_by_name_reduced_ones_first() -> None:
    layout = Layout([("a.count", 3, "sum"), ("norms", 2, "local"), ("a.abs_max", 3, "max"), ("hist", (2, 4), "sum")])
    assert [f.name for f in layout.fields.values()] == ["a.count", "a.abs_max", "hist", "norms"]
    assert layout.size == 16 and layout.reduced_size == 14
    assert layout.fields["a.abs_max"].slice == slice(3, 6) and layout.fields["norms"].slice == slice(14, 16)
    assert layout.max_mask().tolist() == [False] * 3 + [True] * 3 + [False] * 8
    host = np.zeros(layout.size)
    views = layout.views(host)
    views["hist"][1] = [1.0, 2.0, 3.0, 4.0]  # views write through to the buffer
    views["norms"][:] = 7.0
    assert host[10:14].tolist() == [1.0, 2.0, 3.0, 4.0] and host[14:].tolist() == [7.0, 7.0]
    buffer = torch.from_numpy(host)
    assert layout.views(buffer)["hist"].shape == (2, 4) and set(layout.views(buffer)) == set(layout.fields)
    with pytest.raises(ValueError, match=r"field 'x' is declared twice"):
        Layout([("x", 1, "sum"), ("x", 2, "max")])
    with pytest.raises(ValueError, match=r"field 'x': the reduction must be one of sum, max, local, got 'mean'"):
        Layout([("x", 1, "mean")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"the buffer must have shape \(16,\)"):
        layout.views(np.zeros(3))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_accumulate_folds_rows_by_the_field_reduction(backend: str) -> None:
    from lightning_bn.stats._fields import accumulate

    index, values = [0, 2, 0, 2, 2], [1.0, 5.0, 3.0, 2.0, 4.0]
    for reduce, expected in (("sum", [4.0, 0.0, 11.0]), ("max", [3.0, 0.0, 5.0])):
        if backend == "numpy":
            view = np.zeros(3)
            accumulate(view, reduce, np.asarray(index), np.asarray(values))
            assert view.tolist() == expected
        else:
            t = torch.zeros(3, dtype=D)
            accumulate(t, reduce, torch.tensor(index), torch.tensor(values, dtype=torch.float32))
            assert t.tolist() == expected


def test_tensor_stats_are_the_moments_definitions() -> None:
    # the figures by name from the fields are those of moments.summary_to_figures on the same summaries
    assert tuple(f.name for f in TENSOR_FIELDS) == SUMMARY_FIELDS and ACTIVATION_STATS == tuple(summary_to_figures(
        np.zeros((1, 6))))
    rng = np.random.default_rng(1)
    table = np.abs(rng.normal(size=(7, 6))) * np.array([50.0, 3.0, 80.0, 4.0, 10.0, 2.0])
    table[0] = 0.0
    table[1, 2] = 0.0
    fields = {name: table[:, k] for k, name in enumerate(SUMMARY_FIELDS)}
    ref = summary_to_figures(table)
    for stat in TENSOR_STATS:
        np.testing.assert_allclose(stat.figure(fields), ref[stat.name], rtol=1e-12, atol=0, err_msg=stat.name)


def test_figures_are_a_pure_function_of_named_fields() -> None:
    from lightning_bn.stats._figures import FigureSpec, compute_figures, tensor_keys

    names = ("a", "b")
    spec = FigureSpec(names=names, keys={"act": tuple(tensor_keys("", "act", n) for n in names)}, order=(1, 0))
    fields = {f"act.{name}": np.asarray(v, dtype=np.float64) for name, v in {
        "count": [4.0, 0.0], "sum": [2.0, 0.0], "sum_sq": [5.0, 0.0], "abs_max": [2.0, 0.0], "zeros": [1.0, 0.0],
        "nonfinite": [0.0, 0.0]}.items()}
    stats = compute_figures(fields, spec)
    assert stats.order == ["b", "a"]
    assert stats.scalars == {"act/mean/a": 0.5, "act/std/a": pytest.approx(math.sqrt(5 / 4 - 0.25)),
                             "act/rms/a": pytest.approx(math.sqrt(5 / 4)), "act/abs_max/a": 2.0,
                             "act/frac_zero/a": 0.25, "act/frac_nonfinite/a": 0.0}  # "b" saw nothing: no keys


def test_a_statistic_added_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # One field with its measure and reduction, one figure from named fields: keys, layout, micro-batch and gradient
    # figures follow (a negative control first: without the entries there is no such key).
    import lightning_bn.stats._fields as fields_module

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 2)).to(D)
    x = torch.randn(8, 3, dtype=D)

    def collect(chunks: int) -> dict[str, float]:
        collector = LayerStatsCollector(select_modules(model))
        collector.attach()
        for part in x.chunk(chunks):
            model(part).pow(2).sum().backward()
        collector.detach()
        return collector.finalize().scalars

    assert not any("/frac_neg/" in k for k in collect(1))
    negatives = TensorField("negatives", "sum", measure=lambda t: (t < 0).sum())
    frac_neg = TensorStat("frac_neg", ("negatives", "count", "nonfinite"),
                          lambda f: f["negatives"] / np.maximum(f["count"] + f["nonfinite"], 1.0), gradients=True)
    monkeypatch.setattr(fields_module, "TENSOR_FIELDS", TENSOR_FIELDS + (negatives,))
    monkeypatch.setattr(fields_module, "TENSOR_STATS", TENSOR_STATS + (frac_neg,))
    one, four = collect(1), collect(4)
    h = model[0](x)
    h.retain_grad()
    out = model[2](model[1](h))
    out.pow(2).sum().backward()
    assert one["act/frac_neg/0"] == pytest.approx((h < 0).double().mean().item())
    assert one["act_in/frac_neg/1"] == one["act/frac_neg/0"]
    assert one["act_grad/frac_neg/0"] == pytest.approx((h.grad < 0).double().mean().item())
    assert one.keys() == four.keys()
    for key, value in one.items():
        assert four[key] == pytest.approx(value, rel=1e-10, abs=1e-14), key


def test_each_attach_starts_a_fresh_collection() -> None:
    net = _net()
    x1, x2 = torch.randn(4, 2, 4, 4, dtype=D), torch.randn(6, 2, 4, 4, dtype=D)
    reused = LayerStatsCollector(select_modules(net))
    reused.attach()
    net(x1).sum().backward()
    reused.detach()
    reused.finalize()
    net.zero_grad()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = LayerStatsCollector(select_modules(net))
    results = []
    for collector in (reused, fresh):
        net.load_state_dict(state)
        collector.attach()
        assert collector.forwards == 0 and collector.summaries == 0
        net(x2).sum().backward()
        collector.record_params()
        collector.detach()
        results.append(collector.finalize().scalars)
        net.zero_grad()
    assert results[0].keys() == results[1].keys()
    for key, value in results[1].items():
        assert results[0][key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
