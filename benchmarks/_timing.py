"""The timer the micro-benchmarks share: median CPU and wall time of one call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median CPU and wall milliseconds of ``fn()`` over ``repeats`` calls, after ``warmup`` calls.

    CPU time is the process's (one torch thread): unlike the wall clock, not inflated by other work on a shared
    machine."""
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)
