"""SyncBatchNorm and the synchronized modes of BatchRenorm and GhostBatchNorm.

Two real processes over gloo against the same computation in one process on the union batch (float64, 1e-6);
single-process behaviour against torch's batch norm and gradcheck.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_bn.layers import (
    BatchNormChannelsLast,
    BatchRenorm,
    GhostBatchNorm,
    SyncBatchNorm,
    build_norm,
    is_batch_norm,
)
from lightning_bn.moments import all_reduce_sum, channel_moments, mean_var, shifted_channel_moments
from tests.dist import run_distributed

TOL = {"atol": 1e-6, "rtol": 1e-6}
C = 3
# (name, layout, shape of one sample)
LAYOUTS = [("1d", "channels_first", (C,)), ("2d", "channels_first", (C, 4, 5)), ("last", "channels_last", (6, C))]
SPLITS = [(4, 4), (3, 5), (0, 8)]  # samples on rank 0 and rank 1; the union batch is always 8
STEPS = 2


def _data(sample_shape: tuple[int, ...], n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *sample_shape, generator=g, dtype=torch.float64) * 2.0 + 1.5
    upstream = torch.randn(n, *sample_shape, generator=g, dtype=torch.float64)
    return x, upstream


def _init_affine(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        module.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        module.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))


def _run_steps(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    """STEPS training forwards/backwards of ``module`` on the same batch; returns outputs, gradients, buffers."""
    outs, xgrads = [], []
    for _ in range(STEPS):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        (out * upstream).sum().backward()
        outs.append(out.detach())
        xgrads.append(xi.grad)
    return {
        "out": outs,
        "xgrad": xgrads,
        "wgrad": module.weight.grad.clone(),
        "bgrad": module.bias.grad.clone(),
        "running_mean": module.running_mean.clone(),
        "running_var": module.running_var.clone(),
        "num_batches_tracked": int(module.num_batches_tracked),
    }


def _slice(rank: int, split: tuple[int, int]) -> slice:
    start = 0 if rank == 0 else split[0]
    return slice(start, start + split[rank])


def _renorm(layout: str) -> BatchRenorm:
    m = BatchRenorm(C, rmax=1.5, dmax=0.5, warmup_steps=0, layout=layout).double()
    _init_affine(m)
    with torch.no_grad():  # running statistics far enough from the batch's that r and d are clipped for some channels
        m.running_mean.copy_(torch.tensor([0.0, 1.5, 3.0], dtype=torch.float64))
        m.running_var.copy_(torch.tensor([1.0, 4.0, 20.0], dtype=torch.float64))
    return m


def _ghost(layout: str) -> GhostBatchNorm:
    m = GhostBatchNorm(C, virtual_batch_size=2, layout=layout).double()
    _init_affine(m)
    return m


def _sync_cases(rank: int, world_size: int) -> dict:
    results: dict = {}
    for name, layout, sample in LAYOUTS:
        x, upstream = _data(sample)
        for split in SPLITS:
            part = _slice(rank, split)
            bn = build_norm("sync_batch", C, layout=layout).double()
            _init_affine(bn)
            results[("sync", name, split)] = _run_steps(bn, x[part], upstream[part])
        # Batch renorm and ghost batch norm with synchronization switched on (as SyncNormPlugin does).
        renorm = _renorm(layout)
        renorm.sync_stats = True
        part = _slice(rank, (3, 5))
        results[("renorm", name)] = _run_steps(renorm, x[part], upstream[part])
        ghost = _ghost(layout)
        ghost.sync_stats = True
        part = _slice(rank, (4, 4))  # each process's batch a multiple of the virtual batch size
        results[("ghost", name)] = _run_steps(ghost, x[part], upstream[part])

    # momentum=None (cumulative average) and no affine parameters.
    x, _ = _data((C, 4))
    bn = SyncBatchNorm(C, momentum=None, affine=False).double()
    for _ in range(3):
        bn(x[_slice(rank, (3, 5))])
    results["cumulative"] = (bn.running_mean.clone(), bn.running_var.clone())

    # bfloat16 input: statistics accumulated in float32 from the bfloat16 values.
    x, _ = _data((C, 4, 5))
    bn = SyncBatchNorm(C)
    out = bn(x[_slice(rank, (3, 5))].to(torch.bfloat16))
    results["bf16"] = (out.dtype, out.float(), bn.running_mean.clone(), bn.running_var.clone())

    # Eval mode is plain batch norm with running statistics and calls no collective: only rank 0 runs it.
    if rank == 0:
        bn = SyncBatchNorm(C).double().eval()
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
            bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))
        results["eval"] = (bn(x), bn.running_mean.clone(), bn.running_var.clone())
    dist.barrier()

    # Process groups: the explicit world group synchronizes; a group of this process alone does not.
    world = dist.new_group([0, 1])
    alone = [dist.new_group([0]), dist.new_group([1])][rank]
    part = _slice(rank, (3, 5))
    for key, group in (("group_world", world), ("group_alone", alone)):
        bn = SyncBatchNorm(C, process_group=group).double()
        bn(x[part])
        results[key] = (bn.running_mean.clone(), bn.running_var.clone())

    # A global batch of one value per channel is an error on every process alike (nobody is left waiting).
    try:
        SyncBatchNorm(C).double()(torch.randn(rank ^ 1, C, dtype=torch.float64))
        results["one_value"] = None
    except ValueError as err:
        results["one_value"] = str(err)

    # float32 channels with |mean|/std = 1e4: the layer's statistics, and (negative control) the one-pass sums.
    x = _large_mean_data()[_slice(rank, (3, 5))]
    bn = SyncBatchNorm(C, momentum=1.0)
    results["large_mean"] = (bn(x).detach(), bn.running_mean.clone(), bn.running_var.clone())
    results["large_mean_one_pass"] = mean_var(all_reduce_sum(channel_moments(x, 1)), unbiased=True)[1]
    return results


def _large_mean_data() -> torch.Tensor:
    """float32 values with mean 1e4 and std 1 per channel (8 samples of (C, 4, 5))."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(8, C, 4, 5, generator=g, dtype=torch.float64) + 1e4).float()


