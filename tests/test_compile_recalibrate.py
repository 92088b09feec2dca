"""recalibrate_bn on compiled models: the statistics of the eager model, and no compile or recompile it causes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bn import recalibrate_bn


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3),
    )


def _train_steps(model: nn.Module, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 2, 5, 5, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("how", ["wrapped", "submodule", "in_place"])
def test_recalibration_of_a_compiled_model_equals_eager_and_compiles_nothing(how: str) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _net()
    if how == "wrapped":
        target: nn.Module = torch.compile(model, backend="aot_eager")
    elif how == "submodule":
        target = nn.Sequential()
        target.add_module("net", torch.compile(model, backend="aot_eager"))
    else:
        model.compile(backend="aot_eager")
        target = model
    counters.clear()
    _train_steps(target, 3, seed=1)
    # the same weights and buffers in a model that was never compiled, under the same names
    eager = _net()
    eager.load_state_dict(model.state_dict())
    if how == "submodule":
        eager = nn.Sequential()
        eager.add_module("net", _net())
        eager.net.load_state_dict(model.state_dict())
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the training graph was compiled
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 2, 5, 5, generator=gen) for _ in range(4)]
    report = recalibrate_bn(target, batches)
    ref_report = recalibrate_bn(eager, batches)
    assert counters["stats"]["unique_graphs"] == graphs  # recalibration ran eagerly: nothing compiled for it
    assert sorted(report.layers) == sorted(ref_report.layers) and all("_orig_mod" not in n for n in report.layers)
    got, ref = _stats(target), _stats(eager)
    assert len(got) == len(ref) == 6
    for (key, value), expected in zip(got.items(), ref.values()):
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
    assert target.training  # modes restored
    # training goes on with the graphs compiled before: no recompile
    _train_steps(target, 2, seed=3)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
