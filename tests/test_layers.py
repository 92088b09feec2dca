"""Normalization layers and the registry: each layer against its reference formula and torch's layer where one
exists, ``gradcheck`` in float64 for every layer we wrote, the registry's errors, and bfloat16 on CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from lightning_bn.layers import (
    BatchNormChannelsLast,
    BatchNormNd,
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    GroupNormChannelsLast,
    InstanceNormChannelsLast,
    InstanceNormNd,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
    available_norms,
    build_norm,
    default_num_groups,
    is_batch_norm,
    register_norm,
    tracks_running_stats,
    unregister_norm,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only contends with other processes on a shared 2-core machine
    (gradcheck went from 0.1 s to 10 s under load). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# reference formulas and helpers


def _along(t: Tensor, x: Tensor, cdim: int) -> Tensor:
    """``t`` of shape (C,) shaped to broadcast against ``x`` along dimension ``cdim``."""
    shape = [1] * x.dim()
    shape[cdim] = -1
    return t.reshape(shape)


def _reduce_dims(x: Tensor, cdim: int) -> list[int]:
    cdim = cdim % x.dim()
    return [d for d in range(x.dim()) if d != cdim]


def batch_norm_formula(x: Tensor, cdim: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with biased batch statistics per channel."""
    dims = _reduce_dims(x, cdim)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    y = (x - mean) / (var + eps).sqrt()
    if weight is not None:
        y = y * _along(weight, x, cdim) + _along(bias, x, cdim)
    return y


def running_formula(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor, cdim: int,
                    eps: float) -> Tensor:
    y = (x - _along(running_mean, x, cdim)) / _along((running_var + eps).sqrt(), x, cdim)
    return y * _along(weight, x, cdim) + _along(bias, x, cdim)


def batch_moments(x: Tensor, cdim: int) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and unbiased variance (what torch's running statistics average)."""
    dims = _reduce_dims(x, cdim)
    return x.mean(dims), x.var(dims, unbiased=True)


def randomize_affine(module: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if p.dim() else 0.0))
    return module


def forward_backward(module: nn.Module, x: Tensor, upstream: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Output, input gradient and parameter gradients for the loss ``sum(out * upstream)``."""
    x = x.detach().clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    out = module(x)
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def assert_gradcheck(module: nn.Module, x: Tensor) -> None:
    """``gradcheck`` over the input and every trainable parameter, with fresh buffers on every call.

    Each call gets clones of the buffers, so running statistics updated by one evaluation do not leak into the next
    one and the function gradcheck sees is a pure function of its inputs.
    """
    module = module.double()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in module.named_buffers()}

    def fn(inp: Tensor, *params: Tensor) -> Tensor:
        state = {n: b.clone() for n, b in buffers.items()}
        state.update(fixed)
        state.update(dict(zip(names, params)))
        return torch.func.functional_call(module, state, (inp,))

    inputs = (x.detach().to(F64).requires_grad_(True),
              *(dict(module.named_parameters())[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# BatchRenorm


def test_batch_renorm_with_unit_bounds_is_batch_norm() -> None:
    torch.manual_seed(0)
    renorm = randomize_affine(BatchRenorm(3, momentum=0.2, rmax=1.0, dmax=0.0, warmup_steps=0).double())
    bn = nn.BatchNorm2d(3, momentum=0.2).double()
    bn.load_state_dict(renorm.state_dict())
    for step in range(3):
        x = torch.randn(5, 3, 4, 2, dtype=F64) * (step + 1) + step
        upstream = torch.randn(5, 3, 4, 2, dtype=F64)
        out_r, gx_r, gp_r = forward_backward(renorm, x, upstream)
        out_b, gx_b, gp_b = forward_backward(bn, x, upstream)
        torch.testing.assert_close(out_r, out_b)
        torch.testing.assert_close(gx_r, gx_b)
        torch.testing.assert_close(gp_r, gp_b)
        torch.testing.assert_close(renorm.running_mean, bn.running_mean)
        torch.testing.assert_close(renorm.running_var, bn.running_var)
        assert int(renorm.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1


def _renorm_reference(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor,
                      rmax: float, dmax: float, eps: float, detach_rd: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Ioffe (2017), Algorithm 1, channels-first: returns the output, r and d."""
    dims = _reduce_dims(x, 1)
    mu_b = x.mean(dims)
    sigma_b = (x.var(dims, unbiased=False) + eps).sqrt()
    sigma = (running_var + eps).sqrt()
    r = torch.clamp(sigma_b / sigma, 1.0 / rmax, rmax)
    d = torch.clamp((mu_b - running_mean) / sigma, -dmax, dmax)
    if detach_rd:  # "stop_gradient": r and d are constants in the backward pass
        r, d = r.detach(), d.detach()
    x_hat = (x - _along(mu_b, x, 1)) / _along(sigma_b, x, 1) * _along(r, x, 1) + _along(d, x, 1)
    return x_hat * _along(weight, x, 1) + _along(bias, x, 1), r.detach(), d.detach()


def test_batch_renorm_matches_the_paper_formula_with_clipping_and_constant_r_d() -> None:
    torch.manual_seed(1)
    # rmax=3, dmax=5 with 2 of 4 warm-up batches done: the bounds in force are rmax=2, dmax=2.5.
    renorm = randomize_affine(BatchRenorm(4, eps=1e-3, momentum=0.1, rmax=3.0, dmax=5.0, warmup_steps=4).double())
    running_mean = torch.tensor([-6.0, 0.3, 6.0, 1.0], dtype=F64)
    running_var = torch.tensor([0.04, 1.5, 25.0, 0.7], dtype=F64)
    with torch.no_grad():
        renorm.running_mean.copy_(running_mean)
        renorm.running_var.copy_(running_var)
        renorm.num_batches_tracked.fill_(2)
    assert renorm.current_bounds() == (2.0, 2.5)
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    upstream = torch.randn_like(x)

    out, gx, gp = forward_backward(renorm, x, upstream)

    xr = x.clone().requires_grad_(True)
    weight = renorm.weight.detach().clone().requires_grad_(True)
    bias = renorm.bias.detach().clone().requires_grad_(True)
    ref, r, d = _renorm_reference(xr, running_mean, running_var, weight, bias, 2.0, 2.5, 1e-3)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gp["weight"], weight.grad)
    torch.testing.assert_close(gp["bias"], bias.grad)

    # The data exercise both sides of both clips, so the test tells renorm from batch norm and from no clipping.
    clipped_r = (r == 2.0) | (r == 0.5)
    clipped_d = d.abs() == 2.5
    assert clipped_r.any() and (~clipped_r).any(), r
    assert clipped_d.any() and (~clipped_d).any(), d
    assert not torch.allclose(out, batch_norm_formula(x, 1, renorm.weight.detach(), renorm.bias.detach(), 1e-3))
    # Treating r and d as constants matters: the full derivative through r and d is a different gradient.
    xf = x.clone().requires_grad_(True)
    full, _, _ = _renorm_reference(xf, running_mean, running_var, weight.detach(), bias.detach(), 2.0, 2.5, 1e-3,
                                   detach_rd=False)
    (full * upstream).sum().backward()
    assert not torch.allclose(gx, xf.grad)

    # Running statistics: torch's rule with the batch mean and the unbiased batch variance.
    mean_b, var_b = batch_moments(x, 1)
    torch.testing.assert_close(renorm.running_mean, 0.9 * running_mean + 0.1 * mean_b)
    torch.testing.assert_close(renorm.running_var, 0.9 * running_var + 0.1 * var_b)
    assert int(renorm.num_batches_tracked) == 3


