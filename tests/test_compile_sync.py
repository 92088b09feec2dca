"""SyncBatchNorm under ``torch.compile(fullgraph=True)`` in two real processes over gloo (issue #12, part 4).

torch's own ``nn.SyncBatchNorm`` breaks the graph (pytorch/pytorch#161302, #156680: a process group handed to an
autograd function, and a boolean mask over the gathered counts that synchronizes with the host); it also only
runs on GPUs, so its side of the comparison is in tests/test_cuda.py. Here: our layer compiles to one graph per
process with no graph break, no recompile after the first step, and the compiled model's outputs, gradients and
running statistics equal the eager model's and plain batch norm's on the concatenated batch in one process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_bn.layers import SyncBatchNorm
from tests.dist import run_distributed

C = 4
STEPS = 3
SPLIT = (3, 5)  # samples on rank 0 and rank 1
TOL = {"atol": 1e-9, "rtol": 1e-9}


class TinyNet(nn.Module):
    """A conv, channels-first batch norm, then the positions as tokens through channels-last batch norm."""

    def __init__(self, norm: type[nn.Module] = SyncBatchNorm, tokens_norm: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, bias=False)
        self.bn = norm(C)
        self.tokens_bn = (tokens_norm or (lambda c: SyncBatchNorm(c, layout="channels_last")))(C)
        self.head = nn.Linear(C, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))  # (B, C, 4, 4)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 16, C)
        return self.head(self.tokens_bn(tokens).mean(1))  # (B, 2)


class _TokensBatchNorm(nn.BatchNorm1d):
    """Plain batch norm over (B, T, C) tokens, for the one-process reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _init(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, 0.5, 0.3)
    return model.double()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(sum(SPLIT), 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(STEPS)]


def _part(rank: int, x: torch.Tensor, split: tuple[int, int] = SPLIT) -> torch.Tensor:
    start = 0 if rank == 0 else split[0]
    return x[start : start + split[rank]]


def _steps(model: nn.Module, batches: list[torch.Tensor], rank: int | None, owner: nn.Module | None = None) -> dict:
    """Forward and backward of each batch (this process's part of it); outputs, input and parameter gradients and
    buffers (of ``owner``, the module a compiled ``model`` wraps, so that names carry no ``_orig_mod``)."""
    owner = owner or model
    outs, xgrads, graphs = [], [], []
    for x in batches:
        x = (x if rank is None else _part(rank, x)).clone().requires_grad_(True)
        out = model(x)
        (out * out).sum().backward()
        outs.append(out.detach())
        xgrads.append(x.grad)
        graphs.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
    return {
        "out": outs,
        "xgrad": xgrads,
        "pgrad": {n: p.grad.clone() for n, p in owner.named_parameters()},
        "buffers": {n: b.clone() for n, b in owner.named_buffers()},
        "graphs": graphs,
    }


def _counters() -> dict:
    return {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}


