"""The pipeline parser, typed options, the registry, and composites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradxform.errors import PipelineError
from gradxform.options import build_options, convert, option, parse_pipeline, type_name
from gradxform.passes import COMPOSITES, PASSES, Composite, Pass, describe_pass, resolve_pipeline


def test_parses_names_and_options():
    items = parse_pipeline("lowrank{rank=0.25}, split{stages=4,balance=flops}")
    assert [i.name for i in items] == ["lowrank", "split"]
    assert items[0].options == {"rank": ["0.25"]}
    assert items[1].options == {"stages": ["4"], "balance": ["flops"]}


def test_list_option_takes_bare_values():
    (item,) = parse_pipeline("split{at=layer2,layer3,balance=params}")
    assert item.options == {"at": ["layer2", "layer3"], "balance": ["params"]}
    opts = build_options(PASSES["split"], item.options)
    assert opts.at == ("layer2", "layer3") and opts.balance == "params"


def test_typed_options():
    (split,) = resolve_pipeline("split{stages=3,balance=time}")
    assert split.options.stages == 3 and split.options.balance == "time"
    assert split.describe() == "split{stages=3,balance=time}"


@pytest.mark.parametrize("text, message, caret", [
    ("splt{stages=4}", "unknown pass 'splt'", "^^^^"),
    ("split{stages=4", "unclosed '{'", "^"),
    ("split stages", "unexpected 's'", "^"),
    ("split{=4}", "bad option name", None),
    ("split{4}", "'4' has no option name", "^"),
    ("split{stages=4,stages=2}", "option 'stages' given twice", "^^^^^^"),
    ("", "empty pipeline", None),
    ("split,", "expected a pass name", "^"),
])
def test_syntax_errors_point_at_the_character(text, message, caret):
    with pytest.raises(PipelineError) as e:
        resolve_pipeline(text)
    assert message in str(e.value)
    if caret:
        lines = str(e.value).splitlines()
        text_line = next(i for i, line in enumerate(lines) if line.strip() == text.strip())
        assert lines[text_line + 1].strip().startswith(caret)


def test_unknown_pass_suggests_nearest():
    with pytest.raises(PipelineError) as e:
        resolve_pipeline("spilt{stages=2}")
    assert "did you mean 'split'" in str(e.value)


def test_unknown_option_suggests_nearest():
    with pytest.raises(PipelineError) as e:
        resolve_pipeline("split{stage=2}")
    assert "no option 'stage'" in str(e.value) and "did you mean 'stages'" in str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("split{stages=two}", "expected an integer"),
    ("split{balance=speed}", "expected one of flops, params, layers, time"),
    ("split{stages=2,3}", "takes one value"),
    ("split{stages=0}", "stages must be at least 1"),
])
def test_ill_typed_options(text, expected):
    with pytest.raises(PipelineError) as e:
        resolve_pipeline(text)
    assert expected in str(e.value)


def test_convert_unions_and_bools():
    assert convert("3", int | float) == 3 and convert("0.5", int | float) == 0.5
    assert convert("none", int | None) is None
    assert convert("yes", bool) is True and convert("off", bool) is False
    with pytest.raises(ValueError):
        convert("maybe", bool)


def test_describe_lists_options_with_types_and_docs():
    d = describe_pass("split")
    opts = {o["name"]: o for o in d["options"]}
    assert opts["stages"]["type"] == "int" and opts["stages"]["default"] == "2"
    assert opts["balance"]["type"] == "flops|params|layers|time"
    assert all(o["doc"] for o in d["options"])
    # a composite shows the forwarded option's type, its own preset default and the part's doc
    dgl = {o["name"]: o for o in describe_pass("dgl")["options"]}
    assert dgl["stages"] == {"name": "stages", "type": "int", "default": "2",
                             "doc": "number of pipeline stages (forwarded to 'split')"}
    assert dgl["head"]["type"] == "linear|mlp-sr|cnn" and dgl["head"]["default"] == "cnn"
    assert {o["name"]: o["default"] for o in describe_pass("petra")["options"]}["stages"] == "4"


def test_composites_expand_and_route_options():
    @dataclass
    class Opts:
        stages: int = option(2, "stages")

    class Dummy(Pass):
        name = "dummy-split"
        Options = Opts

    PASSES["dummy-split"] = Dummy
    COMPOSITES["dummy-method"] = Composite("dummy-method", "test", "dummy-split{stages=3}",
                                           routes={"stages": "dummy-split"})
    try:
        (p,) = resolve_pipeline("dummy-method")
        assert p.options.stages == 3
        (p,) = resolve_pipeline("dummy-method{stages=5}")
        assert p.options.stages == 5
        with pytest.raises(PipelineError, match="has no option 'depth'"):
            resolve_pipeline("dummy-method{depth=5}")
    finally:
        del PASSES["dummy-split"], COMPOSITES["dummy-method"]


_names = st.sampled_from(["split", "lowrank", "reversible", "a-b", "x_1"])
_values = st.from_regex(r"[A-Za-z0-9_.]{1,6}", fullmatch=True)


@given(st.lists(st.tuples(_names, st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True),
                                                  st.lists(_values, min_size=1, max_size=3), max_size=3)),
                min_size=1, max_size=4))
def test_parser_round_trips(pipeline):
    text = ",".join(name + ("{" + ",".join(f"{k}={','.join(v)}" for k, v in opts.items()) + "}" if opts else "")
                    for name, opts in pipeline)
    items = parse_pipeline(text)
    assert [(i.name, i.options) for i in items] == [(n, o) for n, o in pipeline]


def test_options_literal_type_name():
    assert type_name(Literal["a", "b"]) == "a|b"
    assert type_name(tuple[str, ...]) == "list[str]"
