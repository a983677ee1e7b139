"""The PassManager: verification after each pass, and where failures are reported."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from gradxform.compiler import prepare
from gradxform.errors import PassError
from gradxform.frontend.loader import LoadedModel
from gradxform.passes.base import Pass, PassResult
from gradxform.passes.manager import PassContext, PassManager, compare


class FlipRelu(Pass):
    """Claims to preserve the function but turns relu into sigmoid: the manager must catch it."""

    name = "flip-relu"

    def run(self, gm, ctx):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.relu:
                n.target = torch.sigmoid
        return PassResult(gm, True, ["flipped"])


class Crash(Pass):
    name = "crash"

    def run(self, gm, ctx):
        raise RuntimeError("boom")


class Noop(Pass):
    name = "noop"

    def run(self, gm, ctx):
        return PassResult(gm, False)


class ScaleOutput(Pass):
    """Changes the function on purpose (like adding heads): not compared."""

    name = "scale"
    preserves_function = False

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_function(torch.mul, (out.args[0], 2.0))
        out.args = (scaled,)
        return PassResult(gm, True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.a(x))


def _prepared():
    x = torch.randn(3, 4)
    gm, _, _, _ = prepare(LoadedModel(Net(), (x,)))
    return gm, PassContext((x,))


def test_broken_preserving_pass_is_named():
    gm, ctx = _prepared()
    with pytest.raises(PassError) as e:
        PassManager([Noop(), FlipRelu()], "noop,flip-relu").run(gm, ctx)
    text = str(e.value)
    assert "pass 'flip-relu' changed the model's outputs" in text
    assert "step 2 of pipeline 'noop,flip-relu' (after noop)" in text


def test_crashing_pass_reports_its_position():
    gm, ctx = _prepared()
    with pytest.raises(PassError) as e:
        PassManager([Noop(), Crash()], "noop,crash").run(gm, ctx)
    assert "pass 'crash' failed: RuntimeError: boom" in str(e.value)
    assert "step 2" in str(e.value) and "after noop" in str(e.value)


def test_non_preserving_pass_is_not_compared_and_records_stats():
    gm, ctx = _prepared()
    module, records = PassManager([ScaleOutput(), Noop()]).run(gm, ctx)
    assert [r.changed for r in records] == [True, False]
    assert records[0].max_abs_diff is None and records[1].max_abs_diff == 0.0
    assert records[0].nodes[1] == records[0].nodes[0] + 1
    assert records[0].params == (20, 20)
    torch.testing.assert_close(module(ctx.args[0]), 2 * torch.relu(gm.a(ctx.args[0])))


def test_check_disabled_lets_a_broken_pass_through():
    gm, ctx = _prepared()
    ctx.check = False
    module, records = PassManager([FlipRelu()]).run(gm, ctx)
    assert records[0].notes == ["flipped"]


def test_tolerance_is_configurable():
    a = {"y": torch.tensor([1.0, 2.0])}
    b = {"y": torch.tensor([1.0, 2.001])}
    assert not compare(a, b, None, None)[1]
    diff, ok, _ = compare(a, b, 1e-2, 0.0)
    assert ok and abs(diff - 0.001) < 1e-6
    assert not compare(a, {"z": a["y"]}, None, None)[1]  # structure changed


def test_equal_infinities_are_no_difference():
    a = torch.tensor([float("-inf"), 1.0])
    assert compare(a, a.clone(), None, None)[:2] == (0.0, True)


def test_manager_keeps_buffers_untouched():
    x = torch.randn(8, 3, 4, 4)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    gm, _, _, _ = prepare(LoadedModel(model, (x,)))
    before = model[1].running_mean.clone()
    PassManager([Noop()]).run(gm, PassContext((x,)))
    assert torch.equal(model[1].running_mean, before)


def test_lint_catches_a_malformed_graph():
    class Dangling(Pass):
        name = "dangling"

        def run(self, gm, ctx):
            relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
            other = fx.Graph().placeholder("stranger")
            relu.args = (other,)  # a node from another graph
            return PassResult(gm, True)

    gm, ctx = _prepared()
    with pytest.raises(PassError, match="pass 'dangling' failed"):
        PassManager([Dangling()]).run(gm, ctx)


class OwnStages(nn.Module):
    """A model with a submodule of its own named ``stages`` (as timm's ConvNeXt has)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.stages(x)
        return self.head(h + x)


@pytest.mark.parametrize("pipeline", ["split{stages=2}", "reversible", "lowrank{rank=0.25,keep=none}",
                                      "dgl{stages=2}"])
def test_a_submodule_named_stages_is_not_a_staged_model(pipeline):
    import gradxform
    from gradxform.nn.staged import StagedModule, stages_of

    torch.manual_seed(0)
    model, x = OwnStages().double(), torch.randn(3, 4, dtype=torch.float64)
    out = gradxform.compile(model, pipeline, example_inputs=(x,))
    assert isinstance(out, StagedModule) == pipeline.startswith(("split", "dgl"))
    assert all(isinstance(g, fx.GraphModule) for g in stages_of(out) or [])
    assert out.gx_report["passes"][0]["changed"]
    if pipeline.startswith("split"):
        torch.testing.assert_close(out(x), model(x), rtol=0, atol=1e-12)


def test_a_pass_that_changes_nothing_says_so_in_one_line():
    import gradxform

    x = torch.randn(3, 4)
    out = gradxform.compile(Net(), "highway", example_inputs=(x,))
    record = out.gx_report["passes"][0]
    assert record["changed"] is False
    assert record["unchanged"] == ("highway changed nothing: no residual run or recurrent layer found: "
                                   "nothing to convert")
    from gradxform.export.report import format_compile

    assert "\n  ! highway changed nothing: no residual run" in format_compile(out.gx_report)


def test_strict_makes_a_pass_that_changes_nothing_an_error():
    import gradxform

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))
    with pytest.raises(PassError) as e:
        gradxform.compile(model, "lowrank{rank=0.9}", example_inputs=(torch.randn(3, 4),), strict=True)
    text = str(e.value)
    assert text.startswith("step 1 of pipeline 'lowrank{rank=0.9}': lowrank changed nothing: ")
    assert "1 not factored: rank 4 saves nothing (needs < 2)" in text
    assert "hint: change the options of 'lowrank' (gradxform passes lowrank), drop it from the pipeline, or " \
           "compile without --strict" in text
    gradxform.compile(model, "lowrank{rank=0.25}", example_inputs=(torch.randn(3, 4),), strict=True)


