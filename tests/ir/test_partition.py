"""The optimal linear partition, against brute force (hypothesis)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradxform.ir.partition import partition, stage_costs


@st.composite
def problems(draw):
    n = draw(st.integers(2, 10))
    weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.25, 100.0]) | st.floats(0, 100),
                            min_size=n, max_size=n))
    cands = sorted(draw(st.sets(st.integers(1, n - 1), min_size=0, max_size=n - 1)))
    stages = draw(st.integers(1, len(cands) + 1))
    cross = draw(st.lists(st.integers(0, 9), min_size=len(cands), max_size=len(cands)))
    return weights, cands, stages, cross


@settings(max_examples=300, deadline=None)
@given(problems())
def test_bottleneck_is_minimal_and_ties_go_to_fewest_bytes(problem):
    weights, cands, stages, cross = problem
    options = [c for c in itertools.combinations(cands, stages - 1)
               if stages == 1 or min(stage_costs(weights, c)) > 0]
    if not options:  # every partition leaves some stage without work
        with pytest.raises(ValueError, match="some work"):
            partition(weights, cands, stages, cross)
        return
    cuts = partition(weights, cands, stages, cross)
    assert len(cuts) == stages - 1 and set(cuts) <= set(cands) and cuts == sorted(set(cuts))
    best = min(max(stage_costs(weights, c)) for c in options)
    got = max(stage_costs(weights, cuts))
    assert got <= best + 1e-9 * max(1, best)
    byte_cost = dict(zip(cands, cross))
    fewest = min(sum(byte_cost[x] for x in c) for c in options
                 if max(stage_costs(weights, c)) <= best + 1e-9 * max(1, best))
    assert sum(byte_cost[x] for x in cuts) == fewest


def test_too_many_stages():
    with pytest.raises(ValueError, match="only 2 allowed"):
        partition([1, 1, 1, 1], [1, 2], 4)


def test_single_stage_has_no_cuts():
    assert partition([1, 2, 3], [1, 2], 1) == []


@settings(max_examples=200, deadline=None)
@given(problems(), st.sampled_from([0.5, 0.75, 1.0]))
def test_a_cheaper_last_stage_is_weighed_as_such(problem, last):
    """With the last stage's cost scaled (PETRA: it does not recompute), the bottleneck of the scaled
    costs is still minimal against brute force."""
    weights, cands, stages, cross = problem
    options = [c for c in itertools.combinations(cands, stages - 1)
               if stages == 1 or min(stage_costs(weights, c)) > 0]
    if not options:
        return
    cuts = partition(weights, cands, stages, cross, last=last)
    best = min(max(stage_costs(weights, c, last)) for c in options)
    assert max(stage_costs(weights, cuts, last)) <= best + 1e-9 * max(1, best)


def test_the_last_stage_takes_more_when_it_costs_less():
    # eight equal units in two stages: 4 | 4 (bottleneck 4); with the last stage at 3/4 of the cost,
    # 3 | 5 has the bottleneck max(3, 3.75) = 3.75 and wins
    assert partition([1.0] * 8, range(1, 8), 2) == [4]
    assert partition([1.0] * 8, range(1, 8), 2, last=0.75) == [3]
