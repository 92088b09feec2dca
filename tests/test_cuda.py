"""Checks that need a CUDA device (issue #15, part 1): ``python -m pytest -m cuda tests/test_cuda.py``.

Skipped where no CUDA device is present. ``make gpu-check OUT=dir`` runs them with the benchmarks' CUDA rows.

- SyncBatchNorm's fused path (torch's CUDA batch-norm kernels) in 2 processes on the one GPU over gloo, against
  batch norm on the union batch in float64: outputs, input and parameter gradients, running statistics, in float32,
  bfloat16, float16 and float64, channels-first, channels-first in channels-last memory format and channels-last
  layout, uneven and empty batches; and against ``torch.nn.SyncBatchNorm`` on the same data.
- torch.compile on CUDA: our layer compiles with inductor to one graph without a break (fullgraph=True); torch's
  ``nn.SyncBatchNorm`` breaks the graph (pytorch/pytorch#161302, #156680).
- recalibrate_bn on CUDA gives the CPU's statistics (float64 accumulation).
- LayerStatsMonitor makes no host synchronization on non-logging steps (``torch.cuda.set_sync_debug_mode("error")``
  around those steps).
- AMP 16-mixed and bf16-mixed: ``grad/norm/<param>`` is the norm of the unscaled gradient.
- ``trainer.fit(torch.compile(model))`` with the monitor, inductor on CUDA.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import recalibrate_bn
from lightning_bn.callbacks import LayerStatsMonitor
from lightning_bn.layers import SyncBatchNorm
from tests.dist import run_distributed

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

C = 3
STEPS = 2
SPLITS = [(3, 5), (0, 8)]  # samples on rank 0 and rank 1 (the union batch is always 8)
LAYOUTS = {  # name: (layer layout, one sample's shape, channels-last memory format)
    "channels_first": ("channels_first", (C, 4, 5), False),
    "nhwc": ("channels_first", (C, 4, 5), True),
    "channels_last": ("channels_last", (6, C), False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# (outputs and input gradients, parameter gradients, running statistics) against float64 on the values the GPU saw
TOLERANCES = {
    "float64": ({"atol": 1e-9, "rtol": 1e-9},) * 3,
    "float32": ({"atol": 1e-4, "rtol": 1e-4}, {"atol": 1e-4, "rtol": 1e-4}, {"atol": 1e-5, "rtol": 1e-5}),
    "bfloat16": ({"atol": 5e-2, "rtol": 2e-2}, {"atol": 2e-1, "rtol": 2e-2}, {"atol": 1e-5, "rtol": 1e-5}),
    "float16": ({"atol": 5e-3, "rtol": 3e-3}, {"atol": 2e-2, "rtol": 3e-3}, {"atol": 1e-5, "rtol": 1e-5}),
}
# The device the tests run on; tests/test_cuda.py always runs them on CUDA (a dry run of the test code itself on a
# machine without a GPU may point them at the CPU).
DEVICE, ACCELERATOR = "cuda", "gpu"
QUIET = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False, "logger": False}


def _data(sample: tuple[int, ...], n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *sample, generator=g, dtype=torch.float64) * 2.0 + 1.5
    return x, torch.randn(n, *sample, generator=g, dtype=torch.float64)


def _init_affine(module: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        module.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        module.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return module


def _slice(rank: int, split: tuple[int, int]) -> slice:
    start = 0 if rank == 0 else split[0]
    return slice(start, start + split[rank])


def _run_steps(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor, channels_last_memory: bool) -> dict:
    """STEPS forwards and backwards on ``x`` (already on the device and in its dtype); results on the CPU in float64."""
    outs, xgrads = [], []
    for _ in range(STEPS):
        xi = x.detach().clone()
        if channels_last_memory:
            xi = xi.contiguous(memory_format=torch.channels_last)
        xi.requires_grad_(True)
        out = module(xi)
        (out.double() * upstream).sum().backward()
        outs.append(out.detach().cpu().double())
        xgrads.append(xi.grad.cpu().double())
    return {
        "out": outs,
        "xgrad": xgrads,
        "wgrad": module.weight.grad.cpu().double(),
        "bgrad": module.bias.grad.cpu().double(),
        "running_mean": module.running_mean.cpu().double(),
        "running_var": module.running_var.cpu().double(),
    }


class _CountingKernels:
    """Counts the calls of the fused path's kernels (so the test knows that path ran)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, {}

    def __getattr__(self, name: str) -> Any:
        kernel = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return kernel(*args, **kwargs)

        return call


