"""Padding-aware batch statistics: lightning_bn.padding_mask and the batch-statistics layers under it.

Each masked layer is compared with the same layer on the real tokens alone (outputs at real positions, input and
parameter gradients, running statistics), in float64; synchronized batch norm over 2 gloo processes with different
padding on each is compared with one process on all the real tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_bn
from lightning_bn import padding_mask, set_padding_mask_from
from lightning_bn.layers import BatchNormChannelsLast, BatchNormNd, GhostBatchNorm, build_norm
from lightning_bn.moments import masked_channel_moments, masked_shifted_channel_moments
from lightning_bn.padding import active_padding_mask, mask_for
from tests.dist import run_distributed

C = 4


def _lengths_mask(lengths: list[int], total: int) -> Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]  # (N, T)


def _padded(lengths: list[int], total: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Tokens (N, T, C) in float64 whose padding holds large values, which would dominate any statistic they
    leaked into."""
    gen = torch.Generator().manual_seed(seed)
    mask = _lengths_mask(lengths, total)
    x = torch.randn(len(lengths), total, C, generator=gen, dtype=torch.float64) * 2.0 + 0.5
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e4))
    return x, mask


def _set_params(bn: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(C, generator=gen, dtype=torch.float64) * 0.3)
        bn.running_var.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)


def _pair(kind: str, layout: str = "channels_last", **options) -> tuple[nn.Module, nn.Module]:
    layers = []
    for _ in range(2):
        bn = build_norm(kind, C, layout=layout, **options).double()
        _set_params(bn)
        layers.append(bn)
    return layers[0], layers[1]


def _close(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("batch", {}),
        ("sync_batch", {}),
        ("batch_renorm", {"warmup_steps": 0, "rmax": 1.5, "dmax": 0.5}),
        ("batch", {"momentum": None}),
    ],
)
def test_masked_layer_equals_layer_on_real_tokens(kind: str, options: dict) -> None:
    x, mask = _padded([5, 2, 3, 1], 5)
    masked, reference = _pair(kind, **options)
    x = x.requires_grad_()
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for _ in range(2):  # twice: the second step's running statistics start from the first's
        x.grad = None
        with padding_mask(mask):
            y = masked(x)
        (y * upstream * mask[..., None]).sum().backward()
        real = x.detach()[mask].clone().requires_grad_()  # (M, C): the real tokens alone
        y_ref = reference(real)
        (y_ref * upstream[mask]).sum().backward()
        _close(y[mask], y_ref)
        assert torch.isfinite(y).all()
        _close(x.grad[mask], real.grad)
        assert (x.grad[~mask] == 0).all()
    for name in ("weight", "bias"):
        _close(getattr(masked, name).grad, getattr(reference, name).grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(masked, name), getattr(reference, name))
    # negative control: without the mask the padding enters the statistics
    with torch.no_grad():
        assert not torch.allclose(masked(x)[mask], reference(x.detach()[mask]))


def test_masked_channels_first_batch_norm_nd() -> None:
    """Channels-first BatchNormNd ((N, C, L) with an (N, L) mask) equals torch's batch norm on the real positions."""
    x, mask = _padded([6, 3, 4], 6, seed=4)
    x_cf = x.transpose(1, 2).contiguous().requires_grad_()  # (N, C, T)
    bn = BatchNormNd(C).double()
    ref = nn.BatchNorm1d(C).double()
    _set_params(bn)
    _set_params(ref)
    with padding_mask(mask):
        y = bn(x_cf)
    y.transpose(1, 2)[mask].pow(2).sum().backward()
    real = x_cf.detach().transpose(1, 2)[mask].clone().requires_grad_()
    y_ref = ref(real)
    y_ref.pow(2).sum().backward()
    _close(y.transpose(1, 2)[mask], y_ref)
    _close(x_cf.grad.transpose(1, 2)[mask], real.grad)
    _close(bn.weight.grad, ref.weight.grad)
    _close(bn.bias.grad, ref.bias.grad)
    _close(bn.running_mean, ref.running_mean)
    _close(bn.running_var, ref.running_var)


