"""``split``: equivalence on every example, golden stage graphs, cut choice, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import FileCheck

from gradxform.compiler import compile_loaded, prepare
from gradxform.errors import PipelineError
from gradxform.frontend.loader import LoadedModel
from gradxform.nn import StagedModule
from gradxform.passes import resolve_pipeline
from gradxform.passes.manager import PassContext, PassManager, run_example

from ..conftest import example

EXAMPLES = ["resnet.py", "resnet.py:resnet50", "resnet.py:resnet34", "mlp.py", "gru.py", "vit.py", "lm.py"]


@pytest.fixture(scope="module", params=EXAMPLES)
def prepared(request):
    """Each example traced once, in float64."""
    loaded = example(request.param, double=True)
    if "resnet50" in request.param or "resnet34" in request.param:  # keep float64 forwards cheap
        loaded.args = (torch.randn(2, 3, 16, 16, dtype=torch.float64),)
    gm, tracer, _, _ = prepare(loaded)
    return request.param, loaded, gm


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_split_equals_original_exactly_in_float64(prepared, stages):
    name, loaded, gm = prepared
    ctx = PassContext(loaded.args, loaded.kwargs, check=False)
    reference = run_example(loaded.module, ctx)
    staged, records = PassManager(resolve_pipeline(f"split{{stages={stages}}}")).run(gm, ctx)
    assert isinstance(staged, StagedModule) and len(staged.stages) == stages
    out = run_example(staged, ctx)
    ref_leaves, out_leaves = torch.utils._pytree.tree_leaves(reference), torch.utils._pytree.tree_leaves(out)
    assert len(ref_leaves) == len(out_leaves)
    for r, o in zip(ref_leaves, out_leaves):
        assert torch.equal(r, o), name  # same ops in the same order: bit-exact
    assert type(out) is type(reference)  # dict outputs stay dicts
    assert all(isinstance(s, torch.fx.GraphModule) for s in staged.stages)
    assert records[0].changed


def test_staged_model_takes_other_batch_sizes():
    loaded = example("lm.py")
    staged = compile_loaded(loaded, "split{stages=3}", check=False).module
    ids = torch.randint(0, 256, (5, 9))
    mask = torch.ones(5, 9, dtype=torch.long)
    torch.testing.assert_close(staged(ids, attention_mask=mask)["logits"],
                               loaded.module(ids, attention_mask=mask)["logits"])


def test_golden_resnet_stages():
    loaded = example("resnet.py")
    staged = compile_loaded(loaded, "split{stages=2}", check=False).module
    s0, s1 = staged.stages
    # stage 0: the stem and the first blocks, ending on one activation it hands over
    FileCheck().check("def forward(self, x)").check("self.conv1(x)").check("self.layer1").check(
        "return (").run(s0.code)
    # stage 1: takes exactly that activation, ends with the classifier
    FileCheck().check_regex(r"def forward\(self, layer\d_\d_relu_1\)").check("self.fc").run(s1.code)
    assert len([n for n in s1.graph.nodes if n.op == "placeholder"]) == 1


def test_carried_values_pass_through_middle_stages():
    # y is needed by the last stage: the middle stage must carry it through.
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = torch.relu(x)
            return self.c(self.b(self.a(y))) * y

    model = Skip()
    x = torch.randn(3, 4)
    gm, _, _, _ = prepare(LoadedModel(model, (x,)))
    staged, _ = PassManager(resolve_pipeline("split{stages=3,balance=layers}")).run(
        gm, PassContext((x,), check=True))
    middle = staged.stages[1]
    placeholders = [n.name for n in middle.graph.nodes if n.op == "placeholder"]
    assert "relu" in placeholders
    FileCheck().check("return (").check("relu").run(middle.code)
    torch.testing.assert_close(staged(x), model(x))


def test_explicit_cut_points():
    loaded = example("resnet.py")
    staged = compile_loaded(loaded, "split{at=layer2,layer4}", check=True).module
    assert len(staged.stages) == 3
    assert "layer1" in staged.stages[0].code and "layer2" not in staged.stages[0].code
    assert "layer2" in staged.stages[1].code and "layer4" not in staged.stages[1].code
    assert "layer4" in staged.stages[2].code


def test_explicit_cut_errors():
    loaded = example("resnet.py")
    with pytest.raises(PipelineError, match="no layer named 'layr2'.*") as e:
        compile_loaded(loaded, "split{at=layr2}", check=False)
    assert "did you mean 'layer2" in str(e.value)
    with pytest.raises(PipelineError, match="inside a residual block"):
        compile_loaded(loaded, "split{at=layer1.0.conv2}", check=False)
    with pytest.raises(PipelineError, match="distinct and in model order"):
        compile_loaded(loaded, "split{at=layer3,layer2}", check=False)


@pytest.mark.parametrize("balance", ["flops", "params", "layers", "time"])
def test_balance_modes(balance):
    loaded = example("mlp.py")
    result = compile_loaded(loaded, f"split{{stages=3,balance={balance}}}")
    info = result.report["passes"][0]["info"]
    assert info["balance"] == balance and len(info["stages"]) == 3
    assert abs(sum(s["balance_share"] for s in info["stages"]) - 1) < 1e-9


def test_layers_balance_is_even_on_a_uniform_mlp():
    loaded = example("mlp.py")  # 4 hidden Linear layers + head: 5 layers
    info = compile_loaded(loaded, "split{stages=5,balance=layers}").report["passes"][0]["info"]
    assert [round(s["balance_share"], 3) for s in info["stages"]] == [0.2] * 5


def test_flops_balance_beats_the_naive_even_split():
    loaded = example("resnet.py")
    info = compile_loaded(loaded, "split{stages=4}", check=False).report["passes"][0]["info"]
    assert max(s["balance_share"] for s in info["stages"]) < 0.30  # a perfect split is 0.25


def test_more_stages_than_cuts():
    loaded = example("gru.py")
    with pytest.raises(PipelineError, match="only 4 valid cut points between layers that do work, enough for 5 stages"):
        compile_loaded(loaded, "split{stages=9}", check=False)


def test_tied_weights_are_copied_into_each_stage_and_recorded():
    import importlib.util

    from ..conftest import EXAMPLES as root

    spec = importlib.util.spec_from_file_location("lm_example", root / "lm.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    torch.manual_seed(0)
    model = lm.DecoderLM(lm.LMConfig(tie_word_embeddings=True)).double()
    args, kwargs = lm.example_inputs(model)
    result = compile_loaded(LoadedModel(model, args, kwargs), "split{stages=2}", check=False)
    staged = result.module
    assert len(staged.tied) == 1
    (first, first_name), (last, last_name) = staged.tied[0]
    assert (first, last) == (0, 1)
    one, other = (dict(staged.stages[j].named_parameters())[n] for j, n in staged.tied[0])
    assert one is not other and torch.equal(one, other)  # each stage its own copy, equal at the start
    assert model.lm_head.weight is model.wte.weight     # the model passed in stays tied
    notes = result.report["passes"][0]["notes"]
    assert f"tied parameter copied per stage: stage 0 '{first_name}', stage 1 '{last_name}'; sum their " \
           "gradients before each update (StagedModule.tied)" in notes
    want = model(*args, **kwargs)["logits"]
    torch.testing.assert_close(staged(*args, **kwargs)["logits"], want, rtol=1e-8, atol=1e-10)


def test_tied_layers_of_an_fx_graph_get_their_own_copies():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    torch.manual_seed(0)
    model, ids = Tied().double(), torch.randint(0, 10, (4, 5))
    staged = compile_loaded(LoadedModel(model, (ids,)), "split{stages=3}", tracer="fx").module
    assert staged.tied == [[(0, "emb.weight"), (2, "head.weight")]]
    assert staged.stages[2].head is not model.head and staged.stages[2].head.weight is not model.emb.weight
    assert model.head.weight is model.emb.weight and staged.stages[0].emb.weight is model.emb.weight
    torch.testing.assert_close(staged(ids), model(ids), rtol=0, atol=0)
    # the copy is a parameter of its own: a gradient reaches both, and their sum is the original's
    (want,) = torch.autograd.grad(model(ids).square().sum(), [model.emb.weight])
    copies = [staged.stages[0].emb.weight, staged.stages[2].head.weight]
    got = torch.autograd.grad(staged(ids).square().sum(), copies)
    torch.testing.assert_close(got[0] + got[1], want, rtol=1e-12, atol=1e-12)


def test_split_twice_is_refused():
    loaded = example("mlp.py")
    with pytest.raises(PipelineError, match="already split"):
        compile_loaded(loaded, "split{stages=2},split{stages=2}", check=False)


def test_one_stage_is_the_whole_model():
    loaded = example("mlp.py")
    staged = compile_loaded(loaded, "split{stages=1}").module
    assert len(staged.stages) == 1
    torch.testing.assert_close(staged(*loaded.args), loaded.module(*loaded.args))
