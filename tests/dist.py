"""Run a function in N real processes over gloo on 127.0.0.1, with a free port and a bounded time.

Every multi-process test in the project goes through :func:`run_distributed`. The function must be defined at
module level (it is pickled into spawned processes) and is called as ``fn(rank, world_size, *args)``; what it
returns comes back in rank order (serialized with ``torch.save``, so tensors and plain containers are fine).

With ``init_process_group=False`` the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``NODE_RANK``) is still set, so a Lightning ``Trainer(strategy="ddp", devices=N)`` inside ``fn``
joins the group as if launched by torchrun, without launching processes of its own.

Each process ends by destroying the process group while its interpreter is fully alive (after a barrier, when ``fn``
succeeded), and must exit with code 0: a process that reports its result and then crashes or hangs at exit fails
the run, as does one that dies without reporting.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(rank: int, world_size: int, port: int, node_rank: int = 0, local_rank: int | None = None) -> dict:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world_size),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
        "NODE_RANK": str(node_rank),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _child(fn: Callable, rank: int, world_size: int, port: int, init: bool, args: tuple, out: Any) -> None:
    os.environ.update(dist_env(rank, world_size, port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        if init:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)
        if torch.distributed.is_initialized():
            # Every rank past fn before any tears down: rank 0's process hosts the TCPStore, which a slower rank may
            # still need (the rendezvous of a group it creates with new_group, say).
            torch.distributed.barrier()
            _destroy_process_group()
        out.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        _destroy_process_group()


def _destroy_process_group() -> None:
    """Destroy the default group (if any) now, not at interpreter shutdown.

    Neither torch nor Lightning destroys a gloo group at exit. Left to finalization, a gloo worker thread that drops
    the last reference to a finished collective decrefs a Python object after finalization has begun; Python ends that
    thread inside a C++ destructor and the process aborts ("terminate called without an active exception").
    """
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int = 2, *args: Any, timeout: float = 120.0, init_process_group: bool = True
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the results in rank order.

    Raises:
        RuntimeError: a process raised (its traceback is in the message), died without reporting a result, did not
            exit cleanly (code 0, within ``_EXIT_TIMEOUT`` seconds) after reporting, or the run did not finish within
            ``timeout``.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, port, init_process_group, args, out), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        results = _collect(fn.__name__, procs, out, timeout)
        _wait_for_clean_exits(fn.__name__, procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    return [results[r] for r in range(world_size)]


# How long a process may take to exit once it has reported its result (barrier, group destroyed, interpreter shut
# down): generous for a loaded machine, and bounded, so that a hang or a crash at exit fails the run.
_EXIT_TIMEOUT = 60.0
# After the first failure (an error reported, or a process dead without a report), how long the others get to report
# theirs: their peer is gone, so they fail soon, and the first message to arrive is not always the cause.
_GRACE = 5.0
_POLL = 0.5


def _collect(name: str, procs: list, out: Any, timeout: float) -> dict[int, Any]:
    """Every rank's result from ``out``; raises with every rank's error when any failed, was lost or ran too long."""
    deadline = time.monotonic() + timeout
    reported: dict[int, tuple[bool, Any]] = {}
    first_failure: float | None = None
    while len(reported) < len(procs):
        try:
            rank, ok, payload = out.get(timeout=_POLL)
            reported[rank] = (ok, payload)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        # A process that has exited flushed what it put before exiting, so one more empty poll means it is lost.
        lost = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
        failing = bool(lost) or not all(ok for ok, _ in reported.values())
        if not failing:
            first_failure = None
        elif first_failure is None:
            first_failure = now
        if failing and now - first_failure > _GRACE:
            break
        if not failing and now > deadline:
            waiting = [r for r in range(len(procs)) if r not in reported]
            raise RuntimeError(f"distributed run of {name} did not finish within {timeout}s (no result from ranks "
                               f"{waiting})")
    errors = [f"rank {r}:\n{payload}" for r, (ok, payload) in reported.items() if not ok]  # in the order they came
    for r, p in enumerate(procs):
        if r not in reported:
            state = "still running" if p.exitcode is None else f"exited with code {p.exitcode}"
            errors.append(f"rank {r}: no result ({state})")
    if errors:
        raise RuntimeError(f"distributed run of {name} failed\n" + "\n".join(errors))
    return {r: torch.load(io.BytesIO(payload), weights_only=False) for r, (_, payload) in reported.items()}


def _wait_for_clean_exits(name: str, procs: list) -> None:
    deadline = time.monotonic() + _EXIT_TIMEOUT
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    bad = [f"rank {r}: {'still running' if p.exitcode is None else f'code {p.exitcode}'}" for r, p in enumerate(procs)
           if p.exitcode != 0]
    if bad:
        raise RuntimeError(
            f"distributed run of {name}: every rank reported its result, but not every process exited cleanly within "
            f"{_EXIT_TIMEOUT}s ({'; '.join(bad)})"
        )
