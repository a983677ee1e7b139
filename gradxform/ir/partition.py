"""Optimal linear partition: cut a sequence of costs into contiguous stages.

Minimises the most expensive stage (the pipeline's bottleneck) exactly, by dynamic programming over
the allowed cut positions; among partitions with that bottleneck, chooses the one sending the fewest
bytes across stage boundaries. Pure Python + NumPy, so it can be property-tested on its own.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def partition(weights: Sequence[float], candidates: Sequence[int], stages: int,
              cross: Sequence[float] | None = None, last: float = 1.0) -> list[int]:
    """Choose ``stages - 1`` cuts among ``candidates``.

    ``weights[i]`` is the cost of unit ``i``; a cut ``c`` puts units ``< c`` before it and the rest
    after (``0 < c < len(weights)``). ``cross[k]`` is the tie-breaking cost of using
    ``candidates[k]``. ``last`` scales the last stage's cost: under a schedule whose other stages
    recompute their forward in backward (PETRA) the last stage does less per unit of work. Every stage must have positive cost: a stage that only reads sizes does no
    work and would only add a hop. Returns the chosen cuts in increasing order; raises ValueError
    when no such partition exists.
    """
    n = len(weights)
    cands = sorted(set(int(c) for c in candidates if 0 < c < n))
    if stages < 1:
        raise ValueError("stages must be at least 1")
    if stages - 1 > len(cands):
        raise ValueError(f"{stages} stages need {stages - 1} cuts, only {len(cands)} allowed")
    if stages == 1:
        return []
    w = np.asarray(weights, dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(w)])
    working = np.concatenate([[0], np.cumsum(w > 0)])  # counted, not summed: tiny costs still count
    points = np.array([0] + cands + [n])        # boundary k sits at unit points[k]
    m = len(points)
    seg = prefix[points][None, :] - prefix[points][:, None]   # seg[k, j]: units points[k]..points[j]
    idle = working[points][None, :] - working[points][:, None] <= 0
    inf = np.inf
    seg[:, -1] *= last                          # only the last stage ends at the last unit
    seg[idle | np.tri(m, dtype=bool)] = inf     # stages run forwards and each does some work
    # Phase 1: the minimal bottleneck. best[j] = min over partitions of 0..points[j] into s stages.
    best = np.where(np.arange(m) > 0, seg[0], inf)
    best[0] = inf
    for _ in range(stages - 1):
        best = np.maximum(best[:, None], seg).min(axis=0)
    bottleneck = best[-1]
    if not np.isfinite(bottleneck):
        raise ValueError(f"no partition into {stages} stages gives every stage some work")
    # Phase 2: fewest crossing bytes among partitions whose every stage is within the bottleneck.
    tol = 1e-9 * max(1.0, abs(bottleneck))
    fits = seg <= bottleneck + tol
    cost_at = np.zeros(m)
    if cross is not None:
        cross_at = dict(zip((int(c) for c in candidates), cross))
        cost_at[1:-1] = [cross_at[c] for c in cands]
    total = np.where(fits[0], 0.0, inf)
    total[0] = inf
    choice = []
    for _ in range(stages - 1):
        cand = np.where(fits, total[:, None] + cost_at[:, None], inf)
        choice.append(cand.argmin(axis=0))
        total = cand.min(axis=0)
    cuts, j = [], m - 1
    for back in reversed(choice):
        j = int(back[j])
        cuts.append(int(points[j]))
    return sorted(cuts)


def stage_costs(weights: Sequence[float], cuts: Sequence[int], last: float = 1.0) -> list[float]:
    bounds = [0, *cuts, len(weights)]
    costs = [float(sum(weights[a:b])) for a, b in zip(bounds, bounds[1:])]
    costs[-1] *= last
    return costs
