"""How many threads a process gradxform starts should use."""

from __future__ import annotations

import os


def threads(processes: int = 1) -> tuple[int, str]:
    """Threads per process: the cores this process may use that are not already busy (1-minute load),
    shared among the ``processes`` gradxform runs, at least 1; ``OMP_NUM_THREADS`` wins when set.
    Oversubscribed cores make PyTorch's threads spin against each other: on a loaded 2-core machine two
    threads ran a training epoch up to 20x slower than one. Returns (threads, why)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, cores - int(load + 0.5))
    return max(1, free // processes), f"{cores} cores, load {load:.1f}, {processes} process(es)"


def set_threads(processes: int = 1) -> str:
    """Set torch's threads for this process (see :func:`threads`); the line to tell the user."""
    import torch

    n, why = threads(processes)
    torch.set_num_threads(n)
    return f"threads: {n} per process ({why}; set OMP_NUM_THREADS to choose)"
