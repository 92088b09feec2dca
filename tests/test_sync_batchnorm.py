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
    return results


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