def _sync_cases(rank: int, world_size: int, device: str) -> dict:
    from lightning_bn.layers import _sync

    if device == "cuda":
        torch.cuda.set_device(0)  # both processes on the one GPU
    counting = _CountingKernels(_sync._kernels)
    _sync._kernels = counting
    results: dict = {}
    for dtype_name, dtype in DTYPES.items():
        for name, (layout, sample, memory) in LAYOUTS.items():
            x, upstream = _data(sample)
            for split in SPLITS:
                part = _slice(rank, split)
                bn = _init_affine(SyncBatchNorm(C, layout=layout).double()).to(device)
                if dtype != torch.float64:
                    bn.float()  # float32 parameters with half and bfloat16 input, as under AMP
                xs = x[part].to(device, dtype)
                up = upstream[part].to(dtype).double().to(device)  # the gradient the layer's output gets
                results[(dtype_name, name, split)] = _run_steps(bn, xs, up, memory)
    # bfloat16 parameters too (a model cast with .to(torch.bfloat16))
    x, upstream = _data((C, 4, 5))
    part = _slice(rank, (3, 5))
    bn = _init_affine(SyncBatchNorm(C).double()).to(device, torch.bfloat16)
    up = upstream[part].to(torch.bfloat16).double().to(device)
    results["bf16_params"] = _run_steps(bn, x[part].to(device, torch.bfloat16), up, False)
    # torch's own SyncBatchNorm on the same float32 data (its kernels, its collectives)
    theirs = _init_affine(nn.SyncBatchNorm(C).double()).to(device).float()
    up = upstream[part].float().double().to(device)
    results["torch"] = _run_steps(theirs, x[part].to(device, torch.float32), up, False)
    ours = _init_affine(SyncBatchNorm(C).double()).to(device).float()
    results["ours"] = _run_steps(ours, x[part].to(device, torch.float32), up, False)
    results["calls"] = dict(counting.calls)
    return results