def test_batch_renorm_warmup_schedule() -> None:
    renorm = BatchRenorm(2, rmax=3.0, dmax=5.0, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(renorm.current_bounds())
        renorm(torch.randn(4, 2, 3))
    assert seen == [(1.0, 0.0), (1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0)]
    renorm.eval()
    renorm(torch.randn(4, 2, 3))  # eval does not advance the schedule
    assert renorm.current_bounds() == (3.0, 5.0) and int(renorm.num_batches_tracked) == 6
    assert BatchRenorm(2, rmax=3.0, dmax=5.0, warmup_steps=0).current_bounds() == (3.0, 5.0)


def test_batch_renorm_eval_is_batch_norm_with_running_stats() -> None:
    torch.manual_seed(2)
    renorm = randomize_affine(BatchRenorm(3, warmup_steps=0).double())
    with torch.no_grad():
        renorm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        renorm.running_var.copy_(torch.tensor([0.3, 2.0, 4.0]))
    before = copy.deepcopy(renorm.state_dict())
    renorm.eval()
    x = torch.randn(4, 3, 5, dtype=F64)
    expected = running_formula(x, renorm.running_mean, renorm.running_var, renorm.weight, renorm.bias, 1, renorm.eps)
    torch.testing.assert_close(renorm(x), expected)
    torch.testing.assert_close(renorm.state_dict(), before)


@pytest.mark.parametrize("training", [True, False])
def test_batch_renorm_channels_last_equals_channels_first_on_permuted_input(training: bool) -> None:
    torch.manual_seed(3)
    first = randomize_affine(BatchRenorm(3, rmax=2.0, dmax=0.5, warmup_steps=0).double())
    with torch.no_grad():
        first.running_mean.copy_(torch.tensor([2.0, 0.0, -2.0]))
        first.running_var.copy_(torch.tensor([0.1, 1.0, 9.0]))
    last = BatchRenorm(3, rmax=2.0, dmax=0.5, warmup_steps=0, layout="channels_last").double()
    last.load_state_dict(first.state_dict())
    first.train(training)
    last.train(training)
    x = torch.randn(4, 3, 2, 5, dtype=F64)
    upstream = torch.randn_like(x)
    out_f, gx_f, gp_f = forward_backward(first, x, upstream)
    out_l, gx_l, gp_l = forward_backward(last, x.permute(0, 2, 3, 1), upstream.permute(0, 2, 3, 1))
    torch.testing.assert_close(out_l, out_f.permute(0, 2, 3, 1))
    torch.testing.assert_close(gx_l, gx_f.permute(0, 2, 3, 1))
    torch.testing.assert_close(gp_l, gp_f)
    torch.testing.assert_close(last.state_dict(), first.state_dict())


def test_batch_renorm_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match=r"`rmax` must be >= 1, got 0.5"):
        BatchRenorm(3, rmax=0.5)
    with pytest.raises(ValueError, match=r"`dmax` must be >= 0, got -1"):
        BatchRenorm(3, dmax=-1.0)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be >= 0, got -2"):
        BatchRenorm(3, warmup_steps=-2)
    with pytest.raises(ValueError, match=r"`layout` must be one of channels_first, channels_last, got 'nhwc'"):
        BatchRenorm(3, layout="nhwc")


# ----------------------------------------------------------------------------------------------------------------
# GhostBatchNorm