def test_the_cli_strict_flag_exits_2(cli, tmp_path):
    from ..conftest import EXAMPLES

    code, out, err = cli("compile", str(EXAMPLES / "mlp.py"), "--pass", "highway", "-o", str(tmp_path),
                         "--emit", "json", "--strict")
    assert code == 2 and "error: step 1 of pipeline 'highway': highway changed nothing" in err


class CountingNet(nn.Module):
    """Records the batch sizes it is called with (the output check should use a slice of the batch)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("check, calls", [(True, [1]), ("full", [16]), (False, [])])
def test_the_output_check_runs_on_a_slice_of_the_batch_unless_asked(check, calls):
    from gradxform.compiler import compile_loaded

    model = CountingNet()
    x = torch.randn(16, 4)
    result = compile_loaded(LoadedModel(model, (x,)), "split{stages=2}", check=check, tracer="export")
    assert [n for n in model.seen if type(n) is int] == calls  # the trace check's one call of the model
    assert result.report["check"] == {True: "1 of the 16 samples of the example batch",
                                      "full": "the whole example batch", False: "off"}[check]
    assert (result.report["passes"][0]["max_abs_diff"] is None) == (check is False)
    torch.testing.assert_close(result.module(x), model(x))


def test_a_model_that_fixes_its_batch_size_is_checked_on_the_whole_batch():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).reshape(8, 4))

    from gradxform.compiler import compile_loaded

    result = compile_loaded(LoadedModel(Fixed(), (torch.randn(8, 4),)), "split{stages=2}")
    assert result.report["check"] == "the whole example batch"
    assert result.report["passes"][0]["max_abs_diff"] == 0.0


def test_keyword_inputs_that_cannot_run_one_sample_are_checked_on_the_whole_batch():
    class Pooled(nn.Module):
        """BatchNorm in training mode over a 1x1 map: one sample is one value per channel."""

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)).flatten(1)

    from gradxform.compiler import compile_loaded

    result = compile_loaded(LoadedModel(Pooled(), (), {"x": torch.randn(4, 1, 3, 3)}), "split{stages=2}")
    assert result.report["check"] == "the whole example batch"