class _TokensBatchNorm(nn.BatchNorm1d):
    """Plain batch norm over channels-last tokens ``(N, T, C)``, for the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _reference(sample: tuple[int, ...], dtype: torch.dtype, bf16_params: bool = False) -> dict:
    """Batch norm on the union batch in one process, float64 on the CPU, from the values the GPU processes saw."""
    x, upstream = _data(sample)
    bn = _init_affine((nn.BatchNorm2d(C) if len(sample) == 3 else _TokensBatchNorm(C)).double())
    if bf16_params:
        with torch.no_grad():
            for p in bn.parameters():
                p.copy_(p.to(torch.bfloat16).double())
    return _run_steps(bn, x.to(dtype).double(), upstream.to(dtype).double(), False)


@pytest.fixture(scope="module")
def cuda_sync_results() -> list[dict]:
    return run_distributed(_sync_cases, 2, DEVICE, timeout=300)


def _assert_matches(ranks: list[dict], ref: dict, tolerances: tuple[dict, dict, dict]) -> None:
    values, params, stats = tolerances
    for step in range(STEPS):
        torch.testing.assert_close(torch.cat([r["out"][step] for r in ranks]), ref["out"][step], **values)
        torch.testing.assert_close(torch.cat([r["xgrad"][step] for r in ranks]), ref["xgrad"][step], **values)
    # Each process's parameter gradient is that of its own loss; their sum is the gradient of the union's loss.
    torch.testing.assert_close(ranks[0]["wgrad"] + ranks[1]["wgrad"], ref["wgrad"], **params)
    torch.testing.assert_close(ranks[0]["bgrad"] + ranks[1]["bgrad"], ref["bgrad"], **params)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], ref["running_mean"], **stats)
        torch.testing.assert_close(r["running_var"], ref["running_var"], **stats)


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}+{s[1]}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sync_batchnorm_on_cuda_equals_batch_norm_on_union(cuda_sync_results, dtype, layout, split) -> None:
    ref = _reference(LAYOUTS[layout][1], DTYPES[dtype])
    _assert_matches([r[(dtype, layout, split)] for r in cuda_sync_results], ref, TOLERANCES[dtype])


def test_fused_kernels_ran(cuda_sync_results) -> None:
    for r in cuda_sync_results:
        for kernel in ("batch_norm_stats", "batch_norm_gather_stats_with_counts", "batch_norm_elemt",
                       "batch_norm_backward_reduce", "batch_norm_backward_elemt"):
            assert r["calls"].get(kernel, 0) > 0, (kernel, r["calls"])


def test_bfloat16_parameters(cuda_sync_results) -> None:
    ref = _reference((C, 4, 5), torch.bfloat16, bf16_params=True)
    loose = ({"atol": 5e-2, "rtol": 2e-2}, {"atol": 3e-1, "rtol": 3e-2}, {"atol": 2e-2, "rtol": 1e-2})
    _assert_matches([r["bf16_params"] for r in cuda_sync_results], ref, loose)


def test_same_as_torch_sync_batchnorm(cuda_sync_results) -> None:
    for r in cuda_sync_results:
        for key in ("out", "xgrad"):
            for ours, theirs in zip(r["ours"][key], r["torch"][key]):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        for key in ("wgrad", "bgrad", "running_mean", "running_var"):
            torch.testing.assert_close(r["ours"][key], r["torch"][key], atol=1e-5, rtol=1e-5)


# ---- torch.compile --------------------------------------------------------------------------------------------


def _counters() -> dict:
    return {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _compile_cases(rank: int, world_size: int, device: str) -> dict:
    if device == "cuda":
        torch.cuda.set_device(0)
    # float32 convolutions (no TF32), so compiled and eager differ by the batch norm's rounding alone
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {}
    x = torch.randn(4 + rank, 3, 8, 8, generator=torch.Generator().manual_seed(rank)).to(device)

    def net(norm: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, C, 3), norm, nn.ReLU()).to(device)

    for key, norm, backend, fullgraph in (
        ("ours", SyncBatchNorm(C), "inductor", True),
        ("torch", nn.SyncBatchNorm(C), "aot_eager", False),
    ):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = net(norm)
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
        diffs = []
        try:
            for _ in range(3):
                out = compiled(x)
                out.square().sum().backward()
                ref = eager(x)
                ref.square().sum().backward()
                diffs.append((_relative(out, ref), _relative(model[0].weight.grad, eager[0].weight.grad)))
            results[key] = {"counters": _counters(), "diffs": diffs, "error": None}
        except Exception as err:  # noqa: BLE001 - recorded, the tests say what was expected
            results[key] = {"counters": _counters(), "diffs": diffs, "error": f"{type(err).__name__}: {err}"[:500]}
    # torch's layer with fullgraph=True: an error where it breaks the graph
    torch._dynamo.reset()
    try:
        torch.compile(net(nn.SyncBatchNorm(C)), backend="aot_eager", fullgraph=True)(x).sum().backward()
        results["torch_fullgraph"] = None
    except Exception as err:  # noqa: BLE001 - whatever dynamo raises
        results["torch_fullgraph"] = f"{type(err).__name__}: {err}"[:500]
    return results


@pytest.fixture(scope="module")
def cuda_compile_results() -> list[dict]:
    return run_distributed(_compile_cases, 2, DEVICE, timeout=400)


def test_compiled_sync_batchnorm_has_no_graph_break_on_cuda(cuda_compile_results) -> None:
    for r in cuda_compile_results:
        assert r["ours"]["error"] is None, r["ours"]["error"]
        counters = r["ours"]["counters"]
        assert not counters.get("graph_break"), counters.get("graph_break")
        assert counters["stats"]["unique_graphs"] == 1
        assert len(r["ours"]["diffs"]) == 3
        for out_diff, grad_diff in r["ours"]["diffs"]:  # relative to the largest value
            assert out_diff < 1e-5 and grad_diff < 1e-4, r["ours"]["diffs"]


def test_torch_sync_batchnorm_breaks_the_graph(cuda_compile_results) -> None:
    """The lead of docs/sync.md: if this fails, torch's SyncBatchNorm compiles cleanly now; update the docs."""
    for r in cuda_compile_results:
        assert r["torch"]["error"] is None, r["torch"]["error"]
        counters = r["torch"]["counters"]
        broke = bool(counters.get("graph_break")) or counters["stats"]["unique_graphs"] > 1
        assert broke and r["torch_fullgraph"] is not None, (torch.__version__, counters, r["torch_fullgraph"])
        for out_diff, _ in r["torch"]["diffs"]:
            assert out_diff < 1e-5


# ---- recalibration ----------------------------------------------------------------------------------------------