def test_ghost_batch_norm_with_whole_batch_is_batch_norm() -> None:
    torch.manual_seed(4)
    ghost = randomize_affine(GhostBatchNorm(3, virtual_batch_size=8).double())
    bn = nn.BatchNorm2d(3).double()
    bn.load_state_dict(ghost.state_dict())
    for n in (8, 5):  # a virtual batch as large as the batch, then larger than it
        x = torch.randn(n, 3, 2, 3, dtype=F64) * 2 + 1
        upstream = torch.randn_like(x)
        out_g, gx_g, gp_g = forward_backward(ghost, x, upstream)
        out_b, gx_b, gp_b = forward_backward(bn, x, upstream)
        torch.testing.assert_close(out_g, out_b)
        torch.testing.assert_close(gx_g, gx_b)
        torch.testing.assert_close(gp_g, gp_b)
        torch.testing.assert_close(ghost.state_dict(), bn.state_dict())
    ghost.eval()
    bn.eval()
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(ghost(x), bn(x))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_ghost_batch_norm_is_per_chunk_batch_norm(layout: str) -> None:
    torch.manual_seed(5)
    cdim = 1 if layout == "channels_first" else -1
    ghost = randomize_affine(GhostBatchNorm(3, virtual_batch_size=4, momentum=0.3, layout=layout).double())
    x = torch.randn(10, 3, 5, dtype=F64) if layout == "channels_first" else torch.randn(10, 5, 3, dtype=F64)
    x = x + torch.arange(10, dtype=F64).reshape(10, 1, 1)  # chunks differ, so per-chunk is not whole-batch
    upstream = torch.randn_like(x)
    out, gx, gp = forward_backward(ghost, x, upstream)

    xr = x.clone().requires_grad_(True)
    weight = ghost.weight.detach().clone().requires_grad_(True)
    bias = ghost.bias.detach().clone().requires_grad_(True)
    chunks = [xr[0:4], xr[4:8], xr[8:10]]  # the last virtual batch is smaller
    ref = torch.cat([batch_norm_formula(c, cdim, weight, bias, ghost.eps) for c in chunks])
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gp["weight"], weight.grad)
    torch.testing.assert_close(gp["bias"], bias.grad)
    assert not torch.allclose(out, batch_norm_formula(x, cdim, weight.detach(), bias.detach(), ghost.eps))

    moments = [batch_moments(c.detach(), cdim) for c in chunks]
    mean = torch.stack([m for m, _ in moments]).mean(0)
    var = torch.stack([v for _, v in moments]).mean(0)
    torch.testing.assert_close(ghost.running_mean, 0.3 * mean)
    torch.testing.assert_close(ghost.running_var, 0.7 * torch.ones(3, dtype=F64) + 0.3 * var)
    assert int(ghost.num_batches_tracked) == 1


def test_ghost_batch_norm_cumulative_average_with_momentum_none() -> None:
    torch.manual_seed(6)
    ghost = GhostBatchNorm(2, virtual_batch_size=3, momentum=None).double()
    means, vars_ = [], []
    for step in range(3):
        x = torch.randn(7, 2, 4, dtype=F64) * (step + 1) + 3 * step
        ghost(x)
        moments = [batch_moments(c, 1) for c in x.split(3)]
        means.append(torch.stack([m for m, _ in moments]).mean(0))
        vars_.append(torch.stack([v for _, v in moments]).mean(0))
    torch.testing.assert_close(ghost.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack(vars_).mean(0))
    assert int(ghost.num_batches_tracked) == 3


def test_ghost_batch_norm_state_dict_is_batch_norms() -> None:
    ghost = GhostBatchNorm(6, virtual_batch_size=2)
    bn = randomize_affine(nn.BatchNorm2d(6))
    bn(torch.randn(4, 6, 3, 3))
    assert list(ghost.state_dict()) == list(bn.state_dict())
    ghost.load_state_dict(bn.state_dict())
    torch.testing.assert_close(ghost.state_dict(), bn.state_dict())
    with pytest.raises(ValueError, match=r"`virtual_batch_size` must be a positive int, got 0"):
        GhostBatchNorm(6, virtual_batch_size=0)


# ----------------------------------------------------------------------------------------------------------------
# FrozenBatchNorm


def _trained_bn(cls: type[nn.Module], channels: int, shape: tuple[int, ...]) -> nn.Module:
    bn = randomize_affine(cls(channels).double())
    for step in range(2):
        bn(torch.randn(*shape, dtype=F64) * (step + 2) + step)
    return bn.eval()


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(nn.BatchNorm1d, (5, 3)), (nn.BatchNorm1d, (5, 3, 4)), (nn.BatchNorm2d, (5, 3, 2, 4)),
     (nn.BatchNorm3d, (5, 3, 2, 2, 3))],
)
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_frozen_batch_norm_equals_batch_norm_in_eval(cls: type[nn.Module], shape: tuple[int, ...],
                                                     layout: str) -> None:
    torch.manual_seed(7)
    bn = _trained_bn(cls, 3, shape)
    frozen = FrozenBatchNorm(3, layout=layout).double()
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(*shape, dtype=F64)
    expected = bn(x)
    if layout == "channels_last":
        torch.testing.assert_close(frozen(x.movedim(1, -1)), expected.movedim(1, -1))
    else:
        torch.testing.assert_close(frozen(x), expected)