def test_masked_ghost_batch_norm_per_virtual_batch() -> None:
    """Each virtual batch normalized with its real tokens' statistics; an all-padding virtual batch stays finite
    and is left out of the running statistics, which average the other virtual batches."""
    x, mask = _padded([5, 2, 0, 0, 3, 4], 5, seed=5)  # virtual batches of 2: the second has no real token
    bn = GhostBatchNorm(C, virtual_batch_size=2, layout="channels_last").double()
    _set_params(bn)
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    x = x.requires_grad_()
    with padding_mask(mask):
        y = bn(x)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (y * upstream * mask[..., None]).sum().backward()
    assert torch.isfinite(y).all()
    means, variances = [], []
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    for start in (0, 4):  # the virtual batches with real tokens
        chunk, chunk_mask = x.detach()[start : start + 2], mask[start : start + 2]
        real = chunk[chunk_mask].clone().requires_grad_()
        y_ref = F.batch_norm(real, None, None, weight, bias, True, 0.0, bn.eps)
        (y_ref * upstream[start : start + 2][chunk_mask]).sum().backward()
        _close(y[start : start + 2][chunk_mask], y_ref)
        _close(x.grad[start : start + 2][chunk_mask], real.grad)
        means.append(real.detach().mean(0))
        variances.append(real.detach().var(0, unbiased=True))
    _close(bn.weight.grad, weight.grad)
    _close(bn.bias.grad, bias.grad)
    _close(bn.running_mean, 0.9 * start_mean + 0.1 * torch.stack(means).mean(0))
    _close(bn.running_var, 0.9 * start_var + 0.1 * torch.stack(variances).mean(0))


def test_masked_moments_match_real_tokens_and_ignore_nonfinite_padding() -> None:
    x, mask = _padded([3, 1, 4], 4)
    x = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))
    real = x[mask]
    expected = torch.stack([torch.full((C,), float(len(real)), dtype=torch.float64), real.sum(0), (real**2).sum(0)])
    _close(masked_channel_moments(x, mask, -1), expected)
    _close(masked_shifted_channel_moments(x, mask, -1), expected)


def test_without_mask_nothing_changes() -> None:
    x, _ = _padded([4, 4], 4)
    ours = BatchNormChannelsLast(C).double()
    torch_bn = nn.BatchNorm1d(C).double()
    assert active_padding_mask() is None
    torch.testing.assert_close(ours(x), torch_bn(x.reshape(-1, C)).reshape(x.shape), rtol=0, atol=0)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var, rtol=0, atol=0)


def test_eval_mode_with_running_statistics_ignores_the_mask() -> None:
    x, mask = _padded([4, 2], 4)
    bn = BatchNormChannelsLast(C).double()
    _set_params(bn)
    bn.eval()
    plain = bn(x)
    with padding_mask(mask):
        torch.testing.assert_close(bn(x), plain, rtol=0, atol=0)


def test_padding_mask_nests_and_is_left_on_exceptions() -> None:
    outer, inner = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool)
    with padding_mask(outer):
        with pytest.raises(RuntimeError, match="boom"), padding_mask(inner):
            assert active_padding_mask() is inner
            raise RuntimeError("boom")
        assert active_padding_mask() is outer
    assert active_padding_mask() is None


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["batch", "sync_batch", "ghost_batch", "batch_renorm"])
def test_wrong_mask_shape_names_layer_and_shapes(kind: str) -> None:
    bn = build_norm(kind, C, layout="channels_last")
    with padding_mask(torch.ones(2, 7, dtype=torch.bool)), pytest.raises(ValueError) as err:
        bn(torch.randn(2, 5, C))
    message = str(err.value)
    assert type(bn).__name__ in message and f"num_features={C}" in message
    assert "(2, 5, 4)" in message and "(2, 7)" in message and "(2, 5)" in message


def test_mask_must_be_boolean() -> None:
    with pytest.raises(TypeError, match=r"boolean.*torch.int64.*attention_mask.bool\(\)"):
        with padding_mask(torch.ones(2, 5, dtype=torch.long)):
            pass
    with pytest.raises(TypeError, match="got list"):
        with padding_mask([[True]]):  # type: ignore[arg-type]
            pass
    assert active_padding_mask() is None


@pytest.mark.parametrize("kind", ["batch", "sync_batch", "ghost_batch", "batch_renorm"])
def test_mask_without_real_token_raises(kind: str) -> None:
    bn = build_norm(kind, C, layout="channels_last")
    before = bn.running_mean.clone()
    with padding_mask(torch.zeros(2, 5, dtype=torch.bool)), pytest.raises(ValueError, match="no real token, got 0"):
        bn(torch.randn(2, 5, C))
    torch.testing.assert_close(bn.running_mean, before)
    assert int(bn.num_batches_tracked) == 0  # the step that raised changed nothing
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[0, 0] = True
    if kind != "ghost_batch":  # a single real token has no variance
        with padding_mask(one), pytest.raises(ValueError, match="fewer than 2 real tokens, got 1"):
            bn(torch.randn(2, 5, C))