def _reference(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> dict:
    return _run_steps(module, x, upstream)


def _plain_bn(name: str) -> nn.Module:
    """Plain batch norm (torch's kernel) with the same affine parameters, for the union batch in one process."""
    bn = {"1d": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "last": BatchNormChannelsLast}[name](C).double()
    _init_affine(bn)
    return bn


def _assert_matches(ranks: list[dict], ref: dict, split: tuple[int, int]) -> None:
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["out"][step] for r in ranks]), ref["out"][step], **TOL)
        torch.testing.assert_close(torch.cat([r["xgrad"][step] for r in ranks]), ref["xgrad"][step], **TOL)
    # Each process's parameter gradient is that of its own loss; their sum is the gradient of the union's loss.
    torch.testing.assert_close(ranks[0]["wgrad"] + ranks[1]["wgrad"], ref["wgrad"], **TOL)
    torch.testing.assert_close(ranks[0]["bgrad"] + ranks[1]["bgrad"], ref["bgrad"], **TOL)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], ref["running_mean"], **TOL)
        torch.testing.assert_close(r["running_var"], ref["running_var"], **TOL)
        assert r["num_batches_tracked"] == ref["num_batches_tracked"] == STEPS


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    return run_distributed(_sync_cases, 2, timeout=180)


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
@pytest.mark.parametrize("name,layout,sample", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_sync_equals_batch_norm_on_union(two_process_results, name, layout, sample, split) -> None:
    x, upstream = _data(sample)
    ref = _reference(_plain_bn(name), x, upstream)
    _assert_matches([r[("sync", name, split)] for r in two_process_results], ref, split)


@pytest.mark.parametrize("name,layout,sample", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_synchronized_batch_renorm_equals_union(two_process_results, name, layout, sample) -> None:
    x, upstream = _data(sample)
    ref = _reference(_renorm(layout), x, upstream)
    _assert_matches([r[("renorm", name)] for r in two_process_results], ref, (3, 5))
    # The reference really exercises the clipping: some r or d hit their bounds.
    ref_bn = _renorm(layout)
    cdim = 1 if layout == "channels_first" else x.dim() - 1
    dims = [d for d in range(x.dim()) if d != cdim]
    std = (x.var(dims, unbiased=False) + ref_bn.eps).sqrt()
    r = std / (ref_bn.running_var + ref_bn.eps).sqrt()
    assert bool(((r < 1 / 1.5) | (r > 1.5)).any())


@pytest.mark.parametrize("name,layout,sample", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_synchronized_ghost_batch_norm_equals_union(two_process_results, name, layout, sample) -> None:
    x, upstream = _data(sample)
    ref = _reference(_ghost(layout), x, upstream)
    _assert_matches([r[("ghost", name)] for r in two_process_results], ref, (4, 4))
    # Without synchronization the running statistics of the two processes differ (so the test above can fail).
    part0, part1 = _ghost(layout), _ghost(layout)
    part0(x[:4]), part1(x[4:])
    assert not torch.allclose(part0.running_mean, part1.running_mean)


def test_cumulative_average_without_affine(two_process_results) -> None:
    x, _ = _data((C, 4))
    ref = nn.BatchNorm1d(C, momentum=None, affine=False).double()
    for _ in range(3):
        ref(x)
    for r in two_process_results:
        torch.testing.assert_close(r["cumulative"][0], ref.running_mean, **TOL)
        torch.testing.assert_close(r["cumulative"][1], ref.running_var, **TOL)


def test_bfloat16_accumulates_in_float32(two_process_results) -> None:
    x, _ = _data((C, 4, 5))
    xb = x.to(torch.bfloat16).double()  # the values the processes saw
    ref = nn.BatchNorm2d(C).double()
    ref_out = ref(xb)
    for rank, r in enumerate(two_process_results):
        dtype, out, running_mean, running_var = r["bf16"]
        assert dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref_out[_slice(rank, (3, 5))], atol=2e-2, rtol=1e-2)
        # float32 accumulation: the statistics of the bfloat16 values to float32 precision, not bfloat16's.
        torch.testing.assert_close(running_mean.double(), ref.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(running_var.double(), ref.running_var, atol=1e-6, rtol=1e-6)


def test_eval_mode_is_plain_batch_norm_without_collective(two_process_results) -> None:
    out, running_mean, running_var = two_process_results[0]["eval"]
    x, _ = _data((C, 4, 5))
    expected = F.batch_norm(x, running_mean, running_var, torch.ones(C, dtype=torch.float64),
                            torch.zeros(C, dtype=torch.float64), False, 0.0, 1e-5)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(running_mean, torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))


def test_process_group_option(two_process_results) -> None:
    x, _ = _data((C, 4, 5))
    union = nn.BatchNorm2d(C).double()
    union(x)
    for rank, r in enumerate(two_process_results):
        torch.testing.assert_close(r["group_world"][0], union.running_mean, **TOL)
        torch.testing.assert_close(r["group_world"][1], union.running_var, **TOL)
        own = nn.BatchNorm2d(C).double()
        own(x[_slice(rank, (3, 5))])
        torch.testing.assert_close(r["group_alone"][0], own.running_mean, **TOL)
        torch.testing.assert_close(r["group_alone"][1], own.running_var, **TOL)


def test_global_batch_of_one_value_raises_everywhere(two_process_results) -> None:
    for r in two_process_results:
        assert r["one_value"] is not None and "more than 1 value per channel" in r["one_value"]
        assert "got 1" in r["one_value"]


def test_large_mean_keeps_the_variance(two_process_results) -> None:
    """float32 input with mean 1e4, std 1: the union's variance to ~1e-7 of the float64 reference (one-pass: 100%)."""
    x = _large_mean_data()
    ref = nn.BatchNorm2d(C, momentum=1.0).double()
    ref_out = ref(x.double())
    for rank, r in enumerate(two_process_results):
        out, running_mean, running_var = r["large_mean"]
        rel = ((running_var.double() - ref.running_var) / ref.running_var).abs().max()
        assert rel < 1e-3, rel
        torch.testing.assert_close(running_mean.double(), ref.running_mean, atol=1e-3, rtol=0)
        # The output is as good as float32 values of size 1e4 allow (their spacing is ~1e-3).
        torch.testing.assert_close(out.double(), ref_out[_slice(rank, (3, 5))], atol=5e-3, rtol=0)
        # Negative control: the same union through float32 sums of x and x**2 loses the variance.
        one_pass = r["large_mean_one_pass"]
        assert ((one_pass.double() - ref.running_var) / ref.running_var).abs().max() > 0.1


# ---- one process -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
def test_single_process_is_torch_batch_norm(momentum) -> None:
    x = torch.randn(6, C, 4, 4, dtype=torch.float64) + 2.0
    ours = SyncBatchNorm(C, momentum=momentum).double()
    ref = nn.BatchNorm2d(C, momentum=momentum).double()
    _init_affine(ours), _init_affine(ref)
    upstream = torch.randn_like(x)
    got, want = _run_steps(ours, x, upstream), _run_steps(ref, x, upstream)
    for key in ("out", "xgrad"):
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a, b, **TOL)
    for key in ("wgrad", "bgrad", "running_mean", "running_var"):
        torch.testing.assert_close(got[key], want[key], **TOL)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_single_process_channels_last_and_no_running_stats() -> None:
    x = torch.randn(4, 7, C, dtype=torch.float64)
    ours = SyncBatchNorm(C, track_running_stats=False, layout="channels_last").double()
    ref = nn.BatchNorm1d(C, track_running_stats=False).double()
    torch.testing.assert_close(ours(x), ref(x.reshape(-1, C)).reshape(x.shape), **TOL)
    ours.eval(), ref.eval()  # without running statistics eval uses the batch's
    torch.testing.assert_close(ours(x), ref(x.reshape(-1, C)).reshape(x.shape), **TOL)
    assert ours.running_mean is None


@pytest.mark.parametrize("layout,shape,cdim", [("channels_first", (5, C, 3), 1), ("channels_last", (5, 2, C), 2)])
def test_synchronized_formula_gradcheck(layout, shape, cdim) -> None:
    """The formula the processes run (moments -> mean/var -> scale/shift), checked by gradcheck and against torch."""
    bn = SyncBatchNorm(C, layout=layout).double()
    _init_affine(bn)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def fn(inp, weight, bias):
        bn._parameters["weight"], bn._parameters["bias"] = weight, bias  # tensors that carry the gradient
        return bn._synchronized_forward(inp, cdim, 0.0)

    w = bn.weight.detach().clone().requires_grad_(True)
    b = bn.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    flat = x.movedim(cdim, 1)
    expected = F.batch_norm(flat, None, None, w, b, True, 0.0, bn.eps).movedim(1, cdim)
    torch.testing.assert_close(fn(x, w, b), expected, **TOL)


def test_registry_and_errors() -> None:
    bn = build_norm("sync_batch", 8, layout="channels_last", momentum=0.2, eps=1e-3)
    assert isinstance(bn, SyncBatchNorm) and is_batch_norm(bn)
    assert (bn.layout, bn.momentum, bn.eps) == ("channels_last", 0.2, 1e-3)
    assert "layout=channels_last" in repr(bn)
    with pytest.raises(ValueError, match="does not take option"):
        build_norm("sync_batch", 8, num_groups=2)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        SyncBatchNorm(8, layout="nhwc")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, \*\).*got \(8,\)"):
        SyncBatchNorm(8)(torch.randn(8))
    with pytest.raises(ValueError, match=r"expected 8 channels in dimension 1.*got input of shape \(2, 4, 3\)"):
        SyncBatchNorm(8)(torch.randn(2, 4, 3))
    # Same state_dict keys as torch's batch norm, so checkpoints move between them.
    assert SyncBatchNorm(8).state_dict().keys() == nn.BatchNorm2d(8).state_dict().keys()


