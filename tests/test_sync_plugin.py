"""SyncNormPlugin: apply/revert on bare modules, and real training with Lightning over gloo (2 processes, and 2
nodes launched by torchrun)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from examples.cnn import CNN, DigitsDataModule
from lightning_bn.callbacks import NormSwap
from lightning_bn.layers import (
    BatchNormChannelsLast,
    BatchNormNd,
    BatchRenorm,
    FrozenBatchNorm,
    GhostBatchNorm,
    SyncBatchNorm,
    is_batch_norm,
)
from lightning_bn.plugins import SyncNormPlugin
from tests.dist import free_port, run_distributed

REPO = Path(__file__).resolve().parents[1]


class OwnForwardBN(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class Net(nn.Module):
    """Every batch-norm kind the plugin meets, one shared twice, and layers it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1d = nn.BatchNorm1d(4)
        self.shared = nn.BatchNorm2d(4, momentum=0.3)
        self.again = self.shared
        self.last = BatchNormChannelsLast(4)
        self.nd = BatchNormNd(4, affine=False)
        self.torch_sync = nn.SyncBatchNorm(4)
        self.renorm = BatchRenorm(4, warmup_steps=0)
        self.ghost = GhostBatchNorm(4, virtual_batch_size=2)
        self.frozen = FrozenBatchNorm(4)
        self.own = OwnForwardBN(4)
        self.already = SyncBatchNorm(4)
        self.inst = nn.InstanceNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 4, H, W)
        y = self.shared(x) + self.again(x) + self.nd(x) + self.torch_sync(x)
        y = y + self.renorm(x) + self.ghost(x) + self.frozen(x) + self.own(x)
        y = y + self.already(x) + self.inst(x) + self.block(x)
        y = y + self.last(x.movedim(1, -1)).movedim(-1, 1)
        return y + self.bn1d(x.mean((2, 3)))[:, :, None, None]


def _snapshot(model: nn.Module) -> dict:
    return {
        "modules": {name: m for name, m in model.named_modules()},
        "params": {name: p for name, p in model.named_parameters()},
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "keys": list(model.state_dict()),
    }