def test_frozen_batch_norm_statistics_never_change_in_train_mode() -> None:
    torch.manual_seed(8)
    bn = _trained_bn(nn.BatchNorm2d, 3, (4, 3, 2, 2))
    frozen = FrozenBatchNorm(3, trainable_affine=True).double()
    frozen.load_state_dict(bn.state_dict())
    before = copy.deepcopy(frozen.state_dict())
    frozen.train()
    x = torch.randn(6, 3, 3, 3, dtype=F64) * 5 + 2
    for _ in range(3):
        torch.testing.assert_close(frozen(x), bn(x))
    torch.testing.assert_close(frozen.state_dict(), before)
    assert not is_batch_norm(frozen) and not tracks_running_stats(frozen)


@pytest.mark.parametrize("trainable_affine", [False, True])
def test_frozen_batch_norm_trainable_affine(trainable_affine: bool) -> None:
    torch.manual_seed(9)
    bn = _trained_bn(nn.BatchNorm2d, 3, (4, 3, 2, 2))
    frozen = FrozenBatchNorm(3, trainable_affine=trainable_affine).double()
    frozen.load_state_dict(bn.state_dict())
    assert frozen.weight.requires_grad is trainable_affine and frozen.bias.requires_grad is trainable_affine
    assert f"trainable_affine={trainable_affine}" in repr(frozen)
    x = torch.randn(4, 3, 2, 2, dtype=F64)
    upstream = torch.randn_like(x)
    out_f, gx_f, gp_f = forward_backward(frozen, x, upstream)
    out_b, gx_b, gp_b = forward_backward(bn, x, upstream)
    torch.testing.assert_close(out_f, out_b)
    torch.testing.assert_close(gx_f, gx_b)
    if trainable_affine:
        torch.testing.assert_close(gp_f, gp_b)
    else:
        assert gp_f == {}


def test_frozen_batch_norm_loads_state_dict_without_counter() -> None:
    torch.manual_seed(10)
    source = FrozenBatchNorm(4)
    with torch.no_grad():
        source.running_mean.normal_()
        source.running_var.uniform_(0.5, 2.0)
        source.weight.normal_()
        source.bias.normal_()
    state = {k: v for k, v in source.state_dict().items() if k != "num_batches_tracked"}
    keys = set(state)
    frozen = FrozenBatchNorm(4)
    frozen.load_state_dict(state, strict=True)
    assert set(state) == keys  # the caller's dict is left as it was
    torch.testing.assert_close(frozen.running_mean, source.running_mean)
    torch.testing.assert_close(frozen.running_var, source.running_var)
    torch.testing.assert_close(frozen.weight, source.weight)
    assert int(frozen.num_batches_tracked) == 0
    # Nested in a model, under a prefix, as a checkpoint of another library would be.
    model = nn.Sequential(nn.Identity(), FrozenBatchNorm(4))
    model.load_state_dict({f"1.{k}": v for k, v in state.items()}, strict=True)
    torch.testing.assert_close(model[1].running_var, source.running_var)


# ----------------------------------------------------------------------------------------------------------------
# BatchNormChannelsLast and BatchNormNd


def test_batch_norm_channels_last_equals_batch_norm_1d_on_flattened_tokens() -> None:
    torch.manual_seed(11)
    tokens = randomize_affine(BatchNormChannelsLast(4, momentum=0.25).double())
    flat = nn.BatchNorm1d(4, momentum=0.25).double()
    flat.load_state_dict(tokens.state_dict())
    for step in range(2):
        x = torch.randn(3, 5, 4, dtype=F64) * (step + 1) - step  # (B, T, C)
        upstream = torch.randn_like(x)
        out_t, gx_t, gp_t = forward_backward(tokens, x, upstream)
        out_f, gx_f, gp_f = forward_backward(flat, x.reshape(15, 4), upstream.reshape(15, 4))
        torch.testing.assert_close(out_t, out_f.reshape(3, 5, 4))
        torch.testing.assert_close(gx_t, gx_f.reshape(3, 5, 4))
        torch.testing.assert_close(gp_t, gp_f)
        torch.testing.assert_close(tokens.state_dict(), flat.state_dict())
    tokens.eval()
    flat.eval()
    x = torch.randn(2, 3, 2, 4, dtype=F64)  # (B, H, W, C): any number of positions
    torch.testing.assert_close(tokens(x), flat(x.reshape(12, 4)).reshape(2, 3, 2, 4))


@pytest.mark.parametrize(
    ("shape", "cls"),
    [((4, 3, 2, 5), nn.BatchNorm2d), ((4, 3, 2, 2, 3), nn.BatchNorm3d), ((3, 3, 2, 2, 2, 2), nn.BatchNorm3d)],
)
def test_batch_norm_nd_equals_torch_batch_norm(shape: tuple[int, ...], cls: type[nn.Module]) -> None:
    torch.manual_seed(12)
    nd = randomize_affine(BatchNormNd(3).double())
    ref = cls(3).double()
    ref.load_state_dict(nd.state_dict())
    to_ref = (*shape[:4], -1) if len(shape) > 5 else shape  # 4 spatial dims: same statistics as 3 of them
    x = torch.randn(*shape, dtype=F64) * 3 + 1
    upstream = torch.randn_like(x)
    out_n, gx_n, gp_n = forward_backward(nd, x, upstream)
    out_r, gx_r, gp_r = forward_backward(ref, x.reshape(to_ref), upstream.reshape(to_ref))
    torch.testing.assert_close(out_n, out_r.reshape(shape))
    torch.testing.assert_close(gx_n, gx_r.reshape(shape))
    torch.testing.assert_close(gp_n, gp_r)
    torch.testing.assert_close(nd.state_dict(), ref.state_dict())
    nd.eval()
    ref.eval()
    torch.testing.assert_close(nd(x), ref(x.reshape(to_ref)).reshape(shape))


