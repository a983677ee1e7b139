"""Objectives from epoch records, and the early-stopping rule of multi-objective studies."""

from __future__ import annotations

import pytest

from gradxform.errors import GradxformError
from gradxform.search.objectives import EpochDominance, measure, parse_objectives
from gradxform.search.report import dominates, front


def record(acc: float, kept: dict, step: dict, seconds: float = 1.0, samples: int = 1000) -> dict:
    return {"test_accuracy": acc, "peak_kept_bytes": kept, "peak_step_bytes": step, "train_seconds": seconds,
            "samples": samples}


def test_measure_takes_the_worst_stage_and_the_steady_median():
    records = [record(0.5, {0: 100, 1: 10}, {0: 40, 1: 300}, seconds=10.0),   # warm-up epoch: not timed
               record(0.7, {0: 120, 1: 10}, {0: 40, 1: 300}, seconds=2.0),
               record(0.8, {0: 120, 1: 10}, {0: 40, 1: 300}, seconds=1.0),
               record(0.9, {0: 120, 1: 10}, {0: 40, 1: 300}, seconds=4.0)]
    m = measure(records)
    assert m["acc"] == 0.9 and m["curve"] == [0.5, 0.7, 0.8, 0.9]
    assert m["mem"] == 300            # stage 1's one micro-batch outweighs stage 0's 120 held between ticks
    assert m["mem_total"] == 120 + 300
    assert m["throughput"] == 500.0   # median of 500, 1000, 250 samples/s; the first epoch's 100 is left out


def test_throughput_needs_a_second_epoch():
    assert measure([record(0.5, {0: 1}, {0: 2})])["throughput"] is None
    assert measure([])["acc"] is None


def test_objectives_are_checked():
    assert parse_objectives("acc, mem,throughput") == ["acc", "mem", "throughput"]
    with pytest.raises(GradxformError) as e:
        parse_objectives("acc,memory")
    assert str(e.value) == ("unknown objective 'memory' in --objectives acc,memory\n"
                            "  hint: did you mean 'mem'? known: acc, mem, throughput")
    with pytest.raises(GradxformError, match="objective 'acc' given twice"):
        parse_objectives("acc,acc")
    with pytest.raises(GradxformError, match="--objectives is empty"):
        parse_objectives(" ")


# -- the epoch-dominance rule -----------------------------------------------------------------------

OBJ = ["acc", "mem", "throughput"]
RULE = EpochDominance(margin=0.02, from_epoch=2)


def done(number: int, curve: list[float], mem: float, throughput: float, epochs: int = 5) -> dict:
    return {"number": number, "curve": curve, "acc": curve[-1], "mem": mem, "throughput": throughput,
            "epochs": epochs}


def mine(curve: list[float], mem: float = 1000, throughput: float = 500) -> dict:
    return {"acc": curve[-1], "curve": curve, "mem": mem, "throughput": throughput}


def test_stops_a_trial_behind_one_that_costs_no_more():
    leader = done(3, [0.5, 0.8, 0.9, 0.93, 0.95], mem=1000, throughput=600)
    why = RULE.stop(OBJ, 2, 5, mine([0.3, 0.5]), [leader])
    assert why == "after epoch 2: test accuracy 50.00%, trial 3 had 80.00% then and is no worse on mem, throughput"


def test_keeps_a_trial_that_may_still_win_on_memory_or_speed():
    more_memory = done(3, [0.5, 0.8, 0.9, 0.93, 0.95], mem=1001, throughput=600)
    slower = done(4, [0.5, 0.8, 0.9, 0.93, 0.95], mem=900, throughput=499)
    assert RULE.stop(OBJ, 2, 5, mine([0.3, 0.5]), [more_memory, slower]) is None
    # on accuracy and memory alone, the slower one dominates
    assert "trial 4" in RULE.stop(["acc", "mem"], 2, 5, mine([0.3, 0.5]), [more_memory, slower])


def test_compares_at_the_same_epoch_not_with_final_accuracy():
    slow_starter = done(3, [0.2, 0.51, 0.9, 0.95, 0.97], mem=500, throughput=900)
    assert RULE.stop(OBJ, 2, 5, mine([0.3, 0.5]), [slow_starter]) is None   # 51% then: within the margin
    assert RULE.stop(OBJ, 2, 5, mine([0.3, 0.489]), [slow_starter]) is not None


def test_waits_for_from_epoch_and_never_stops_after_the_last():
    leader = done(3, [0.9, 0.9, 0.9], mem=1, throughput=10**6, epochs=3)
    assert RULE.stop(OBJ, 1, 3, mine([0.1]), [leader]) is None
    assert RULE.stop(OBJ, 2, 3, mine([0.1, 0.1]), [leader]) is not None
    assert RULE.stop(OBJ, 3, 3, mine([0.1, 0.1, 0.1]), [leader]) is None
    assert EpochDominance(from_epoch=1).stop(OBJ, 1, 3, mine([0.1], throughput=None), [leader]) is None  # not yet timed


def test_ignores_other_budgets_and_studies_without_accuracy():
    other_budget = done(3, [0.9, 0.9, 0.9], mem=1, throughput=10**6, epochs=3)
    assert RULE.stop(OBJ, 2, 5, mine([0.1, 0.1]), [other_budget]) is None
    leader = done(4, [0.9, 0.9, 0.9, 0.9, 0.9], mem=1, throughput=10**6)
    assert RULE.stop(["mem", "throughput"], 2, 5, mine([0.1, 0.1]), [leader]) is None


def test_single_objective_accuracy():
    leader = done(4, [0.6, 0.7, 0.9, 0.9, 0.9], mem=10**9, throughput=1)
    assert RULE.stop(["acc"], 2, 5, mine([0.6, 0.67]), [leader]) is not None
    assert RULE.stop(["acc"], 2, 5, mine([0.6, 0.69]), [leader]) is None


# -- the front -----------------------------------------------------------------------------------------

def row(number: int, acc: float, mem: float, throughput: float, **kw) -> dict:
    return {"number": number, "state": "complete", "same_as": None, "acc": acc, "mem": mem,
            "throughput": throughput, **kw}


def test_front_keeps_the_non_dominated_and_no_repeats():
    rows = [row(0, 0.95, 400, 3000), row(1, 0.93, 230, 2600), row(2, 0.90, 230, 3100), row(3, 0.53, 230, 2600),
            row(4, 0.95, 400, 3000, same_as=0), row(5, 0.99, 10, 9999, state="pruned")]
    assert [r["number"] for r in front(rows, OBJ)] == [0, 1, 2]   # best first on accuracy
    assert [r["number"] for r in front(rows, ["acc", "mem"])] == [0, 1]
    assert [r["number"] for r in front(rows, ["mem", "acc"])] == [1, 0]
    assert dominates(rows[1], rows[3], OBJ) and not dominates(rows[0], rows[0], OBJ)