def test_sync_flags_off_keep_single_process_behaviour() -> None:
    """``sync_stats`` on without a process group changes nothing: the layers' own single-process computation."""
    x = torch.randn(8, C, 4, dtype=torch.float64)
    for make in (lambda: _renorm("channels_first"), lambda: _ghost("channels_first")):
        plain, flagged = make(), make()
        flagged.sync_stats = True
        torch.testing.assert_close(flagged(x), plain(x), atol=0, rtol=0)
        torch.testing.assert_close(flagged.running_var, plain.running_var, atol=0, rtol=0)


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_shifted_moments_keep_the_variance_of_a_large_mean(offset, layout) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, C, 8, 8, generator=g, dtype=torch.float64) + offset).float()
    ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    cdim = 1
    if layout == "channels_last":
        x, cdim = x.movedim(1, -1).contiguous(), -1
    moments = shifted_channel_moments(x, cdim)
    assert moments.dtype == torch.float64
    _, var = mean_var(moments)
    assert ((var - ref) / ref).abs().max() < 1e-6
    # Negative control: float32 sums of x and x**2 (the one-pass form) are off by 17% at 1e3 and by all of it at 1e4.
    _, one_pass = mean_var(channel_moments(x, cdim))
    assert ((one_pass.double() - ref) / ref).abs().max() > 0.1