# ----------------------------------------------------------------------------------------------------------------
# channel layers: layer, RMS, group and instance norm in the other layout


def test_layer_norm_channels_first() -> None:
    torch.manual_seed(13)
    ln = randomize_affine(LayerNormChannelsFirst(4, eps=1e-4).double())
    x = torch.randn(2, 4, 3, 5, dtype=F64) * 2 + 1
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / (var + 1e-4).sqrt() * ln.weight.view(1, 4, 1, 1) + ln.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(ln(x), expected)
    torch_ln = nn.LayerNorm(4, eps=1e-4).double()
    torch_ln.load_state_dict(ln.state_dict())
    upstream = torch.randn_like(x)
    out, gx, gp = forward_backward(ln, x, upstream)
    out_t, gx_t, gp_t = forward_backward(torch_ln, x.movedim(1, -1), upstream.movedim(1, -1))
    torch.testing.assert_close(out, out_t.movedim(-1, 1))
    torch.testing.assert_close(gx, gx_t.movedim(-1, 1))
    torch.testing.assert_close(gp, gp_t)


def test_rms_norm_channels_first() -> None:
    torch.manual_seed(14)
    rms = randomize_affine(RMSNormChannelsFirst(4, eps=1e-4).double())
    x = torch.randn(2, 4, 3, 5, dtype=F64) * 2 + 1
    expected = x / (x.pow(2).mean(1, keepdim=True) + 1e-4).sqrt() * rms.weight.view(1, 4, 1, 1)
    torch.testing.assert_close(rms(x), expected)
    torch_rms = nn.RMSNorm(4, eps=1e-4).double()
    torch_rms.load_state_dict(rms.state_dict())
    upstream = torch.randn_like(x)
    out, gx, gp = forward_backward(rms, x, upstream)
    out_t, gx_t, gp_t = forward_backward(torch_rms, x.movedim(1, -1), upstream.movedim(1, -1))
    torch.testing.assert_close(out, out_t.movedim(-1, 1))
    torch.testing.assert_close(gx, gx_t.movedim(-1, 1))
    torch.testing.assert_close(gp, gp_t)
    default_eps = RMSNormChannelsFirst(4).double()  # eps=None: torch's default for the dtype, as nn.RMSNorm
    torch.testing.assert_close(default_eps(x), nn.RMSNorm(4).double()(x.movedim(1, -1)).movedim(-1, 1))


@pytest.mark.parametrize("shape", [(3, 5, 6), (2, 3, 2, 6)])
def test_group_norm_channels_last(shape: tuple[int, ...]) -> None:
    torch.manual_seed(15)
    gn = randomize_affine(GroupNormChannelsLast(3, 6).double())
    torch_gn = nn.GroupNorm(3, 6).double()
    torch_gn.load_state_dict(gn.state_dict())
    x = torch.randn(*shape, dtype=F64) * 2 + 1
    upstream = torch.randn_like(x)
    out, gx, gp = forward_backward(gn, x, upstream)
    out_t, gx_t, gp_t = forward_backward(torch_gn, x.movedim(-1, 1), upstream.movedim(-1, 1))
    torch.testing.assert_close(out, out_t.movedim(1, -1))
    torch.testing.assert_close(gx, gx_t.movedim(1, -1))
    torch.testing.assert_close(gp, gp_t)
    # the formula: channels in 3 groups of 2, each group over all positions of one sample
    grouped = x.movedim(-1, 1).reshape(shape[0], 3, -1)
    normed = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    normed = normed.reshape(x.movedim(-1, 1).shape).movedim(1, -1)
    torch.testing.assert_close(out, normed * gn.weight + gn.bias)


def _instance_formula(x: Tensor, cdim: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    cdim = cdim % x.dim()
    dims = [d for d in range(1, x.dim()) if d != cdim]
    y = (x - x.mean(dims, keepdim=True)) / (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    return y * _along(weight, x, cdim) + _along(bias, x, cdim)


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 4, 3)])
def test_instance_norm_channels_last(shape: tuple[int, ...]) -> None:
    torch.manual_seed(16)
    inorm = randomize_affine(InstanceNormChannelsLast(3, affine=True).double())
    x = torch.randn(*shape, dtype=F64) * 2 + torch.arange(3, dtype=F64)
    torch.testing.assert_close(inorm(x), _instance_formula(x, -1, inorm.weight, inorm.bias, inorm.eps))
    # with running statistics: the same buffers as torch's instance norm on the permuted input
    tracked = InstanceNormChannelsLast(3, track_running_stats=True).double()
    torch_cls = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d}[len(shape)]
    torch_tracked = torch_cls(3, track_running_stats=True).double()
    torch.testing.assert_close(tracked(x), torch_tracked(x.movedim(-1, 1)).movedim(1, -1))
    torch.testing.assert_close(tracked.state_dict(), torch_tracked.state_dict())
    assert not torch.allclose(tracked.running_mean, torch.zeros(3, dtype=F64))
    tracked.eval()
    torch_tracked.eval()
    torch.testing.assert_close(tracked(x), torch_tracked(x.movedim(-1, 1)).movedim(1, -1))


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 2, 2, 2, 3)])
def test_instance_norm_nd(shape: tuple[int, ...]) -> None:
    torch.manual_seed(17)
    inorm = randomize_affine(InstanceNormNd(3, affine=True).double())
    x = torch.randn(*shape, dtype=F64) * 2 + 1
    torch.testing.assert_close(inorm(x), _instance_formula(x, 1, inorm.weight, inorm.bias, inorm.eps))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, C, L, \*\), got \(2, 3\)"):
        inorm(torch.randn(2, 3, dtype=F64))


