"""``f3``: connectors after blocks or stages, from shapes of any rank, unchanged outputs, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradxform
from gradxform.compiler import compile_loaded
from gradxform.errors import GradxformError
from gradxform.frontend.loader import LoadedModel
from gradxform.frontend.tracer import GxTracer
from gradxform.nn.feedback import FeedbackConnector, connectors, feedback_errors
from gradxform.passes import PASSES, describe_pass

from ..conftest import example


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 6), nn.Tanh()
        self.fc2, self.act2 = nn.Linear(6, 5), nn.Tanh()
        self.out, self.prob = nn.Linear(5, 3), nn.Sigmoid()

    def forward(self, x):
        return self.prob(self.out(self.act2(self.fc2(self.act1(self.fc1(x))))))


class Expected(Before):
    def __init__(self):
        super().__init__()
        self.feedback0 = FeedbackConnector((6,), 3)
        self.feedback1 = FeedbackConnector((5,), 3, index=1)

    def forward(self, x):
        feedback0 = self.feedback0(self.act1(self.fc1(x)))
        feedback1 = self.feedback1(self.act2(self.fc2(feedback0)))
        return self.prob(self.out(feedback1))


def _compile(model, x, pipeline="f3", **kw):
    return gradxform.compile(model, pipeline, example_inputs=(x,), **kw)


def test_before_expected_a_connector_after_every_layer_with_its_activation_but_the_last():
    torch.manual_seed(0)
    result = compile_loaded(LoadedModel(Before(), (torch.randn(2, 4),), {}), "f3")
    gm = result.module
    expected = torch.fx.GraphModule(Expected(), GxTracer().trace(Expected()))
    assert gm.code == expected.code
    assert [(c.shape, tuple(c.B.shape), c.index) for c in connectors(gm)] == [((6,), (3, 6), 0), ((5,), (3, 5), 1)]
    rec = result.report["passes"][0]
    assert rec["notes"][0] == ("loss bce (auto: the model ends in a sigmoid), error kind delayed-error (auto), "
                               "feedback kaiming, 3 outputs")
    assert rec["notes"][1] == "feedback0 after block fc1 + tanh ('act1'): activation (N, 6), B 3 x 6 (kaiming), 0.1 kB"
    assert "no connector after block fc2" not in " ".join(rec["notes"])
    assert rec["info"]["connectors"][1] == {"name": "feedback1", "stage": 0, "after": "block fc2 + tanh",
                                            "node": "act2", "shape": [5], "feedback_shape": [3, 5], "bytes": 60}
    assert rec["info"]["schedule"] == "f3" == PASSES["f3"].schedule
    assert gm.gx_f3 == {"error": "delayed-error", "loss": "bce", "classes": 3, "at": "blocks"}
    assert rec["max_abs_diff"] == 0.0                         # the PassManager compared outputs


def test_a_second_run_changes_nothing():
    result = _compile(Before(), torch.randn(2, 4), "f3,f3")
    first, second = result.gx_report["passes"]
    assert first["changed"] and not second["changed"]
    assert second["notes"] == ["the model already has feedback connectors; left as it is"]
    assert len(connectors(result)) == 2


@pytest.mark.parametrize("target, widths", [
    ("resnet.py:digits_resnet", [1024, 1024, 512, 512, 256, 256, 128, 128]),   # (N, C, H, W), one per block
    ("vit.py", [65 * 64] * 6),                                                   # (N, T, D), attention + MLP as one
    ("mlp.py", [128] * 4),                                                       # (N, D), Linear + ReLU
])
def test_connectors_for_every_activation_layout_leave_the_forward_unchanged(target, widths):
    loaded = example(target, double=True)
    x = loaded.args[0]
    result = compile_loaded(loaded, "f3{feedback=trinomial}")
    gm = result.module
    found = connectors(gm)
    assert [c.B.shape[1] for c in found] == widths and all(c.B.dtype == torch.float64 for c in found)
    assert all(set(c.B.unique().tolist()) <= {-1.0, 0.0, 1.0} for c in found)
    assert result.report["passes"][0]["info"]["bytes"] == sum(10 * w * 8 for w in widths)
    gm.train()
    torch.manual_seed(0)
    reference = loaded.module.train()(x)
    torch.manual_seed(0)
    with feedback_errors(gm, torch.randn(len(x), 10, dtype=torch.float64)):
        out = gm(x)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)    # feedback mode: same values


def test_at_stages_puts_one_connector_on_every_stage_boundary_but_the_last():
    result = compile_loaded(example("resnet.py:digits_resnet"), "split{stages=3},f3{at=stages}")
    stages = result.module.stages
    assert [len(connectors(s)) for s in stages] == [1, 1, 0]
    for s in stages[:2]:
        out = next(n for n in s.graph.nodes if n.op == "output").args[0]
        assert out[0].op == "call_module" and isinstance(s.get_submodule(out[0].target), FeedbackConnector)
    notes = result.report["passes"][1]["notes"]
    assert any(n.startswith("stage 0: feedback0 after the end of stage 0") for n in notes)
    blocks = compile_loaded(example("resnet.py:digits_resnet"), "split{stages=3},f3")
    assert [len(connectors(s)) for s in blocks.module.stages] == [2, 3, 3]      # boundaries fall on blocks


def test_feedback_and_seed_options_change_b_and_describe_lists_them():
    x = torch.randn(2, 4)
    torch.manual_seed(0)
    a = _compile(Before(), x, "f3{seed=1}")
    torch.manual_seed(0)
    b = _compile(Before(), x, "f3{seed=2}")
    torch.manual_seed(0)
    c = _compile(Before(), x, "f3{feedback=identity}")
    assert not torch.equal(a.feedback0.B, b.feedback0.B)
    assert torch.equal(c.feedback0.B, torch.cat([torch.eye(3), -torch.eye(3)], dim=1))
    names = [o["name"] for o in describe_pass("f3")["options"]]
    assert names == ["at", "feedback", "error", "loss", "seed"]


def test_the_export_tracer_gets_the_same_connectors():
    result = compile_loaded(example("mlp.py"), "f3", tracer="export")
    assert result.tracer == "export" and len(connectors(result.module)) == 4
    assert result.report["passes"][0]["max_abs_diff"] == 0.0
    staged = compile_loaded(example("mlp.py"), "split{stages=2},f3{at=stages}", tracer="export").module
    assert [len(connectors(s)) for s in staged.stages] == [1, 0]


def test_b_is_saved_in_the_artefact(tmp_path):
    result = compile_loaded(example("mlp.py"), "f3{feedback=binomial,seed=3}")
    gradxform.save(result.module, tmp_path / "art")
    loaded = gradxform.load(tmp_path / "art")
    assert [torch.equal(a.B, b.B) for a, b in zip(connectors(loaded), connectors(result.module))] == [True] * 4
    assert loaded.gx_f3["error"] == "delayed-error-softmax"


class _SharedStem(nn.Module):
    """A stem whose output reaches the classifier beside the blocks: its gradient would bypass connectors."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        s = self.stem(x)
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(s))))
        return self.head(torch.cat([h, s], 1))


