"""The search space: the pipeline grammar with ranges, choices and alternatives; sampling within it."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradxform.errors import PipelineError
from gradxform.options import Choice, Range
from gradxform.passes import resolve_pipeline
from gradxform.search.space import Space, parse_space, schedules_of

optuna.logging.set_verbosity(optuna.logging.WARNING)


def knobs(space: Space, label: str, group: str) -> dict:
    method = next(m for m in space.methods if m.label == label)
    return {k.key: k.value for g in method.groups if g.name == group for k in g.knobs}


def test_methods_shared_groups_and_domains():
    space = parse_space("petra{stages=2..4,coupling=leapfrog|momentum,gamma=0.5..0.99};dgl{stages=2},"
                        "train{lr=0.05};train{lr=1e-3..1e-1:log,batch_size=32|64|128}")
    assert [m.label for m in space.methods] == ["petra", "dgl"]
    assert knobs(space, "petra", "petra") == {"stages": Range(2, 4, integer=True), "coupling": Choice(("leapfrog", "momentum")),
                                              "gamma": Range(0.5, 0.99, integer=False)}
    assert knobs(space, "dgl", "dgl") == {"stages": ("2",)}
    assert knobs(space, "dgl", "train") == {"lr": ("0.05",)}    # the method's own group
    (shared,) = space.shared
    assert shared.name == "train"
    assert {k.key: k.value for k in shared.knobs} == {"lr": Range(0.001, 0.1, integer=False, log=True),
                                                      "batch_size": Choice(("32", "64", "128"))}
    assert space.dimensions() == 3 + 2 + 1  # petra's three, the shared two, the method


def test_labels_of_repeated_methods_and_a_space_without_passes():
    space = parse_space("lowrank{rank=0.1..0.5},split{stages=2};lowrank{rank=0.1};lowrank{rank=0.25}")
    assert [m.label for m in space.methods] == ["lowrank+split", "lowrank", "lowrank#2"]
    only = parse_space("train{lr=0.01..0.1}")
    assert [(m.label, m.groups) for m in only.methods] == [("model", ())]


def test_schedules_each_method_trains_with():
    space = parse_space("petra{stages=2};dgl;highway{iterations=1..3};split{stages=2},train{schedule=stash|dsp}")
    assert [schedules_of(space, m) for m in space.methods] == [["petra"], ["local"], ["backprop"], ["stash", "dsp"]]


def _sample_many(space: Space, n: int, seed: int = 0) -> list:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, 0.0)
    return out


def test_samples_lie_within_ranges_and_choices():
    space = parse_space("petra{stages=2..4,coupling=leapfrog|momentum};highway{iterations=1..4};"
                        "train{lr=1e-3..1e-1:log,batch_size=32|64,momentum=0.5..0.9}")
    seen = set()
    for c in _sample_many(space, 60):
        seen.add(c.method)
        lr, momentum = float(c.train["lr"]), float(c.train["momentum"])
        assert 1e-3 <= lr <= 1e-1 and 0.5 <= momentum <= 0.9
        assert c.train["batch_size"] in ("32", "64")
        assert resolve_pipeline(c.pipeline)  # the sampled pipeline is valid pipeline text
        if c.method == "petra":
            assert c.pipeline.startswith("petra{") and set(c.params) == {"method", "petra.stages", "petra.coupling",
                                                                        "train.lr", "train.batch_size", "train.momentum"}
        else:
            assert 1 <= c.params["highway.iterations"] <= 4 and isinstance(c.params["highway.iterations"], int)
            assert "petra.stages" not in c.params  # a method's knobs are drawn only when it is chosen
    assert seen == {"petra", "highway"}


def test_log_range_covers_its_decades():
    lrs = [float(c.train["lr"]) for c in _sample_many(parse_space("train{lr=1e-4..1e-1:log}"), 200, seed=1)]
    per_decade = [sum(10 ** -k <= x < 10 ** -(k - 1) for x in lrs) for k in (4, 3, 2)]
    assert all(n > 40 for n in per_decade), per_decade  # uniform in log space: ~67 each, not ~2 in the lowest


def test_method_group_wins_over_shared_group():
    space = parse_space("split{stages=1},train{lr=0.5};dgl{stages=2};train{lr=0.01..0.02,batch_size=16}")
    for c in _sample_many(space, 20):
        assert c.train["batch_size"] == "16"
        if c.method == "split":
            assert c.train["lr"] == "0.5" and "train.lr" not in c.params
        else:
            assert 0.01 <= float(c.train["lr"]) <= 0.02 and "train.lr" in c.params


def test_a_pass_used_twice_has_its_own_parameters():
    space = parse_space("lowrank{rank=0.1..0.2,only=a*},lowrank{rank=0.3..0.4,only=b*}")
    for c in _sample_many(space, 10):
        first, second = c.params["lowrank.rank"], c.params["lowrank#2.rank"]
        assert 0.1 <= first <= 0.2 and 0.3 <= second <= 0.4
        assert c.pipeline == f"lowrank{{rank={first!r},only=a*}},lowrank{{rank={second!r},only=b*}}"


def test_sampled_values_render_exactly():
    (c,) = _sample_many(parse_space("train{lr=1e-3..1e-1:log}"), 1)
    assert float(c.train["lr"]) == c.params["train.lr"]  # repr of a float reads back to the same float


def test_json_round_trip():
    space = parse_space("petra{stages=2..4};split{at=layer1,layer2};train{lr=1e-3..1e-1:log};schedule{accumulate=1|2}")
    assert Space.from_json(json.loads(json.dumps(space.to_json()))) == space


# -- property: describe() is the space's canonical text ---------------------------------------------

ints = st.tuples(st.integers(1, 6), st.integers(1, 6)).filter(lambda t: t[0] < t[1])
floats = st.tuples(st.floats(1e-4, 5, allow_nan=False), st.floats(1e-4, 5, allow_nan=False)).filter(
    lambda t: t[0] < t[1])


def domain(kind: str) -> st.SearchStrategy[str]:
    if kind == "int":
        return st.one_of(ints.map(lambda t: f"{t[0]}..{t[1]}"), st.integers(1, 6).map(str),
                         st.lists(st.integers(1, 6).map(str), min_size=2, max_size=3, unique=True).map("|".join))
    if kind == "unit":  # in (0, 1): the couplings' and Highway's gamma
        pair = st.tuples(st.floats(0.01, 0.99), st.floats(0.01, 0.99)).filter(lambda t: t[0] < t[1])
        return st.one_of(pair.map(lambda t: f"{t[0]!r}..{t[1]!r}"), st.floats(0.01, 0.99).map(repr))
    if kind == "float":
        return st.one_of(st.tuples(floats, st.booleans()).map(lambda t: f"{t[0][0]!r}..{t[0][1]!r}" + (":log" if t[1] else "")),
                         st.floats(1e-4, 5).map(repr))
    return st.lists(st.sampled_from(kind.split("|")), min_size=1, max_size=3, unique=True).map("|".join)


GROUPS = {"petra": {"stages": "int", "coupling": "leapfrog|momentum", "gamma": "unit"},
          "split": {"stages": "int", "balance": "flops|params|layers"},
          "lowrank": {"rank": "float", "mode": "factor|usv"},
          "highway": {"iterations": "int", "gamma": "unit"},
          "train": {"lr": "float", "batch_size": "int", "optimizer": "sgd|adamw"}}


@st.composite
def group_text(draw: st.DrawFn, name: str) -> str:
    keys = draw(st.lists(st.sampled_from(sorted(GROUPS[name])), unique=True, max_size=3))
    body = ",".join(f"{k}={draw(domain(GROUPS[name][k]))}" for k in keys)
    return name + (f"{{{body}}}" if body else "")


@st.composite
def space_text(draw: st.DrawFn) -> str:
    names = draw(st.lists(st.sampled_from(["petra", "split", "lowrank", "highway"]), min_size=1, max_size=3))
    alternatives = [draw(group_text(n)) + (f",{draw(group_text('train'))}" if draw(st.booleans()) else "") for n in names]
    if draw(st.booleans()):
        alternatives.append(draw(group_text("train")))
    return ";".join(alternatives)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space_text())
def test_describe_round_trips(text):
    space = parse_space(text)
    assert parse_space(space.describe()) == space
    assert space.describe() == parse_space(space.describe()).describe()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space_text(), st.integers(0, 1000))
def test_any_sample_is_inside_its_space(text, seed):
    space = parse_space(text)
    for c in _sample_many(space, 3, seed):
        method = next(m for m in space.methods if m.label == c.method)
        resolve_pipeline(c.pipeline)
        named = space.knobs(method)
        assert set(c.params) - {"method"} == {n for n, (_, k) in named.items() if k.searched}
        for name, value in c.params.items():
            if name == "method":
                continue
            domain_ = named[name][1].value
            if isinstance(domain_, Choice):
                assert value in domain_.texts
            else:
                assert domain_.low <= value <= domain_.high and isinstance(value, int) == domain_.integer
                assert math.isfinite(value)


# -- bad input: what went wrong, with a caret under the character -----------------------------------

@pytest.mark.parametrize("text, message, at, width", [
    ("petra{stages=2..}", "option 'stages' of 'petra': the range has no high end", 14, 2),
    ("petra{stages=..4}", "option 'stages' of 'petra': the range has no low end", 13, 1),
    ("petra{stagez=2}", "'petra' has no option 'stagez'", 6, 6),
    ("petra{stages=2..4", "unclosed '{'", 5, 1),
    ("petra{stages=4..2}", "option 'stages' of 'petra': the range 4..2 is empty or reversed", 13, 4),
    ("petra{stages=2.5}", "option 'stages' of 'petra': expected an integer, got '2.5'", 13, 3),
    ("petra{coupling=leapfrog|mom}", "option 'coupling' of 'petra': expected one of leapfrog, momentum, got 'mom'", 24, 3),
    ("petra{coupling=1..2}", "option 'coupling' of 'petra': a range needs a number option, this one is leapfrog|momentum", 15, 4),
    ("train{lr=0..1:log}", "training option 'lr': a log range needs a positive low end, got 0", 9, 1),
    ("train{lr=1e-3..1e-1:lg}", "training option 'lr': unknown range scale 'lg'", 20, 2),
    ("train{lr=abc..1}", "training option 'lr': expected a number, got 'abc'", 9, 3),
    ("train{lr=1..2|3}", "training option 'lr': a value is a range or a choice, not both", 10, 2),
    ("train{batch_size=32||64}", "training option 'batch_size': empty choice", 20, 1),
    ("train{batch_size=32|32}", "training option 'batch_size': choice '32' given twice", 20, 2),
    ("train{epochs=3}", "train{epochs} cannot be searched", 6, 6),
    ("train{lrate=0.1}", "train{} has no option 'lrate'", 6, 5),
    ("train{schedule=petra|stsh}", "training option 'schedule': unknown schedule 'stsh'", 21, 4),
    ("petr{stages=2}", "unknown pass 'petr'", 0, 4),
    ("petra;;dgl", "empty alternative", 6, 1),
    ("petra,train{lr=0.1},train{lr=0.2}", "train{} given twice in one alternative", 20, 5),
    ("petra;train{lr=0.1};train{lr=0.2}", "a shared train{} given twice", 20, 5),
    ("split{at=a,b|c}", "option 'at' of 'split': a list of values is fixed; search it as one choice", 11, 3),
    ("schedule{foo=1}", "no schedule has an option 'foo'", 9, 3),
    ("petra{stages=2};highway;schedule{micro_batches=2}",
     "schedule{micro_batches}: method 'petra' trains with 'petra', which has no option 'micro_batches'", 33, 13),
    ("petra{stages=2} dgl", "unexpected 'd'", 16, 1),
    ("petra{gamma=0.5..1.0}", "option 'gamma' of 'petra': gamma must be in (0, 1), got 1.0", 17, 3),
    ("highway{gamma=0.2|1.5}", "option 'gamma' of 'highway': gamma must be in [0, 1), got 1.5", 18, 3),
    ("train{lr=-1..1}", "training option 'lr': lr must be positive", 9, 2),
    ("schedule{accumulate=0..3}", "schedule option 'accumulate': accumulate must be at least 1", 20, 1),
    ("train{accumulate=2}", "train{accumulate} cannot be searched", 6, 10),
])
def test_malformed_space_points_at_the_character(text, message, at, width):
    with pytest.raises(PipelineError) as e:
        parse_space(text)
    lines = str(e.value).splitlines()
    assert lines[0] == message
    assert lines[1] == f"  {text}"
    assert lines[2] == "  " + " " * at + "^" * width


def test_empty_space():
    with pytest.raises(PipelineError, match="empty search space"):
        parse_space("  ")


def test_unknown_knob_suggests_the_nearest():
    with pytest.raises(PipelineError) as e:
        parse_space("highway{iteration=2}")
    assert "did you mean 'iterations'?" in e.value.hint