# ----------------------------------------------------------------------------------------------------------------
# gradcheck (float64, small shapes) for every layer we wrote


def _clipped_renorm(layout: str) -> BatchRenorm:
    """Running statistics far from the batch's, so every r and d sits at a clip bound (constants, as in backward)."""
    renorm = randomize_affine(BatchRenorm(3, rmax=2.0, dmax=0.5, warmup_steps=0, layout=layout).double())
    with torch.no_grad():
        renorm.running_mean.copy_(torch.tensor([4.0, -4.0, 4.0]))
        renorm.running_var.copy_(torch.tensor([0.01, 30.0, 30.0]))
    return renorm


GRADCHECK_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "batch_renorm_first": (lambda: _clipped_renorm("channels_first"), (4, 3, 2, 2)),
    "batch_renorm_last": (lambda: _clipped_renorm("channels_last"), (4, 2, 2, 3)),
    "ghost_batch": (lambda: randomize_affine(GhostBatchNorm(3, virtual_batch_size=2)), (5, 3, 2)),
    "ghost_batch_last": (lambda: randomize_affine(GhostBatchNorm(3, 2, layout="channels_last")), (5, 2, 3)),
    "frozen_batch": (lambda: randomize_affine(FrozenBatchNorm(3, trainable_affine=True)), (2, 3, 2, 2)),
    "batch_channels_last": (lambda: randomize_affine(BatchNormChannelsLast(3)), (2, 3, 3)),
    "batch_nd": (lambda: randomize_affine(BatchNormNd(2)), (2, 2, 2, 2, 1, 2)),
    "layer_channels_first": (lambda: randomize_affine(LayerNormChannelsFirst(3)), (2, 3, 2, 2)),
    "rms_channels_first": (lambda: randomize_affine(RMSNormChannelsFirst(3)), (2, 3, 2, 2)),
    "group_channels_last": (lambda: randomize_affine(GroupNormChannelsLast(2, 4)), (2, 3, 4)),
    "instance_channels_last": (lambda: randomize_affine(InstanceNormChannelsLast(3, affine=True)), (2, 4, 3)),
    "instance_nd": (lambda: randomize_affine(InstanceNormNd(2, affine=True)), (2, 2, 2, 2, 1, 2)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case: str) -> None:
    torch.manual_seed(18)
    factory, shape = GRADCHECK_CASES[case]
    module = factory()
    x = torch.randn(*shape, dtype=F64)
    if isinstance(module, BatchRenorm):  # the premise of the case: r and d all clipped, away from 1 and 0
        cdim = 1 if module.layout == "channels_first" else -1
        mean, _ = batch_moments(x, cdim)
        std = (x.var(_reduce_dims(x, cdim), unbiased=False) + module.eps).sqrt()
        running_std = (module.running_var + module.eps).sqrt()
        ratio = std / running_std
        assert ((ratio < 0.5) | (ratio > 2.0)).all(), ratio  # r clipped to 1/rmax or rmax
        assert (((mean - module.running_mean) / running_std).abs() > 0.5).all()  # d clipped to -dmax or dmax
    assert_gradcheck(module, x)


# ----------------------------------------------------------------------------------------------------------------
# registry

# The kinds DESIGN.md promises; users may add more.
BUILT_IN = ["batch", "sync_batch", "group", "layer", "instance", "rms", "batch_renorm", "ghost_batch",
            "frozen_batch", "none"]


def _input_for(layout: str, channels: int) -> Tensor:
    return torch.randn(4, channels, 3, 3) if layout == "channels_first" else torch.randn(4, 5, channels)


@pytest.mark.parametrize("kind", available_norms())
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_every_kind_builds_and_trains(kind: str, layout: str) -> None:
    torch.manual_seed(19)
    for dims in ((None, 2) if layout == "channels_first" else (None,)):
        module = build_norm(kind, 8, layout=layout, dims=dims)
        if hasattr(module, "layout") and not isinstance(module, nn.Identity):
            assert module.layout == layout
        x = _input_for(layout, 8).requires_grad_(True)
        out = module(x)
        assert out.shape == x.shape
        (out * torch.randn_like(out)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        if kind != "none":
            assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kind", "layout", "dims", "cls"),
    [
        ("batch", "channels_first", 2, nn.BatchNorm2d),
        ("batch", "channels_first", 1, nn.BatchNorm1d),
        ("batch", "channels_first", None, BatchNormNd),
        ("batch", "channels_last", None, BatchNormChannelsLast),
        ("group", "channels_first", None, nn.GroupNorm),
        ("group", "channels_last", None, GroupNormChannelsLast),
        ("layer", "channels_first", None, LayerNormChannelsFirst),
        ("layer", "channels_last", None, nn.LayerNorm),
        ("rms", "channels_first", None, RMSNormChannelsFirst),
        ("rms", "channels_last", None, nn.RMSNorm),
        ("instance", "channels_first", 2, nn.InstanceNorm2d),
        ("instance", "channels_first", None, InstanceNormNd),
        ("instance", "channels_last", None, InstanceNormChannelsLast),
        ("batch_renorm", "channels_last", None, BatchRenorm),
        ("ghost_batch", "channels_last", None, GhostBatchNorm),
        ("frozen_batch", "channels_last", None, FrozenBatchNorm),
        ("none", "channels_last", None, nn.Identity),
    ],
)
def test_registry_picks_the_layer_for_the_layout(kind: str, layout: str, dims: int | None, cls: type) -> None:
    assert type(build_norm(kind, 8, layout=layout, dims=dims)) is cls