def test_no_connector_where_another_value_would_carry_gradient_around_it():
    result = _compile(_SharedStem(), torch.randn(2, 4))
    notes = result.gx_report["passes"][0]["notes"]
    assert not connectors(result)
    assert "no connector after block fc1 + tanh: 'stem' crosses there too and its gradient reaches the same " \
           "parameters, around the connector" in notes
    assert "no connector inserted: no block boundary with a trainable layer after it" in notes


# ------------------------------------------------------------------------------------------ bad input

class _PerToken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)))


class _Pair(_PerToken):
    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(h), h


@pytest.mark.parametrize("model, x, pipeline, message", [
    (_PerToken(), torch.randn(2, 5, 4), "f3", r"output to be \(N, C\), one row of C values per sample; it is "
                                              r"\(N, 5, 3\) float32"),
    (_Pair(), torch.randn(2, 4), "f3", "needs the model to return one \\(N, C\\) tensor, it returns tuple"),
    (Before(), torch.randn(2, 4), "f3{error=delayed-error,loss=cross-entropy}",
     "error kind 'delayed-error' does not fit loss=cross-entropy"),
    (Before(), torch.randn(2, 4), "f3{error=delayed-loss-softmax,loss=mse}", "does not fit loss=mse"),
    (_PerToken(), torch.randn(2, 4), "f3{loss=bce}", "needs the model's output to be probabilities, but it comes "
                                                     "from 'out' \\(Linear\\), not a sigmoid"),
    (Before(), torch.randn(2, 4), "f3{at=stages}", "needs a model split into two stages or more"),
])
def test_bad_models_and_options_are_refused_with_a_message(model, x, pipeline, message):
    with pytest.raises(GradxformError, match=message) as info:
        _compile(model, x, pipeline)
    assert info.value.hint and "pipeline" in (info.value.where or "")
