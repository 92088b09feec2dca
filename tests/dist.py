"""Run a function in N real processes over gloo on 127.0.0.1, with a free port and a bounded time.

Every multi-process test in the project goes through :func:`run_distributed`. The function must be defined at
module level (it is pickled into spawned processes) and is called as ``fn(rank, world_size, *args)``; what it
returns comes back in rank order (serialized with ``torch.save``, so tensors and plain containers are fine).

With ``init_process_group=False`` the environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``NODE_RANK``) is still set, so a Lightning ``Trainer(strategy="ddp", devices=N)`` inside ``fn``
joins the group as if launched by torchrun, without launching processes of its own.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import socket
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
        out.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        out.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int = 2, *args: Any, timeout: float = 120.0, init_process_group: bool = True
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the results in rank order.

    Raises:
        RuntimeError: a process raised (its traceback is in the message) or did not finish within ``timeout``.
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
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = out.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"distributed run of {fn.__name__} did not finish within {timeout}s") from None
            if ok:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