def test_build_norm_passes_options() -> None:
    ghost = build_norm("Ghost-Batch", 6, layout="channels_last", virtual_batch_size=5, momentum=None)
    assert isinstance(ghost, GhostBatchNorm) and ghost.virtual_batch_size == 5 and ghost.momentum is None
    renorm = build_norm("batch_renorm", 6, rmax=2.0, dmax=1.0, warmup_steps=0)
    assert renorm.current_bounds() == (2.0, 1.0)
    frozen = build_norm("frozen_batch", 6, trainable_affine=True)
    assert frozen.weight.requires_grad
    bn = build_norm(nn.BatchNorm2d, 6, momentum=0.5)  # a class as the kind
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == 0.5


def test_build_norm_errors() -> None:
    with pytest.raises(ValueError, match=r"Unknown norm kind 'batchnorm': the kinds are ") as unknown:
        build_norm("batchnorm", 8)
    listed = str(unknown.value).split("the kinds are ")[1].split(", ")
    assert listed == available_norms() and set(BUILT_IN) <= set(listed)
    with pytest.raises(ValueError, match=r"`layout` must be one of channels_first, channels_last, got 'NHWC'"):
        build_norm("batch", 8, layout="NHWC")
    with pytest.raises(ValueError, match=r"'layer' does not take option\(s\) momentum, num_groups; it takes: affine"):
        build_norm("layer", 8, num_groups=2, momentum=0.1)
    with pytest.raises(ValueError, match=r"'none' does not take option\(s\) eps; it takes: no options"):
        build_norm("none", 8, eps=1e-3)
    with pytest.raises(ValueError, match=r"`num_groups`=3 must be a positive divisor of the 8 channels"):
        build_norm("group", 8, num_groups=3)
    with pytest.raises(ValueError, match=r"`num_groups`=0 .* \(divisors: \[1, 2, 4, 8\]\)"):
        build_norm("group", 8, num_groups=0, layout="channels_last")
    with pytest.raises(ValueError, match=r"`num_features` must be a positive int, got 0"):
        build_norm("batch", 0)
    with pytest.raises(ValueError, match=r"`dims` must be 1, 2, 3 or None, got 4"):
        build_norm("batch", 8, dims=4)
    with pytest.raises(TypeError, match=r"`kind` must be a str naming a norm kind"):
        build_norm(None, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(("channels", "groups"), [(64, 32), (48, 24), (96, 32), (100, 25), (7, 7), (1, 1)])
def test_default_num_groups(channels: int, groups: int) -> None:
    assert default_num_groups(channels) == groups
    assert build_norm("group", channels).num_groups == groups
    assert build_norm("group", channels, layout="channels_last").num_groups == groups


class _ScaledTanh(nn.Module):
    def __init__(self, num_features: int, scale: float, layout: str, dims: int | None) -> None:
        super().__init__()
        self.num_features, self.scale, self.layout, self.dims = num_features, scale, layout, dims
        self.gain = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        cdim = 1 if self.layout == "channels_first" else -1
        return torch.tanh(x * self.scale) * _along(self.gain, x, cdim)


def _scaled_tanh(num_features: int, layout: str, dims: int | None, scale: float = 1.0) -> nn.Module:
    return _ScaledTanh(num_features, scale, layout, dims)


def test_register_norm_with_a_user_factory() -> None:
    assert "scaled_tanh" not in available_norms()
    register_norm("Scaled-Tanh", _scaled_tanh)
    try:
        assert set(BUILT_IN) < set(available_norms()) and available_norms()[-1] == "scaled_tanh"
        module = build_norm("scaled_tanh", 6, layout="channels_last", dims=None, scale=2.0)
        assert isinstance(module, _ScaledTanh)
        assert (module.num_features, module.scale, module.layout, module.dims) == (6, 2.0, "channels_last", None)
        x = torch.randn(2, 3, 6, requires_grad=True)
        module(x).sum().backward()
        torch.testing.assert_close(x.grad, 2.0 * (1 - torch.tanh(2.0 * x.detach()) ** 2))
        assert build_norm("scaled_tanh", 4, dims=2).dims == 2
        with pytest.raises(ValueError, match=r"'scaled_tanh' does not take option\(s\) eps; it takes: scale"):
            build_norm("scaled_tanh", 6, eps=1e-5)
        with pytest.raises(ValueError, match=r"norm kind 'scaled_tanh' is already registered; pass overwrite=True"):
            register_norm("scaled_tanh", _scaled_tanh)
        with pytest.raises(ValueError, match=r"norm kind 'batch' is already registered"):
            register_norm("batch", _scaled_tanh)
        assert type(build_norm("batch", 4, dims=2)) is nn.BatchNorm2d  # the failed registration changed nothing
        register_norm("scaled_tanh", lambda num_features, layout, dims: nn.Identity(), overwrite=True)
        assert isinstance(build_norm("scaled_tanh", 6), nn.Identity)
        with pytest.raises(ValueError, match=r"`name` must be a non-empty str, got ''"):
            register_norm("", _scaled_tanh)
        with pytest.raises(TypeError, match=r"`factory` must be callable, got 3"):
            register_norm("three", 3)  # type: ignore[arg-type]
    finally:
        unregister_norm("scaled_tanh")
    assert "scaled_tanh" not in available_norms()
    with pytest.raises(ValueError, match=r"Unknown norm kind 'scaled_tanh'"):
        build_norm("scaled_tanh", 6)


def test_is_batch_norm_and_tracks_running_stats() -> None:
    for kind in ("batch", "sync_batch", "batch_renorm", "ghost_batch"):
        for layout in ("channels_first", "channels_last"):
            module = build_norm(kind, 4, layout=layout)
            assert is_batch_norm(module) and tracks_running_stats(module), (kind, layout)
    assert is_batch_norm(nn.SyncBatchNorm(4)) and tracks_running_stats(nn.SyncBatchNorm(4))
    untracked = build_norm("batch", 4, dims=2, track_running_stats=False)
    assert is_batch_norm(untracked) and not tracks_running_stats(untracked)
    for kind in ("frozen_batch", "group", "layer", "instance", "rms", "none"):
        module = build_norm(kind, 4)
        assert not is_batch_norm(module) and not tracks_running_stats(module), kind
    assert not is_batch_norm(build_norm("instance", 4, track_running_stats=True))


class _Branches(nn.Module):
    """The same channels-first input through several norms side by side (channels-last ones get it permuted)."""

    def __init__(self, norms: list[nn.Module]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norms)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [n(x.movedim(1, -1) if getattr(n, "layout", "") == "channels_last" else x) for n in self.norms]


def test_swa_update_bn_treats_our_batch_norms_like_torchs() -> None:
    torch.manual_seed(20)
    norms = [
        nn.BatchNorm2d(3, momentum=0.3),
        BatchNormNd(3, momentum=0.3),
        BatchNormChannelsLast(3, momentum=0.3),
        BatchRenorm(3, momentum=0.3, rmax=2.0, dmax=1.0, warmup_steps=0),
        BatchRenorm(3, momentum=0.3, layout="channels_last"),
        GhostBatchNorm(3, virtual_batch_size=6, momentum=0.3),
        GhostBatchNorm(3, virtual_batch_size=6, momentum=0.3, layout="channels_last"),
    ]
    model = _Branches(norms).double()
    for n in model.norms:  # stale statistics that update_bn must discard
        with torch.no_grad():
            n.running_mean.fill_(7.0)
            n.running_var.fill_(0.01)
    model.eval()
    batches = [torch.randn(6, 3, 2, 2, dtype=F64) * (i + 1) + 2 * i for i in range(4)]
    torch.optim.swa_utils.update_bn(batches, model)

    moments = [batch_moments(b, 1) for b in batches]
    expected_mean = torch.stack([m for m, _ in moments]).mean(0)
    expected_var = torch.stack([v for _, v in moments]).mean(0)
    for n in model.norms:
        torch.testing.assert_close(n.running_mean, expected_mean, msg=lambda m, n=n: f"{type(n).__name__}: {m}")
        torch.testing.assert_close(n.running_var, expected_var, msg=lambda m, n=n: f"{type(n).__name__}: {m}")
        assert int(n.num_batches_tracked) == 4
        assert n.momentum == 0.3
    assert not model.training


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 on CPU

HALF_CASES: dict[str, Callable[[], nn.Module]] = {
    "batch_renorm": lambda: BatchRenorm(4, rmax=2.0, dmax=0.5, warmup_steps=0),
    "batch_renorm_last": lambda: BatchRenorm(4, rmax=2.0, dmax=0.5, warmup_steps=0, layout="channels_last"),
    "ghost_batch": lambda: GhostBatchNorm(4, virtual_batch_size=3),
    "ghost_batch_last": lambda: GhostBatchNorm(4, virtual_batch_size=3, layout="channels_last"),
    "frozen_batch": lambda: FrozenBatchNorm(4),
    "frozen_batch_last": lambda: FrozenBatchNorm(4, layout="channels_last"),
    "batch_channels_last": lambda: BatchNormChannelsLast(4),
    "batch_nd": lambda: BatchNormNd(4),
    "layer_channels_first": lambda: LayerNormChannelsFirst(4),
    "rms_channels_first": lambda: RMSNormChannelsFirst(4),
    "group_channels_last": lambda: GroupNormChannelsLast(2, 4),
    "instance_channels_last": lambda: InstanceNormChannelsLast(4, affine=True),
    "instance_nd": lambda: InstanceNormNd(4, affine=True),
}


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's RMSNorm, unfused path
@pytest.mark.parametrize("case", list(HALF_CASES))
@pytest.mark.parametrize("training", [True, False])
def test_bfloat16_input_is_finite_and_close_to_float32(case: str, training: bool) -> None:
    torch.manual_seed(21)
    module = randomize_affine(HALF_CASES[case]())
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name == "running_mean":
                buf.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
            elif name == "running_var":
                buf.copy_(torch.tensor([0.5, 2.0, 1.0, 4.0]))
    module.train(training)
    last = getattr(module, "layout", "channels_first") == "channels_last"
    x = (torch.randn(6, 5, 4) if last else torch.randn(6, 4, 5)) * 3 + 1
    x16 = x.to(torch.bfloat16)
    reference = copy.deepcopy(module)(x16.float())  # float32 on the same (rounded) input
    mixed = copy.deepcopy(module)(x16)  # float32 parameters, bfloat16 activations
    low = copy.deepcopy(module).to(torch.bfloat16)(x16)  # the whole layer in bfloat16
    for out in (mixed, low):
        assert out.dtype == torch.bfloat16
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.03)