def _compile_cases(rank: int, world_size: int) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results: dict = {}
    eager = _init(TinyNet())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    results["compiled"] = _steps(compiled, _batches(), rank, owner=compiled_model)
    results["compiled_counters"] = _counters()
    results["eager"] = _steps(eager, _batches(), rank)

    # The rare path: an empty batch on rank 0 makes that process check the union's count, in the graph (a
    # tensor-side assertion); a cumulative running average (momentum None) reads no counter on the host.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bn = SyncBatchNorm(C, momentum=None).double()
    compiled_bn = torch.compile(bn, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, C, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for _ in range(2):
        out = compiled_bn(_part(rank, x, (0, 8)).clone().requires_grad_(True))
        out.sum().backward()
    results["empty"] = (out.shape, bn.running_mean.clone(), bn.running_var.clone(), _counters())

    # A union batch of one value per channel: the assertion fires on both processes (RuntimeError on CPU).
    torch._dynamo.reset()
    compiled_bn = torch.compile(SyncBatchNorm(C).double(), backend="aot_eager", fullgraph=True)
    try:
        compiled_bn(torch.randn(1 - rank, C, dtype=torch.float64))
        results["one_value"] = None
    except RuntimeError as err:
        results["one_value"] = str(err)

    # Negative control for the counters: a graph break is seen (two graphs, a graph_break entry).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def broken(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    torch.compile(broken, backend="aot_eager")(torch.ones(3))
    results["control"] = _counters()
    return results


@pytest.fixture(scope="module")
def compiled_results() -> list[dict]:
    return run_distributed(_compile_cases, 2, timeout=600)


def test_one_graph_without_breaks_or_recompiles(compiled_results) -> None:
    for r in compiled_results:
        counters = r["compiled_counters"]
        assert "graph_break" not in counters or not counters["graph_break"], counters.get("graph_break")
        assert counters["stats"]["unique_graphs"] == 1
        # The graph count after each step: compiled at the first, never again.
        assert r["compiled"]["graphs"] == [1] * STEPS


def test_counters_see_a_graph_break(compiled_results) -> None:
    for r in compiled_results:
        assert r["control"]["graph_break"] and r["control"]["stats"]["unique_graphs"] == 2


def test_compiled_equals_eager(compiled_results) -> None:
    for r in compiled_results:
        compiled, eager = r["compiled"], r["eager"]
        for step in range(STEPS):
            torch.testing.assert_close(compiled["out"][step], eager["out"][step], **TOL)
            torch.testing.assert_close(compiled["xgrad"][step], eager["xgrad"][step], **TOL)
        for name, grad in eager["pgrad"].items():
            torch.testing.assert_close(compiled["pgrad"][name], grad, **TOL)
        for name, buffer in eager["buffers"].items():
            torch.testing.assert_close(compiled["buffers"][name], buffer, **TOL)


def test_compiled_equals_plain_batch_norm_on_the_union(compiled_results) -> None:
    reference = _init(TinyNet(norm=nn.BatchNorm2d, tokens_norm=_TokensBatchNorm))
    ref = _steps(reference, _batches(), None)
    ranks = [r["compiled"] for r in compiled_results]
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["out"][step] for r in ranks]), ref["out"][step], **TOL)
        torch.testing.assert_close(torch.cat([r["xgrad"][step] for r in ranks]), ref["xgrad"][step], **TOL)
    # Each process's parameter gradient is that of its own loss; their sum is the gradient of the union's loss.
    for name, grad in ref["pgrad"].items():
        torch.testing.assert_close(ranks[0]["pgrad"][name] + ranks[1]["pgrad"][name], grad, **TOL)
    for r in ranks:
        for name, buffer in ref["buffers"].items():
            torch.testing.assert_close(r["buffers"][name], buffer, **TOL)
    # Negative control: each process's own batch norm would give other running statistics.
    own = _init(TinyNet(norm=nn.BatchNorm2d, tokens_norm=_TokensBatchNorm))
    _steps(own, [_part(0, x) for x in _batches()], None)
    assert not torch.allclose(own.bn.running_var, ref["buffers"]["bn.running_var"])


def test_empty_batch_and_cumulative_average_compile_fully(compiled_results) -> None:
    x = torch.randn(8, C, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = nn.BatchNorm1d(C, momentum=None).double()
    for _ in range(2):
        ref(x)
    for rank, r in enumerate(compiled_results):
        shape, running_mean, running_var, counters = r["empty"]
        assert shape == (0 if rank == 0 else 8, C, 5)
        torch.testing.assert_close(running_mean, ref.running_mean, **TOL)
        torch.testing.assert_close(running_var, ref.running_var, **TOL)
        assert not counters.get("graph_break") and counters["stats"]["unique_graphs"] == 1


def test_one_value_per_channel_fails_in_the_graph_on_both_processes(compiled_results) -> None:
    for r in compiled_results:
        assert r["one_value"] is not None and "more than 1 value per channel" in r["one_value"]