def test_mask_for_is_lenient_unless_strict() -> None:
    x = torch.randn(2, 5, C)
    with padding_mask(torch.ones(2, 3, dtype=torch.bool)):
        assert mask_for(x, -1) is None
        with pytest.raises(ValueError, match="MyLayer"):
            mask_for(x, -1, strict=True, name="MyLayer")


# ------------------------------------------------------------------------------------------------ synchronized


_SYNC_KINDS = (("sync_batch", {}), ("batch_renorm", {"warmup_steps": 0}), ("ghost_batch", {"virtual_batch_size": 2}))


def _sync_worker(rank: int, world_size: int, lengths: list[list[int]], total: int) -> dict:
    torch.manual_seed(0)
    x_all, mask_all = _padded([n for per_rank in lengths for n in per_rank], total, seed=7)
    upstream_all = torch.randn(x_all.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    start = sum(len(r) for r in lengths[:rank])
    part = slice(start, start + len(lengths[rank]))
    x, mask, upstream = x_all[part].clone().requires_grad_(), mask_all[part], upstream_all[part]
    out: dict = {}
    for kind, options in _SYNC_KINDS:
        bn = build_norm(kind, C, layout="channels_last", **options).double()
        _set_params(bn)
        if kind != "sync_batch":
            bn.sync_stats = True  # what SyncNormPlugin sets for a fit
        x.grad = None
        with padding_mask(mask):
            y = bn(x)
        (y * upstream * mask[..., None]).sum().backward()
        out[kind] = {
            "y": y.detach()[mask],
            "grad": x.grad[mask].clone(),
            "pad_grad": x.grad[~mask].clone(),
            "finite": bool(torch.isfinite(y).all()),
            "weight": bn.weight.grad.clone(),
            "bias": bn.bias.grad.clone(),
            "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(),
        }
    bn = build_norm("sync_batch", C, layout="channels_last").double()
    try:
        with padding_mask(torch.zeros_like(mask)):
            bn(x.detach())
        out["empty_error"] = None
    except ValueError as err:
        out["empty_error"] = str(err)
    return out


def test_sync_batch_norm_with_different_padding_per_rank_equals_one_process() -> None:
    # rank 0: 3 sequences, rank 1: 3, two of them all padding (its first virtual batch of 2 has no real token)
    lengths, total = [[6, 1, 2], [0, 0, 3]], 6
    results = run_distributed(_sync_worker, 2, lengths, total)
    x_all, mask_all = _padded([n for per_rank in lengths for n in per_rank], total, seed=7)
    upstream_all = torch.randn(x_all.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for kind, options in (("sync_batch", {}), ("batch_renorm", {"warmup_steps": 0})):
        # one process, all the real tokens of both ranks: plain (unsynchronized) layers of the same kind
        reference = build_norm("batch" if kind == "sync_batch" else kind, C, layout="channels_last", **options)
        reference = reference.double()
        _set_params(reference)
        real = x_all[mask_all].clone().requires_grad_()
        y_ref = reference(real)
        (y_ref * upstream_all[mask_all]).sum().backward()
        counts = [int(_lengths_mask(r, total).sum()) for r in lengths]
        offsets = [0, counts[0]]
        weight_grad = sum(r[kind]["weight"] for r in results)  # what DDP's gradient all-reduce sums
        bias_grad = sum(r[kind]["bias"] for r in results)
        _close(weight_grad, reference.weight.grad)
        _close(bias_grad, reference.bias.grad)
        for rank, result in enumerate(results):
            part = slice(offsets[rank], offsets[rank] + counts[rank])
            _close(result[kind]["y"], y_ref.detach()[part])
            _close(result[kind]["grad"], real.grad[part])
            assert result[kind]["finite"] and (result[kind]["pad_grad"] == 0).all()
            _close(result[kind]["running_mean"], reference.running_mean)
            _close(result[kind]["running_var"], reference.running_var)
    _check_synchronized_ghost_batch_norm(results, lengths, total, x_all, mask_all, upstream_all)
    for result in results:  # every rank raises alike: none is left waiting in a collective
        assert result["empty_error"] is not None
        assert "no real token" in result["empty_error"] and "all processes together" in result["empty_error"]


def _check_synchronized_ghost_batch_norm(results, lengths, total, x_all, mask_all, upstream_all) -> None:
    """Virtual batches of 2 within each rank, each over its real tokens; running statistics averaged over the
    virtual batches with real tokens of both ranks."""
    reference = build_norm("ghost_batch", C, layout="channels_last").double()
    _set_params(reference)
    weight = reference.weight.detach().clone().requires_grad_()
    bias = reference.bias.detach().clone().requires_grad_()
    means, variances, start = [], [], 0
    for rank, per_rank in enumerate(lengths):
        outputs, grads = [], []
        for first in range(0, len(per_rank), 2):
            rows = slice(start + first, start + min(first + 2, len(per_rank)))
            real = x_all[rows][mask_all[rows]].clone().requires_grad_()
            if len(real) == 0:
                continue
            y = F.batch_norm(real, None, None, weight, bias, True, 0.0, reference.eps)
            (y * upstream_all[rows][mask_all[rows]]).sum().backward()
            outputs.append(y.detach())
            grads.append(real.grad)
            means.append(real.detach().mean(0))
            variances.append(real.detach().var(0))
        start += len(per_rank)
        _close(results[rank]["ghost_batch"]["y"], torch.cat(outputs))
        _close(results[rank]["ghost_batch"]["grad"], torch.cat(grads))
        assert results[rank]["ghost_batch"]["finite"]
    _close(sum(r["ghost_batch"]["weight"] for r in results), weight.grad)
    _close(sum(r["ghost_batch"]["bias"] for r in results), bias.grad)
    for result in results:
        _close(result["ghost_batch"]["running_mean"], 0.9 * reference.running_mean + 0.1 * torch.stack(means).mean(0))
        _close(result["ghost_batch"]["running_var"], 0.9 * reference.running_var + 0.1 * torch.stack(variances).mean(0))


# ------------------------------------------------------------------------------------------------ Hugging Face


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(config, add_pooling_layer=False).double()
    report = lightning_bn.swap_norms(model, "batch")
    assert len(report) == 5  # embeddings + 2 per layer
    assert sum(isinstance(m, BatchNormChannelsLast) for m in model.modules()) == 5
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    return model.train()


def test_set_padding_mask_from_hugging_face_attention_mask() -> None:
    """A BERT whose LayerNorms are swapped to batch norm, fed padded batches with ``attention_mask``: at the real
    tokens the output does not depend on how long the padding is or what it holds; without the hooks it does."""
    model = _tiny_bert()
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 3, 5]
    tokens = torch.randint(1, 50, (3, 7), generator=gen)

    def run(total: int, pad_token: int) -> Tensor:
        ids = torch.full((3, total), pad_token)
        ids[:, :7] = tokens
        mask = _lengths_mask(lengths, total)
        ids = torch.where(mask, ids, torch.full_like(ids, pad_token))
        return model(input_ids=ids, attention_mask=mask.long()).last_hidden_state[mask]

    with set_padding_mask_from(model):
        short, long = run(7, 0), run(12, 9)
        assert active_padding_mask() is None  # left after each forward
    torch.testing.assert_close(short, long, rtol=1e-9, atol=1e-9)
    # negative control: without the mask the padding enters the batch statistics
    assert not torch.allclose(run(7, 0), run(12, 9), atol=1e-3)


def test_set_padding_mask_from_equals_the_unpadded_packed_batch() -> None:
    """The exact unpadded reference: the same sequences packed into one row without any padding (positions restarting
    per sequence, a block-diagonal attention mask), where batch norm sees exactly the real tokens. The padded batch
    under the attention-mask hooks gives the same outputs, parameter gradients and running statistics."""
    model = _tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lengths = [7, 3, 5]
    tokens = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = _lengths_mask(lengths, 7)
    upstream = torch.randn(int(mask.sum()), 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads_and_stats() -> tuple[dict[str, Tensor], list[Tensor]]:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = [m.running_var.clone() for m in model.modules() if isinstance(m, BatchNormChannelsLast)]
        return grads, stats

    with set_padding_mask_from(model):
        padded = model(input_ids=torch.where(mask, tokens, 0), attention_mask=mask.long()).last_hidden_state[mask]
    (padded * upstream).sum().backward()
    padded_grads, padded_stats = grads_and_stats()
    model.load_state_dict(state)
    model.zero_grad()
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    packed = model(
        input_ids=tokens[mask][None],
        position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
        attention_mask=(segment[:, None] == segment[None, :])[None, None],  # (1, 1, 15, 15): within a sequence
    ).last_hidden_state[0]
    (packed * upstream).sum().backward()
    packed_grads, packed_stats = grads_and_stats()
    torch.testing.assert_close(padded, packed, rtol=1e-9, atol=1e-9)
    assert padded_grads.keys() == packed_grads.keys() and len(padded_grads) > 10
    for name in padded_grads:
        torch.testing.assert_close(padded_grads[name], packed_grads[name], rtol=1e-8, atol=1e-9, msg=name)
    for a, b in zip(padded_stats, packed_stats):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_set_padding_mask_from_equals_unpadded_sequences() -> None:
    """With sequences of equal length nothing is padded: the masked forward equals the plain one, and the running
    statistics too."""
    model = _tiny_bert()
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(input_ids=ids).last_hidden_state
    plain_stats = [m.running_var.clone() for m in model.modules() if isinstance(m, BatchNormChannelsLast)]
    model.load_state_dict(state)
    with set_padding_mask_from(model):
        masked = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(masked, plain, rtol=1e-9, atol=1e-9)
    masked_stats = [m.running_var for m in model.modules() if isinstance(m, BatchNormChannelsLast)]
    for a, b in zip(masked_stats, plain_stats):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_set_padding_mask_from_leaves_the_mask_when_the_forward_raises() -> None:
    model = nn.Sequential(BatchNormChannelsLast(C))
    hooks = set_padding_mask_from(model, "attention_mask")

    def forward(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return model[0](x)

    model.forward = forward  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.randn(2, 5, C), attention_mask=torch.ones(2, 4))
    assert active_padding_mask() is None
    with pytest.raises(TypeError, match="`attention_mask` must be a tensor"):
        model(torch.randn(2, 5, C), attention_mask=[1, 1])
    hooks.remove()
    assert active_padding_mask() is None


# ------------------------------------------------------------------------------------------------------ compile


class _Block(nn.Module):
    def __init__(self, kind: str, **options: object) -> None:
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.norm = build_norm(kind, C, layout="channels_last", **options)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.norm(self.linear(x)).relu()


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("batch", {}),
        ("batch", {"momentum": None}),
        ("sync_batch", {"momentum": None}),
        ("batch_renorm", {}),
        ("ghost_batch", {}),
    ],
)
def test_compiled_forward_reads_the_mask_without_graph_breaks_or_recompiles(kind: str, options: dict) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = _Block(kind, **options)
    compiled_block = _Block(kind, **options)
    compiled_block.load_state_dict(eager.state_dict())
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_block, backend=backend, fullgraph=True)
    x = torch.randn(3, 5, C)
    mask = _lengths_mask([5, 2, 4], 5)
    # Torch's own kernel path (no mask) with momentum=None reads the step counter on the host, which fullgraph
    # refuses; the masked path keeps the cumulative factor a tensor, so those cases run masked steps only.
    modes = (True,) if "momentum" in options and options["momentum"] is None else (False, True)
    for step in range(3):
        for use_mask in modes:
            with padding_mask(mask) if use_mask else _no_mask():
                expected, got = eager(x), compiled(x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if step == 0:
            frames = backend.frame_count
    assert backend.frame_count == frames  # warm: neither the masked nor the unmasked steps compile again
    assert frames <= 2
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(compiled_block.norm.running_var, eager.norm.running_var)


def test_compiled_model_with_set_padding_mask_from() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager, block = _Block("batch"), _Block("batch")
    block.load_state_dict(eager.state_dict())
    hooks = set_padding_mask_from(block)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, C)
    mask = _lengths_mask([5, 2, 4], 5)
    for _ in range(2):
        got = compiled(x, attention_mask=mask.long())
        with padding_mask(mask):
            expected = eager(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    assert active_padding_mask() is None
    assert sum(counters["graph_break"].values()) == 0
    hooks.remove()


class _no_mask:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------------------------------- recalibration callback


class _PaddedTokens(torch.utils.data.Dataset):
    """Sequences of 1-6 tokens padded to 6, with their masks; padding holds large values."""

    def __init__(self, n: int = 12) -> None:
        gen = torch.Generator().manual_seed(11)
        lengths = torch.randint(1, 7, (n,), generator=gen).tolist()
        self.x, self.mask = _padded(lengths, 6, seed=12)
        self.x = self.x.float()
        self.y = torch.randn(n, 6, C, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "mask": self.mask[i], "y": self.y[i]}


def _lightning_module(set_mask_in_training_step: bool):
    import lightning as L

    class PaddedModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(C, C)
            self.norm = build_norm("batch", C, layout="channels_last", momentum=0.5)

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            if set_mask_in_training_step:
                with padding_mask(batch["mask"]):
                    out = self.norm(self.proj(batch["x"]))
            else:
                out = self.norm(self.proj(batch["x"]))
            return ((out - batch["y"]) ** 2)[batch["mask"]].mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return PaddedModule()


@pytest.mark.parametrize("how", ["training_step", "padding_mask_from"])
def test_batch_norm_recalibration_callback_counts_real_tokens(tmp_path, how: str) -> None:
    """BatchNormRecalibration at fit end: the running statistics are those of the real tokens of the loader, whether
    the module's training_step sets the mask (the default feed) or ``padding_mask_from`` does."""
    import lightning as L

    from lightning_bn.callbacks import BatchNormRecalibration

    data = _PaddedTokens()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = _lightning_module(set_mask_in_training_step=how == "training_step")
    callback = BatchNormRecalibration(
        num_batches=None, when="fit_end", padding_mask_from=(lambda b: b["mask"]) if how != "training_step" else None
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, loader)
    with torch.no_grad():
        projected = module.proj(data.x[data.mask]).double()
    torch.testing.assert_close(module.norm.running_mean.double(), projected.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.norm.running_var.double(), projected.var(0), rtol=1e-5, atol=1e-5)
    assert callback.last_report is not None
    assert callback.last_report.layers["norm"].num_values == int(data.mask.sum())


def test_batch_norm_recalibration_rejects_a_bad_padding_mask_from() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_bn.callbacks import BatchNormRecalibration

    with pytest.raises(MisconfigurationException, match="`padding_mask_from` must be callable"):
        BatchNormRecalibration(padding_mask_from="mask")  # type: ignore[arg-type]


def test_set_padding_mask_from_warns_about_torch_batch_norms_that_ignore_the_mask() -> None:
    model = nn.Sequential(nn.Conv1d(C, C, 1), nn.BatchNorm1d(C), BatchNormNd(C))
    with pytest.warns(UserWarning, match=r"1 batch-norm layer\(s\).*1 \(BatchNorm1d\)"):
        set_padding_mask_from(model).remove()


def test_real_token_check_is_per_minimum_and_scope() -> None:
    """One host read per mask serves later layers only when it proved what they need: a PowerNorm's check of one
    real token must not let a batch norm through with a single real token."""
    from lightning_bn.layers import PowerNorm

    power, bn = PowerNorm(C, layout="channels_last"), BatchNormChannelsLast(C)
    one = torch.zeros(2, 5, dtype=torch.bool)
    one[1, 2] = True
    x = torch.randn(2, 5, C)
    with padding_mask(one):
        power(x)  # one real token is enough for a quadratic mean
        with pytest.raises(ValueError, match="fewer than 2 real tokens, got 1"):
            bn(x)


def test_mask_on_another_device_than_the_input_raises() -> None:
    bn = BatchNormChannelsLast(C)
    with padding_mask(torch.ones(2, 5, dtype=torch.bool, device="meta")), pytest.raises(ValueError, match="meta"):
        bn(torch.randn(2, 5, C))


@pytest.mark.parametrize("kind", ["batch", "power"])
def test_compiled_layers_with_varying_sequence_lengths_settle_after_one_dynamic_recompile(kind: str) -> None:
    """Padded batches change length from step to step: dynamo's automatic dynamic shapes recompile once per mode
    (with and without a mask) when the length first changes, then never again; no graph breaks."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    norm = build_norm(kind, C, layout="channels_last")
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(norm, backend=backend, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    frames = []
    for total in (5, 6, 7, 9, 5):
        x = torch.randn(3, total, C, generator=gen, requires_grad=True)
        mask = _lengths_mask([total, 2, total - 1], total)
        compiled(x).sum().backward()
        with padding_mask(mask):
            compiled(x).sum().backward()
        frames.append(backend.frame_count)
    assert frames == [2, 4, 4, 4, 4]
    assert sum(counters["graph_break"].values()) == 0