def _recalibration_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recalibrate_on_cuda_equals_cpu(dtype) -> None:
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 3, 8, 8, generator=g) * 2 + 1).to(dtype) for _ in range(4)]
    cpu_model = _recalibration_model().to(dtype)
    cuda_model = copy.deepcopy(cpu_model).to(DEVICE)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 convolutions as on CPU
    try:
        recalibrate_bn(cpu_model, batches)
        recalibrate_bn(cuda_model, batches)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    cpu_buffers = dict(cpu_model.named_buffers())
    for name, buffer in cuda_model.named_buffers():
        assert buffer.device.type == DEVICE
        torch.testing.assert_close(buffer.cpu(), cpu_buffers[name], **tol, msg=name)
    # the statistics changed (so the comparison is not of two untouched buffers)
    assert not torch.allclose(cpu_buffers["1.running_var"], torch.ones(8, dtype=dtype))


# ---- LayerStatsMonitor ------------------------------------------------------------------------------------------


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.unscaled_norms: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x).mean((2, 3)))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning unscales AMP gradients before this hook: these are the unscaled gradients' norms, by hand.
        norms = {n: p.grad.double().norm().item() for n, p in self.named_parameters() if p.grad is not None}
        self.unscaled_norms.append(norms)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _cuda_loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    """Batches already on the GPU: no host-to-device copy in a step (such a copy synchronizes)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 8, 8, generator=g).to(DEVICE)
    y = torch.randint(0, 4, (n,), generator=g).to(DEVICE)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class _SyncGuard(L.Callback):
    """Host synchronizations are errors from the start of every non-logging step to its end.

    Two instances: ``start`` first among the callbacks (before the monitor's hooks of the batch start), ``stop``
    last (after the monitor's hooks of the batch end).
    """

    def __init__(self, role: str, every: int) -> None:
        self.role, self.every, self.guarded = role, every, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.role == "start" and trainer.global_step % self.every != 0:
            torch.cuda.set_sync_debug_mode("error")
            self.guarded += 1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.role == "stop":
            torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        torch.cuda.set_sync_debug_mode("default")


def test_sync_debug_mode_catches_a_host_read() -> None:
    """Control: the guard's mode does turn a host read into an error on this machine."""
    x = torch.ones(2, device=DEVICE)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            x.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("with_monitor", [True, False], ids=["monitor", "no_monitor"])
def test_monitor_makes_no_host_sync_on_other_steps(with_monitor) -> None:
    every = 4
    start, stop = _SyncGuard("start", every), _SyncGuard("stop", every)
    monitor = LayerStatsMonitor(log_every_n_steps=every, heatmap_every_n_logs=None)
    callbacks = [start, monitor, stop] if with_monitor else [start, stop]
    model = Net()
    trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, max_steps=9, callbacks=callbacks, **QUIET)
    trainer.fit(model, _cuda_loader(n=72))
    assert start.guarded == 6  # steps 1-3 and 5-7
    if with_monitor:
        assert monitor.collected_steps == [0, 4, 8]
        assert monitor.last_metrics["act/std/net.1"] > 0


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_amp_gradient_norms_are_unscaled(precision) -> None:
    figures = {}
    models = {}
    for run in ("32-true", precision):
        model = Net()
        monitor = LayerStatsMonitor(log_every_n_steps=1, heatmap_every_n_logs=None)
        L.Trainer(accelerator=ACCELERATOR, devices=1, max_steps=1, precision=run, callbacks=[monitor], **QUIET).fit(
            model, _cuda_loader()
        )
        figures[run], models[run] = monitor.last_metrics, model
    hand = models[precision].unscaled_norms[0]
    assert hand
    for name, norm in hand.items():
        assert figures[precision][f"grad/norm/{name}"] == pytest.approx(norm, rel=1e-5), name
        # and it is the full-precision figure (16-mixed's loss scale, 65536 at the start, is divided out)
        full = figures["32-true"][f"grad/norm/{name}"]
        assert figures[precision][f"grad/norm/{name}"] == pytest.approx(full, rel=0.1), name


def test_compiled_model_with_the_monitor_on_cuda() -> None:
    model = Net()
    monitor = LayerStatsMonitor(log_every_n_steps=2, heatmap_every_n_logs=None)
    trainer = L.Trainer(accelerator=ACCELERATOR, devices=1, max_steps=5, callbacks=[monitor], **QUIET)
    trainer.fit(torch.compile(model), _cuda_loader())
    assert monitor.collected_steps == [0, 2, 4]
    for key in ("act/std/net.1", "act_grad/rms/head", "grad/norm/head.weight", "bn/mean_shift/net.1"):
        assert key in monitor.last_metrics and math.isfinite(monitor.last_metrics[key]), key
