"""``grow``: Before/Expected on a hand-made graph, widths, initialisation, reports, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from gradxform.compiler import compile_loaded
from gradxform.errors import GradxformError, PipelineError
from gradxform.frontend.loader import LoadedModel
from gradxform.ir.growth import growth_record
from gradxform.passes import PASSES, describe_pass

from ..conftest import example


class Before(nn.Module):
    def __init__(self, hidden=8):
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def _loaded(model):
    torch.manual_seed(0)
    return LoadedModel(model, (torch.randn(4, 6),))


def test_before_expected_shrinks_the_hidden_width_and_keeps_the_interfaces():
    result = compile_loaded(_loaded(Before()), "grow{width=0.25}")
    expected = compile_loaded(_loaded(Before(hidden=2)), "grow{width=1.0}").module
    gm = result.module
    assert gm.code == expected.code                   # the graph is the same; only the hidden width changed
    assert {k: v.shape for k, v in gm.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    assert [str(m) for m in gm.children()] == [str(m) for m in expected.children()]
    assert gm(torch.randn(5, 6)).shape == (5, 3)
    p = result.report["passes"][0]
    assert p["info"]["pairs"] == [{"pair": "fc1->fc2", "kind": "linear", "activations": ["relu"], "norms": ["bn"],
                                   "hidden": [8, 2]}]
    assert p["notes"][0] == "fc1->fc2: hidden width 8 -> 2 (linear -> bn -> relu)"
    assert "fc2: starts no growable pair (its output is a model output)" in p["notes"]
    assert p["params"] == [sum(t.numel() for t in Before().parameters()), sum(t.numel() for t in Before(2).parameters())]
    assert growth_record(gm) == {"pairs": {"fc1->fc2": {"full": 8, "start": 2}}, "blocks": []}
    assert growth_record(copy.deepcopy(gm))["pairs"] == {"fc1->fc2": {"full": 8, "start": 2}}


def test_slice_keeps_the_first_units_and_reset_reinitialises_at_the_new_fan_in():
    model = Before()
    w1, w2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    sliced = compile_loaded(_loaded(model), "grow{width=3,init=slice}").module
    torch.testing.assert_close(sliced.fc1.weight, w1[:3], rtol=0, atol=0)
    torch.testing.assert_close(sliced.fc2.weight, w2[:, :3], rtol=0, atol=0)
    reset = compile_loaded(_loaded(Before()), "grow{width=3}").module
    again = compile_loaded(_loaded(Before()), "grow{width=3}").module
    torch.testing.assert_close(reset.fc2.weight, again.fc2.weight, rtol=0, atol=0)   # seeded: reproducible
    other = compile_loaded(_loaded(Before()), "grow{width=3,seed=1}").module
    assert not torch.equal(other.fc2.weight, reset.fc2.weight)
    bound = float(reset.fc2.weight.detach().abs().max())
    assert 8 ** -0.5 < bound <= 3 ** -0.5        # PyTorch's uniform(+-1/sqrt(fan_in)) at fan-in 3, not 8
    assert reset.fc1.in_features == 6 and reset.fc1.out_features == reset.bn.num_features == reset.fc2.in_features == 3


def test_widths_per_pair_and_targets():
    result = compile_loaded(example("mlp.py"), "grow{width=16,24,0.5,1.0}")
    hidden = [r["hidden"] for r in result.report["passes"][0]["info"]["pairs"]]
    assert hidden == [[128, 16], [128, 24], [128, 64], [128, 128]]
    gm = result.module
    assert [gm.get_submodule(f"body.{i}").weight.shape for i in (0, 2, 4, 6)] == [(16, 64), (24, 16), (64, 24), (128, 64)]
    assert gm.head.weight.shape == (10, 128)
    only = compile_loaded(example("mlp.py"), "grow{width=8,targets=body.2*}").report["passes"][0]
    assert [r["pair"] for r in only["info"]["pairs"]] == ["body.2->body.4"]
    assert "body.0->body.2: not shrunk (not matched by targets=)" in only["notes"]


def _shapes(out):
    return {k: v.shape for k, v in out.items()} if isinstance(out, dict) else out.shape


def test_resnet_keeps_its_output_shape():
    loaded = example("resnet.py:digits_resnet", input_shapes=["x:[16,1,8,8]"])
    full = _shapes(loaded.module(*loaded.args, **loaded.kwargs))
    result = compile_loaded(loaded, "grow{width=0.25}")
    assert _shapes(result.module(*loaded.args, **loaded.kwargs)) == full
    rows = result.report["passes"][0]["info"]["pairs"]
    assert len(rows) == 8 and rows[0]["hidden"] == [16, 4] and rows[-1]["hidden"] == [128, 32]
    assert result.module.get_submodule("layer1.0.bn1").num_features == 4


def test_exported_transformer_mlps_shrink_through_their_parameters():
    lm = example("lm.py")
    full = _shapes(lm.module(*lm.args, **lm.kwargs))
    out = compile_loaded(lm, "grow{width=0.25}")
    assert out.tracer == "export"
    assert [r["hidden"] for r in out.report["passes"][0]["info"]["pairs"]] == [[256, 64]] * 4
    assert _shapes(out.module(*lm.args, **lm.kwargs)) == full
    assert out.module.get_parameter("layers.0.mlp.0.weight").shape == (64, 64)


def test_registered_with_its_options_and_schedule():
    cls = PASSES["grow"]
    assert cls.preserves_function is False and cls.schedule is None
    info = describe_pass("grow")
    assert [o["name"] for o in info["options"]] == ["width", "targets", "init", "seed"]


def test_bad_input():
    class NoPair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)

        def forward(self, x):
            return self.a(x)

    with pytest.raises(GradxformError, match=r"no growable pair: a: its output is a model output"):
        compile_loaded(_loaded(NoPair()), "grow")
    with pytest.raises(GradxformError, match="width has 2 values for 4 growable pairs") as err:
        compile_loaded(example("mlp.py"), "grow{width=8,8}")
    assert "body.0->body.2, body.2->body.4" in str(err.value)
    with pytest.raises(GradxformError, match="width 200 is wider than the pair's 128 units"):
        compile_loaded(example("mlp.py"), "grow{width=200}")
    with pytest.raises(PipelineError, match=r"width takes fractions in \(0, 1\] or whole counts > 1, got 2.5"):
        compile_loaded(example("mlp.py"), "grow{width=2.5}")
    with pytest.raises(PipelineError, match="expected one of reset, slice"):
        compile_loaded(example("mlp.py"), "grow{init=zero}")


def test_depthwise_convolutions_are_skipped_and_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 3, padding=1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.dw(torch.relu(self.a(x)))))))

    result = compile_loaded(LoadedModel(Net(), (torch.randn(2, 2, 5, 5),)), "grow{width=0.5}")
    p = result.report["passes"][0]
    assert [r["pair"] for r in p["info"]["pairs"]] == ["b->c"]
    assert ("a: starts no growable pair (the next layer dw: grouped or depth-wise convolution (groups=4) "
            "is not grown)") in p["notes"]
    assert "dw: starts no growable pair (grouped or depth-wise convolution (groups=4) is not grown)" in p["notes"]
