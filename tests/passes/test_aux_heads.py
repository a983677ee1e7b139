"""``aux-heads``: heads built from shapes, FLOPs shares, unchanged function, composites, errors."""

from __future__ import annotations

import json

import pytest
import torch

from gradxform.compiler import compile_loaded
from gradxform.errors import PipelineError
from gradxform.nn.heads import AuxHead, build_head, head_flops

from ..conftest import example


def _heads(module):
    return [getattr(s, "aux_head", None) for s in module.stages]


def test_cnn_heads_on_resnet_stages_report_their_flops_share():
    result = compile_loaded(example("resnet.py"), "split{stages=4},aux-heads")
    heads = _heads(result.module)
    assert all(isinstance(h, AuxHead) for h in heads[:3]) and heads[3] is None   # the last stage has the model's
    assert [h.shape for h in heads[:3]] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    # golden head: 1x1 conv to the width, three stride-2 3x3 convs, pool to 2x2, linear
    from torch.testing import FileCheck

    FileCheck().check("Conv2d(64, 32, kernel_size=(1, 1)").check("BatchNorm2d(32").check("ReLU").check_count(
        "kernel_size=(3, 3), stride=(2, 2)", 3).check("AdaptiveAvgPool2d(output_size=2)").check(
        "Linear(in_features=128, out_features=10").run(str(heads[0]))
    rec = result.report["passes"][1]
    info = rec["info"]
    assert [h["stage"] for h in info["heads"]] == [0, 1, 2]
    assert 0 < info["share"] < 0.10                                # the reference papers' budget
    assert info["share"] == pytest.approx(sum(h["flops"] for h in info["heads"]) / info["model_flops"])
    assert any(n.startswith("stage 0: cnn head on output 0 (N, 64, 32, 32) -> 10 classes") for n in rec["notes"])
    assert any("forward-grad: BatchNorm in training mode runs on batch statistics" in n for n in rec["notes"])
    # the forward is unchanged (the PassManager compared outputs) and so is every original parameter
    plain = compile_loaded(example("resnet.py"), "split{stages=4}").module
    extra = {k for k in result.module.state_dict() if ".aux_head." not in k}
    assert extra == set(plain.state_dict())


@pytest.mark.parametrize("kind, shape, per_token, out", [
    ("linear", (16, 8, 8), False, (3, 10)), ("mlp-sr", (16, 8, 8), False, (3, 10)), ("cnn", (16, 8, 8), False, (3, 10)),
    ("linear", (12, 32), False, (3, 10)), ("mlp-sr", (12, 32), False, (3, 10)), ("cnn", (12, 32), False, (3, 10)),
    ("cnn", (12, 32), True, (3, 12, 10)), ("linear", (12, 32), True, (3, 12, 10)),
    ("linear", (40,), False, (3, 10)), ("mlp-sr", (40,), False, (3, 10)),
])
def test_heads_for_every_activation_layout(kind, shape, per_token, out):
    head = build_head(kind, shape, 10, per_token=per_token)
    assert tuple(head(torch.randn(3, *shape)).shape) == out
    assert head_flops(head, shape, 3) > 0


def test_mlp_sr_pools_large_maps_first_and_cnn_width_is_configurable():
    assert isinstance(build_head("mlp-sr", (8, 16, 16), 10)[0], torch.nn.AdaptiveAvgPool2d)
    assert not isinstance(build_head("mlp-sr", (8, 4, 4), 10)[0], torch.nn.AdaptiveAvgPool2d)
    assert build_head("cnn", (8, 16, 16), 10, width=12)[0].out_channels == 12
    with pytest.raises(ValueError, match="no head for activations of shape"):
        build_head("linear", (2, 3, 4, 5), 10)


def test_sequence_and_token_heads():
    vit = compile_loaded(example("vit.py"), "dgl{stages=3}")
    assert [h.shape for h in _heads(vit.module)[:2]] == [(65, 64), (65, 64)]
    lm = compile_loaded(example("lm.py"), "dgl{stages=2,head=linear}").module
    head = _heads(lm)[0]
    assert head.per_token and head.classes == 256 and len(head.shape) == 2   # hidden states, not the mask
    assert lm.gx_report["schedule"] == lm.gx_recipe.schedule == "local"


