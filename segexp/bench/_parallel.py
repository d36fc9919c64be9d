"""What a process pool can give on this machine, as the reference for the stages' 1 -> 2 process figures.

Why: a stage that scales 1.6x from 1 to 2 processes is slow only if the machine could do better. A VM's
two vCPUs may share one physical core, or its clock may drop with both busy, so the stages' speed-up is
reported beside the speed-up of a task with no memory traffic and no I/O, and beside the fixed cost of
starting a spawn pool (each worker imports torch), which a short run pays in full.
"""

from __future__ import annotations

import multiprocessing
import time

__all__ = ["cpu_ceiling", "spawn_startup_seconds"]


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def _import_torch() -> None:
    import torch  # noqa: F401  (what a stage worker imports first)


def cpu_ceiling(tasks: int = 6, work: int = 2_000_000) -> dict:
    """Speed-up from 1 to 2 processes of a pure-Python loop (the machine's own ceiling)."""
    t0 = time.perf_counter()
    for _ in range(tasks):
        _spin(work)
    one = time.perf_counter() - t0
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(_spin, [1, 1])  # start-up not timed
        t0 = time.perf_counter()
        pool.map(_spin, [work] * tasks, chunksize=1)
        two = time.perf_counter() - t0
    return {
        "ceiling_1proc_s": round(one, 3),
        "ceiling_2proc_s": round(two, 3),
        "ceiling_speedup": round(one / two, 2),
    }


def spawn_startup_seconds(processes: int = 2) -> float:
    """Seconds from creating a spawn pool to every worker having imported torch."""
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.starmap(_import_torch, [()] * processes, chunksize=1)
        return round(time.perf_counter() - t0, 3)
