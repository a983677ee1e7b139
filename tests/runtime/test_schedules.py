"""Tick tables of every schedule, without processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradxform.errors import PipelineError
from gradxform.runtime.schedules import SCHEDULES, make_schedule
from gradxform.runtime.schedules.ticks import delay

ASYNC = sorted(n for n, cls in SCHEDULES.items() if cls.family == "asynchronous")
SCHEDULE_NAMES = sorted(SCHEDULES)


def build(name, stages, micro_batches, accumulate=1):
    """The tick table of schedule ``name``, accumulating ``accumulate`` backwards where it can."""
    schedule = make_schedule(name)
    if hasattr(schedule.options, "accumulate"):
        schedule = make_schedule(name, accumulate=accumulate)
    return schedule.ticks(stages, micro_batches)


def in_flight(table):
    return table.in_flight()


def when(schedule, kind):
    """{(stage, micro-batch): tick} of every action of a kind."""
    return {(j, a.micro_batch): t for t, row in enumerate(schedule.ticks) for j, acts in enumerate(row)
            for a in acts if a.kind == kind}


@pytest.mark.parametrize("name", ASYNC)
def test_async_family_tick_table(name):
    J, M = 4, 10
    s = build(name, J, M)
    fwd, bwd = when(s, "forward"), when(s, "backward")
    for j in range(J):
        for b in range(M):
            assert fwd[(j, b)] == b + j                       # stage j forwards micro-batch t - j
            assert bwd[(j, b)] == b + 2 * (J - 1) - j         # and backwards t - 2(J-1) + j
            assert bwd[(j, b)] - fwd[(j, b)] == delay(j, J)
    assert [delay(j, J) for j in range(J)] == [6, 4, 2, 0]
    assert in_flight(s) == [6, 4, 2, 0]                       # FIFO depth 2(J-1-j)
    assert len(s.ticks) == M + 2 * (J - 1)


def test_petra_steady_state_has_every_stage_busy():
    s = build("petra", 4, 20)
    for t in range(6, 20):  # after the pipeline fills, every stage forwards and backwards each tick
        for j in range(4):
            kinds = {a.kind for a in s.ticks[t][j]}
            assert {"forward", "backward"} <= kinds


def test_updates_every_k_backwards_per_stage():
    s = build("petra", 3, 7, accumulate=3)
    for j in range(3):
        acts = [a for _, a in s.actions(j)]
        kinds = "".join("U" if a.kind == "update" else ("B" if a.kind == "backward" else "") for a in acts)
        assert kinds == "BBBUBBBUBU"  # the last, partial group is flushed at the end


def test_gpipe_bubble():
    J, M = 4, 8
    s = build("gpipe", J, M)
    fwd, bwd = when(s, "forward"), when(s, "backward")
    assert max(fwd.values()) < min(bwd.values())              # every forward before any backward
    assert s.busy_fraction() == pytest.approx(M / (M + J - 1))  # bubble (J-1)/(M+J-1)
    assert in_flight(s) == [M] * J
    assert all(a.kind == "update" for a in s.ticks[-1][0][-1:])


def test_1f1b_keeps_fewer_in_flight_with_the_same_bubble():
    J, M = 4, 8
    s = build("1f1b", J, M)
    assert in_flight(s) == [J - j for j in range(J)]
    assert s.busy_fraction() == pytest.approx(build("gpipe", J, M).busy_fraction())


def test_backprop_runs_one_stage_at_a_time():
    s = build("backprop", 3, 2, accumulate=2)
    assert all(sum(1 for acts in row if any(a.kind != "update" for a in acts)) == 1 for row in s.ticks)
    assert [repr(a) for _, a in s.actions(0)] == ["F0", "B0", "F1", "B1", "U"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCHEDULE_NAMES), st.integers(1, 5), st.integers(1, 9), st.integers(1, 4))
def test_every_schedule_respects_message_order(name, J, M, k):
    s = build(name, J, M, k)
    fwd, bwd = when(s, "forward"), when(s, "backward")
    assert sorted(fwd) == sorted(bwd) == [(j, b) for j in range(J) for b in range(M)]
    for j in range(J):
        for b in range(M):
            if j > 0:
                assert fwd[(j, b)] > fwd[(j - 1, b)]          # input sent at an earlier tick
            if not SCHEDULES[name].layout.backward:
                assert bwd[(j, b)] == fwd[(j, b)]             # no message from downstream: at once
            elif j < J - 1:
                assert bwd[(j, b)] > bwd[(j + 1, b)]          # gradient sent at an earlier tick
            else:
                assert bwd[(j, b)] >= fwd[(j, b)]
    for j in range(J):
        acts = [a for _, a in s.actions(j)]
        assert acts[-1].kind == "update"                      # nothing left unapplied


def test_local_stages_never_wait_for_a_later_stage():
    J, M = 4, 6
    s = build("local", J, M, accumulate=2)
    fwd, bwd = when(s, "forward"), when(s, "backward")
    for j in range(J):
        for b in range(M):
            assert fwd[(j, b)] == bwd[(j, b)] == b + j           # forward and local backward in one tick
    assert [repr(a) for _, a in s.actions(1)] == ["F0", "B0", "F1", "B1", "U", "F2", "B2", "F3", "B3", "U",
                                                   "F4", "B4", "F5", "B5", "U"]
    assert len(s.ticks) == M + J - 1
    assert in_flight(s) == [0, 0, 0, 0]                        # nothing held from one tick to the next
    assert s.busy_fraction() == pytest.approx(J * M / (J * (M + J - 1)))


def test_forward_grad_has_the_backprop_tick_table():
    a, b = build("forward-grad", 3, 4, accumulate=2), build("backprop", 3, 4, accumulate=2)
    assert a.ticks == b.ticks and a.name == "forward-grad"


def test_schedule_options():
    s = make_schedule("forward-grad{guess=random, tangents=4,combine=mean}")
    assert (s.name, s.options.guess, s.options.tangents, s.options.combine) == ("forward-grad", "random", 4, "mean")
    assert s.describe() == "forward-grad{guess=random,tangents=4,combine=mean}"
    assert make_schedule("petra").describe() == "petra"
    assert make_schedule("1f1b{micro_batches=2}").options.micro_batches == 2  # a name may start with a digit
    for bad, msg in [("forward-grad{guess=best}", "expected one of local, random, got 'best'"),
                     ("forward-grad{tangents=0}", "tangents must be at least 1"),
                     ("forward-grad{k=2}", "schedule 'forward-grad' has no option 'k'"),
                     ("petra{stages=2}", "schedule 'petra' has no option 'stages'"),
                     ("forward-grad{guess=local", "unclosed"),
                     ("petra,dsp", "one schedule at a time")]:
        with pytest.raises(PipelineError, match=msg):
            make_schedule(bad)
    with pytest.raises(PipelineError, match="schedule 'gpipe' has no option 'accumulate'"):
        make_schedule("gpipe", accumulate=2)


def test_bad_arguments():
    with pytest.raises(PipelineError, match="unknown schedule 'pipedream'"):
        build("pipedream", 2, 2)
    with pytest.raises(ValueError, match="at least 1"):
        build("petra", 0, 2)
    assert "F0" in build("petra", 2, 2).table()