def test_composites_name_their_schedule():
    from gradxform.passes import compiled_schedule, resolve_pipeline

    assert compile_loaded(example("mlp.py"), "fwd-local").module.gx_recipe.schedule == "forward-grad"
    # a pass names the schedule in declared data; the last one named in the pipeline wins
    assert compiled_schedule("petra{stages=2}") == "petra" and compiled_schedule("split") == "petra"
    assert compiled_schedule("split,aux-heads{schedule=forward-grad{tangents=2}}") == "forward-grad{tangents=2}"
    assert compiled_schedule("highway") is None and compiled_schedule("reversible,lowrank") is None
    text = " ".join(p.describe() for p in resolve_pipeline("dgl{stages=3,head=linear}"))
    assert "split{stages=3}" in text and "aux-heads{head=linear}" in text


def test_at_blocks_splits_after_every_block():
    result = compile_loaded(example("resnet.py:digits_resnet", input_shapes=["x:[4,1,8,8]"]), "aux-heads{at=blocks}")
    assert len(result.module.stages) == 9 and sum(h is not None for h in _heads(result.module)) == 8
    notes = result.report["passes"][0]["notes"]
    assert notes[0] == "split after every residual block: 9 stages"
    # automatic width: 32 would cost a third of this small model's FLOPs; a narrower head fits the budget
    assert any(n.startswith("head width 16 (automatic") or n.startswith("head width 8 (automatic") for n in notes)
    assert result.report["passes"][0]["info"]["share"] <= 0.10
    wide = compile_loaded(example("resnet.py:digits_resnet", input_shapes=["x:[4,1,8,8]"]),
                          "aux-heads{at=blocks,width=32}").report["passes"][0]
    assert wide["info"]["share"] > 0.10
    assert any("above the 10% the reference papers keep to" in n for n in wide["notes"])


def test_errors():
    with pytest.raises(PipelineError, match=r"aux-heads\{at=stages\} needs a model split into stages"):
        compile_loaded(example("mlp.py"), "aux-heads")
    with pytest.raises(PipelineError, match="it cannot follow 'split'"):
        compile_loaded(example("resnet.py"), "split{stages=2},aux-heads{at=blocks}")
    with pytest.raises(PipelineError, match="no residual block to cut after"):
        compile_loaded(example("mlp.py"), "aux-heads{at=blocks}")
    with pytest.raises(PipelineError, match="schedule must be local or forward-grad"):
        compile_loaded(example("mlp.py"), "split{stages=2},aux-heads{schedule=petra}")
    one = compile_loaded(example("mlp.py"), "split{stages=1},aux-heads")
    assert one.report["passes"][1]["notes"] == ["one stage: no boundary to put a head on"]


def test_heads_survive_save_and_load(tmp_path):
    import gradxform
    from gradxform.compiler import compile as compile_file

    from ..conftest import EXAMPLES

    module = compile_file(str(EXAMPLES / "resnet.py:digits_resnet"), "dgl{stages=3}").module
    with torch.no_grad():
        for p in module.stages[0].aux_head.parameters():
            p.add_(1.0)  # trained heads must come back as they were, not re-initialised
    gradxform.save(module, tmp_path / "dgl")
    again = gradxform.load(tmp_path / "dgl")
    assert again.gx_recipe.schedule == "local"
    assert json.loads((tmp_path / "dgl" / "manifest.json").read_text())["schedule"] == "local"
    a, b = module.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and any(".aux_head." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Predicts(torch.nn.Module):
    """Returns class indices, not scores: there is no prediction tensor a head could learn."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).argmax(-1)


def test_option_and_shape_errors():
    import gradxform

    with pytest.raises(PipelineError, match="cannot find the model's prediction tensor"):
        gradxform.compile(_Predicts(), "split{stages=2},aux-heads", example_inputs=(torch.randn(4, 8),), check=False)
    with pytest.raises(PipelineError, match="width must be 0 .automatic. or positive, got -1"):
        compile_loaded(example("mlp.py"), "split{stages=2},aux-heads{width=-1}")
    with pytest.raises(ValueError, match="unknown head 'deep'; known: linear, mlp-sr, cnn"):
        build_head("deep", (8,), 10)