def test_apply_converts_every_kind_and_revert_restores_the_same_objects() -> None:
    model = Net()
    model.renorm.sync_stats = False  # set by the user before: revert must restore it, not delete it
    before = _snapshot(model)
    fired: list[str] = []
    model.shared.register_forward_hook(lambda m, i, o: fired.append(type(m).__name__))
    plugin = SyncNormPlugin()
    with pytest.warns(UserWarning, match=r"own \(.*OwnForwardBN\)"):
        assert plugin.apply(model) is model

    kinds = {name: type(m) for name, m in model.named_children()}
    for name in ("bn1d", "shared", "last", "nd", "torch_sync"):
        assert kinds[name] is SyncBatchNorm, name
    assert model.again is model.shared  # a layer used twice is converted once
    assert model.last.layout == "channels_last" and model.shared.layout == "channels_first"
    assert model.shared.momentum == 0.3 and model.nd.weight is None
    assert isinstance(model.block[1], SyncBatchNorm) and model.block[1].running_mean is None
    assert (kinds["renorm"], kinds["ghost"], kinds["frozen"], kinds["own"]) == (
        BatchRenorm, GhostBatchNorm, FrozenBatchNorm, OwnForwardBN
    )
    assert model.renorm.sync_stats and model.ghost.sync_stats
    assert model.already is before["modules"]["already"] and model.inst is before["modules"]["inst"]
    # The very same Parameter objects (what the optimizer holds) and the same state_dict keys.
    assert all(p is before["params"][n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == before["keys"]

    # Training changes buffers, momentum and mode; a move to float64 replaces the buffer tensors.
    x = torch.randn(6, 4, 3, 3)
    model(x)
    assert fired == ["SyncBatchNorm", "SyncBatchNorm"]  # the user's hook came along (the layer is called twice)
    model.shared.momentum = 0.5
    model.double().eval()
    trained = {n: b.clone() for n, b in model.named_buffers()}

    assert plugin.revert(model) is model
    for name, module in model.named_modules():
        assert module is before["modules"][name], name
    assert type(model.shared) is nn.BatchNorm2d and type(model.torch_sync) is nn.SyncBatchNorm
    assert type(model.last) is BatchNormChannelsLast and type(model.nd) is BatchNormNd
    assert all(p is before["params"][n] for n, p in model.named_parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for name, buf in model.named_buffers():
        assert buf.dtype == trained[name].dtype
        torch.testing.assert_close(buf, trained[name], atol=0, rtol=0)
    assert not torch.equal(model.shared.running_mean.float(), before["buffers"]["shared.running_mean"])
    assert model.shared.momentum == 0.5 and not model.shared.training and not model.bn1d.training
    assert model.renorm.__dict__["sync_stats"] is False  # the user's own value, back
    assert "sync_stats" not in model.ghost.__dict__ and "sync_group" not in model.renorm.__dict__
    assert list(model.state_dict()) == before["keys"]
    model.double()(x.double())
    assert fired[-2:] == ["BatchNorm2d", "BatchNorm2d"]  # the hook is on the original layer still


def test_apply_failure_leaves_the_model_unchanged() -> None:
    root = nn.BatchNorm2d(4)
    root.add_module("inner", BatchRenorm(4))
    with pytest.raises(ValueError, match=r"`model` is itself a batch-norm layer \(BatchNorm2d\)"):
        SyncNormPlugin().apply(root)
    assert type(root) is nn.BatchNorm2d and "sync_stats" not in root.inner.__dict__


def test_apply_twice_and_pickle() -> None:
    model = Net()
    original = model.shared
    plugin = SyncNormPlugin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin.apply(model)
        clone = pickle.loads(pickle.dumps(plugin))  # as ddp_spawn sends it: without this process's records
        plugin.apply(model)  # a second apply without revert must not lose the originals
    assert clone._records == [] and isinstance(model.shared, SyncBatchNorm)
    plugin.revert(model)
    assert model.shared is original


def test_sync_batchnorm_flag_conflict_says_what_to_do() -> None:
    with pytest.raises(MisconfigurationException, match=r"sync_batchnorm=True.*SyncNormPlugin.*Choose one"):
        L.Trainer(accelerator="cpu", sync_batchnorm=True, plugins=[SyncNormPlugin()], logger=False)


# ---- real training: 2 processes over gloo, Lightning's DDP -------------------------------------------------------


class _Watch(L.Callback):
    """Records the classes of the norm layers while training runs (after SyncNormPlugin.apply)."""

    def __init__(self) -> None:
        self.classes: dict[str, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if batch_idx == 0:
            self.classes = _classes(pl_module)


def _classes(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if is_batch_norm(m)}


def _stats(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    return {
        n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for n, m in model.named_modules()
        if is_batch_norm(m)
    }


def _fit(plugins: list, callbacks: list, model: CNN) -> _Watch:
    watch = _Watch()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", plugins=plugins, callbacks=[*callbacks, watch], max_steps=3,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=24))
    return watch


def _lightning_ddp(rank: int, world_size: int) -> dict:
    out: dict = {}
    # 1. SyncNormPlugin on the CNN, with a batch renorm and a ghost batch norm among the batch norms, and the stem's
    #    batch norm swapped to "sync_batch" by NormSwap at setup (the plugin leaves that one alone).
    L.seed_everything(0)
    model = CNN(norm="batch", width=8)
    model.model.layer1.bn2 = BatchRenorm(8, warmup_steps=0)
    model.model.layer2.bn2 = GhostBatchNorm(16, virtual_batch_size=8)
    modules_before = dict(model.named_modules())
    params_before = dict(model.named_parameters())
    swapped = "model.stem.1"
    swap = NormSwap(to="sync_batch", include=swapped, verbose=False)
    watch = _fit([SyncNormPlugin()], [swap], model)
    out["plugin"] = {
        "during": watch.classes,
        "after": _classes(model),
        "same_modules": all(m is modules_before[n] for n, m in model.named_modules() if not n.startswith(swapped)),
        "same_params": all(p is params_before[n] for n, p in model.named_parameters() if not n.startswith(swapped)),
        "flags_left": [n for n, m in model.named_modules() if "sync_stats" in m.__dict__],
        "stats": _stats(model),
    }
    # 2. Control: the same training without the plugin (each process's statistics are its own).
    L.seed_everything(0)
    model = CNN(norm="batch", width=8)
    _fit([], [], model)
    out["plain"] = {"stats": _stats(model)}
    return out


def _assert_same_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(a[name][1], b[name][1], atol=0, rtol=0, msg=name)
        assert a[name][2] == b[name][2] == 3


def test_lightning_ddp_two_processes() -> None:
    r0, r1 = run_distributed(_lightning_ddp, 2, timeout=240, init_process_group=False)
    for r in (r0, r1):
        during, after = r["plugin"]["during"], r["plugin"]["after"]
        assert during["model.layer1.bn1"] == during["model.layer2.shortcut.1"] == "SyncBatchNorm"
        assert during["model.layer1.bn2"] == "BatchRenorm" and during["model.layer2.bn2"] == "GhostBatchNorm"
        assert during["model.stem.1"] == after["model.stem.1"] == "SyncBatchNorm"  # NormSwap's, kept
        assert after["model.layer1.bn1"] == after["model.layer2.bn1"] == after["model.layer2.shortcut.1"]
        assert after["model.layer1.bn1"] == "BatchNorm2d"
        assert after["model.layer1.bn2"] == "BatchRenorm" and after["model.layer2.bn2"] == "GhostBatchNorm"
        assert r["plugin"]["same_modules"] and r["plugin"]["same_params"] and r["plugin"]["flags_left"] == []
    # Synchronized: bit-identical running statistics on both processes, for every kind.
    _assert_same_stats(r0["plugin"]["stats"], r1["plugin"]["stats"])
    # Without synchronization they differ (each process saw its own batches), so the checks above can fail.
    plain0, plain1 = r0["plain"]["stats"], r1["plain"]["stats"]
    assert all(not torch.equal(plain0[n][0], plain1[n][0]) for n in plain0)


# ---- real training: 2 nodes x 1 process, launched by torchrun ---------------------------------------------------


def _stop_torchrun(proc: subprocess.Popen) -> str:
    """Stop a torchrun agent and return the rest of its output. SIGTERM first: the agent then stops its worker, which
    runs in a session of its own that a SIGKILL of the agent would leave behind."""
    proc.terminate()
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def test_two_nodes_with_torchrun(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                str(REPO / "tests" / "_sync_multinode_script.py"), str(tmp_path),
            ],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    deadline = time.monotonic() + 180
    logs, timed_out = [], False
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:  # stop it and report its log, not a bare timeout
                timed_out = True
                logs.append(_stop_torchrun(p))
    finally:
        for p in procs:
            if p.poll() is None:
                _stop_torchrun(p)
    if timed_out:
        pytest.fail("the nodes did not finish within 180 s\n" + "\n".join(
            f"--- node {node}:\n{log[-4000:]}" for node, log in enumerate(logs)))
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node} failed:\n{log[-4000:]}"
    n0, n1 = (torch.load(tmp_path / f"node{i}.pt", weights_only=False) for i in (0, 1))
    assert (n0["node_rank"], n0["global_rank"], n0["world_size"]) == (0, 0, 2)
    assert (n1["node_rank"], n1["global_rank"], n1["world_size"]) == (1, 1, 2)
    for n in (n0, n1):
        assert set(n["classes_during"].values()) == {"SyncBatchNorm"}
        assert set(n["classes_after"].values()) == {"BatchNorm2d"}
    assert n0["stats"].keys() == n1["stats"].keys() and len(n0["stats"]) == 6
    for name in n0["stats"]:
        m0, v0, k0 = n0["stats"][name]
        m1, v1, k1 = n1["stats"][name]
        torch.testing.assert_close(m0, m1, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(v0, v1, atol=0, rtol=0, msg=name)
        assert k0 == k1 == 2
        assert not torch.equal(m0, torch.zeros_like(m0))  # trained: the statistics moved


# ---- real training: strategy="ddp_spawn" (Lightning launches the processes) --------------------------------------


class _DumpAtTrainEnd(L.Callback):
    """Writes each process's layer classes and running statistics before teardown (the plugin's revert)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {"classes": _classes(pl_module), "stats": _stats(pl_module)}
        torch.save(state, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class _DestroyGroupAtTeardown(L.Callback):
    """Destroys the default group in each spawned process after the fit, the last thing Lightning does there.

    Lightning leaves a gloo group to interpreter shutdown, where a gloo worker thread can abort the process
    ("terminate called without an active exception"; see tests/_sync_multinode_script.py). A ddp_spawn user has no
    code after ``fit`` in the spawned processes, so a callback's ``teardown`` is the place.
    """

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_ddp_spawn(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = CNN(norm="batch", width=8)
    modules_before = dict(model.named_modules())
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", plugins=[SyncNormPlugin()], max_steps=2,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[_DumpAtTrainEnd(str(tmp_path)), _DestroyGroupAtTeardown()],
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert set(r0["classes"].values()) == set(r1["classes"].values()) == {"SyncBatchNorm"}
    for name in r0["stats"]:
        torch.testing.assert_close(r0["stats"][name][0], r1["stats"][name][0], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(r0["stats"][name][1], r1["stats"][name][1], atol=0, rtol=0, msg=name)
    # The launching process gets the trained weights back into its own, never-converted layers.
    assert all(m is modules_before[n] for n, m in model.named_modules())
    assert set(_classes(model).values()) == {"BatchNorm2d"}
    for name, (mean, _var, steps) in _stats(model).items():
        torch.testing.assert_close(mean, r0["stats"][name][0], atol=0, rtol=0, msg=name)
        assert steps == 2