def test_shifted_moments_are_the_plain_sums_with_their_gradient() -> None:
    x = torch.randn(5, C, 3, dtype=torch.float64, requires_grad=True) * 3 + 2
    torch.testing.assert_close(shifted_channel_moments(x, 1), channel_moments(x, 1), atol=1e-12, rtol=1e-12)
    leaf = x.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: shifted_channel_moments(t, 1), (leaf,))
    last = leaf.detach().movedim(1, -1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: shifted_channel_moments(t, -1), (last,))
    empty = shifted_channel_moments(torch.zeros(0, C, 4), 1)
    assert empty.shape == (3, C) and not empty.any()
    half = torch.randn(6, 4, C).half()
    expected = channel_moments(half, -1).double()
    torch.testing.assert_close(shifted_channel_moments(half, -1), expected, atol=1e-4, rtol=1e-5)


# ---- the fused (CUDA) path, run on the CPU with an emulation of torch's CUDA kernels ------------------------------


class EmulatedCudaKernels:
    """torch's CUDA batch-norm kernels for SyncBatchNorm written with CPU ops, after
    aten/src/ATen/native/cuda/Normalization.cuh: the same formulas (Welford statistics, ``InvStd``, the merge of
    ``batch_norm_reduce_statistics_kernel`` with its integer running count, so a leading zero count gives NaN as on
    the GPU) and the dtype contracts the CUDA code assumes, asserted. Lets the fused path's own logic (gathers,
    ordering, counts, the backward all-reduce, layouts, empty batches) run on a machine without a GPU; the real
    kernels are checked in tests/test_cuda.py."""

    calls: dict[str, int] = {}

    @classmethod
    def _count(cls, name: str) -> None:
        cls.calls[name] = cls.calls.get(name, 0) + 1

    @staticmethod
    def _acc(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @staticmethod
    def _planes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).to(dtype)  # (N, C, L), as the kernels index it

    @classmethod
    def _check_param(cls, input: torch.Tensor, weight: torch.Tensor | None) -> None:
        if weight is not None:
            mixed = input.dtype in (torch.float16, torch.bfloat16) and weight.dtype == torch.float32
            assert weight.dtype == input.dtype or mixed, (input.dtype, weight.dtype)

    @classmethod
    def batch_norm_stats(cls, input, eps):
        cls._count("stats")
        assert input.numel() > 0
        x = cls._planes(input, cls._acc(input.dtype))
        mean, var = x.mean((0, 2)), x.var((0, 2), correction=0)
        invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), 1.0 / torch.sqrt(var + eps))
        return mean, invstd

    @classmethod
    def batch_norm_gather_stats_with_counts(cls, input, mean, invstd, running_mean, running_var, momentum, eps, counts):
        cls._count("gather")
        scalar = running_mean.dtype if running_mean is not None else input.dtype
        acc = cls._acc(scalar)
        assert mean.dim() == 2 and invstd.shape == mean.shape and counts.numel() >= mean.shape[0]
        assert mean.dtype == invstd.dtype == acc and counts.dtype == scalar, (mean.dtype, counts.dtype, scalar)
        avg = torch.zeros(mean.shape[1], dtype=acc)
        var_n = torch.zeros_like(avg)
        n = 0
        for j in range(mean.shape[0]):
            count = counts[j].to(acc)
            m = mean[j]
            v = ((1.0 / invstd[j]) ** 2 - eps) * count
            factor = 1.0 / (n + count)
            var_n = var_n + v + (avg - m) * (avg - m) * n * count * factor
            avg = n * factor * avg + count * factor * m
            n += int(count)
        if running_mean is not None:
            running_mean.copy_(((1 - momentum) * running_mean + momentum * avg).to(scalar))
        if running_var is not None:
            running_var.copy_(((1 - momentum) * running_var + momentum * var_n / (n - 1)).to(scalar))
        return avg, 1.0 / torch.sqrt(var_n / n + eps)

    @classmethod
    def batch_norm_elemt(cls, input, weight, bias, mean, invstd, eps):
        cls._count("elemt")
        cls._check_param(input, weight)
        x = cls._planes(input, mean.dtype)
        out = (x - mean[:, None]) * invstd[:, None]
        if weight is not None:
            out = out * weight.to(mean.dtype)[:, None] + bias.to(mean.dtype)[:, None]
        return out.to(input.dtype).reshape(input.shape)

    @classmethod
    def batch_norm_backward_reduce(cls, grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g):
        cls._count("backward_reduce")
        cls._check_param(input, weight)
        assert mean.dtype == invstd.dtype and grad_output.shape == input.shape
        assert weight is not None or not (weight_g or bias_g)  # the kernels size those from the weight
        g, x = cls._planes(grad_output, mean.dtype), cls._planes(input, mean.dtype)
        sum_dy = g.sum((0, 2))
        sum_dy_xmu = (g * (x - mean[:, None])).sum((0, 2))
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None
        grad_bias = sum_dy.to(weight.dtype) if bias_g else None
        return (sum_dy if input_g else None), (sum_dy_xmu if input_g else None), grad_weight, grad_bias

    @classmethod
    def batch_norm_backward_elemt(cls, grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        cls._count("backward_elemt")
        assert count.dtype == torch.int32 and mean.dtype == invstd.dtype
        if weight is not None:  # read in the statistics' dtype
            assert weight.dtype == mean.dtype, (weight.dtype, mean.dtype)
        div = count.sum().to(mean.dtype)
        g, x = cls._planes(grad_output, mean.dtype), cls._planes(input, mean.dtype)
        factor_2 = invstd if weight is None else weight * invstd
        factor_1 = invstd * invstd * sum_dy_xmu / div
        grad = (g - (sum_dy / div)[:, None] - (x - mean[:, None]) * factor_1[:, None]) * factor_2[:, None]
        return grad.to(input.dtype).reshape(input.shape)


def _use_emulated_kernels() -> None:
    from lightning_bn.layers import _sync

    _sync._FUSED_DEVICE_TYPES = ("cpu",)
    _sync._kernels = EmulatedCudaKernels


def _fused_cases(rank: int, world_size: int) -> dict:
    _use_emulated_kernels()
    results: dict = {}
    for name, layout, sample in LAYOUTS:
        x, upstream = _data(sample)
        for split in SPLITS:
            part = _slice(rank, split)
            bn = build_norm("sync_batch", C, layout=layout).double()
            _init_affine(bn)
            results[("sync", name, split)] = _run_steps(bn, x[part], upstream[part])
    x, upstream = _data((C, 4, 5))
    part = _slice(rank, (3, 5))
    # channels-last memory format of a channels-first input, as the kernels take it
    bn = SyncBatchNorm(C).double()
    _init_affine(bn)
    results["nhwc"] = _run_steps(bn, x[part].contiguous(memory_format=torch.channels_last), upstream[part])
    # cumulative average without affine parameters
    bn = SyncBatchNorm(C, momentum=None, affine=False).double()
    for _ in range(3):
        bn(x[part])
    results["cumulative"] = (bn.running_mean.clone(), bn.running_var.clone())
    # bfloat16 input with float32 parameters ("mixed"), and all in bfloat16
    for key, module_dtype in (("bf16_mixed", torch.float32), ("bf16", torch.bfloat16)):
        bn = SyncBatchNorm(C).to(module_dtype)
        xb = x[part].to(torch.bfloat16).requires_grad_(True)
        out = bn(xb)
        (out.float() * upstream[part].float()).sum().backward()
        stats = (bn.running_mean.float(), bn.running_var.float())
        results[key] = (out.dtype, out.detach().float(), xb.grad.float(), *stats)
    # a global batch of one value per channel
    try:
        SyncBatchNorm(C).double()(torch.randn(rank ^ 1, C, dtype=torch.float64))
        results["one_value"] = None
    except ValueError as err:
        results["one_value"] = str(err)
    results["calls"] = dict(EmulatedCudaKernels.calls)
    return results


@pytest.fixture(scope="module")
def fused_results() -> list[dict]:
    return run_distributed(_fused_cases, 2, timeout=180)


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
@pytest.mark.parametrize("name,layout,sample", LAYOUTS, ids=[n for n, _, _ in LAYOUTS])
def test_fused_path_equals_batch_norm_on_union(fused_results, name, layout, sample, split) -> None:
    x, upstream = _data(sample)
    ref = _reference(_plain_bn(name), x, upstream)
    _assert_matches([r[("sync", name, split)] for r in fused_results], ref, split)


def test_fused_path_took_the_kernels(fused_results) -> None:
    for r in fused_results:
        assert {"gather", "elemt", "backward_elemt"} <= r["calls"].keys()
    # rank 0 had an empty batch in the 0+8 splits: it computed no local statistics there
    assert fused_results[0]["calls"]["stats"] < fused_results[1]["calls"]["stats"]


def test_fused_path_memory_format_cumulative_and_bfloat16(fused_results) -> None:
    x, upstream = _data((C, 4, 5))
    ref = _reference(_plain_bn("2d"), x, upstream)
    _assert_matches([r["nhwc"] for r in fused_results], ref, (3, 5))
    cumulative = nn.BatchNorm2d(C, momentum=None, affine=False).double()
    for _ in range(3):
        cumulative(x)
    xb = x.to(torch.bfloat16).double().requires_grad_(True)
    bf_ref = nn.BatchNorm2d(C).double()
    bf_out = bf_ref(xb)
    (bf_out * upstream).sum().backward()
    for rank, r in enumerate(fused_results):
        torch.testing.assert_close(r["cumulative"][0], cumulative.running_mean, **TOL)
        torch.testing.assert_close(r["cumulative"][1], cumulative.running_var, **TOL)
        for key in ("bf16_mixed", "bf16"):
            dtype, out, xgrad, running_mean, running_var = r[key]
            assert dtype == torch.bfloat16
            torch.testing.assert_close(out.double(), bf_out[_slice(rank, (3, 5))].detach(), atol=3e-2, rtol=1e-2)
            torch.testing.assert_close(xgrad.double(), xb.grad[_slice(rank, (3, 5))], atol=3e-2, rtol=2e-2)
            tol = {"atol": 1e-6, "rtol": 1e-6} if key == "bf16_mixed" else {"atol": 2e-2, "rtol": 1e-2}
            torch.testing.assert_close(running_mean.double(), bf_ref.running_mean, **tol)
            torch.testing.assert_close(running_var.double(), bf_ref.running_var, **tol)
        assert r["one_value"] is not None and "got 1" in r["one_value"]


def test_merge_needs_a_non_empty_first_row() -> None:
    """Why the fused path sorts the gathered rows: the kernel's merge gives NaN when the first count is 0."""
    mean = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    invstd = torch.ones(2, C)
    buffers = (torch.zeros(C), torch.zeros(C))
    out, _ = EmulatedCudaKernels.batch_norm_gather_stats_with_counts(
        torch.empty(0), mean, invstd, *buffers, 1.0, 1e-5, torch.tensor([0.0, 4.0])
    )
    assert out.isnan().all()
    out, _ = EmulatedCudaKernels.batch_norm_gather_stats_with_counts(
        torch.empty(0), mean.flip(0), invstd, *buffers, 1.0, 1e-5, torch.tensor([4.0, 0.0])
    )
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0]))
