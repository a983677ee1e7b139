"""Symbolic shape metadata and the cost model."""

from __future__ import annotations

import resource

import sympy
import torch
import torch.nn as nn

from gradxform.compiler import prepare
from gradxform.frontend.loader import LoadedModel
from gradxform.ir.cost import evaluate, hints, node_costs, total

from ..conftest import example

B, T = sympy.symbols("B T", positive=True, integer=True)


def test_conv_and_linear_flops_are_symbolic_in_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    gm, _, _, _ = prepare(LoadedModel(model, (torch.randn(4, 3, 4, 4),)))
    costs = {n.target: c for n, c in node_costs(gm).items()}
    assert costs["0"].flops == 2 * B * 8 * 4 * 4 * (3 * 3 * 3)
    assert costs["1"].flops == B * 8 * 16
    assert costs["3"].flops == 2 * B * 10 * 128
    assert costs["3"].param_bytes == (10 * 128 + 10) * 4
    assert costs["0"].act_bytes == B * 8 * 16 * 4
    assert costs["2"].act_bytes == 0  # a view allocates nothing


def test_sequence_models_are_symbolic_in_T():
    gm, _, _, _ = prepare(example("lm.py"))
    whole = total(node_costs(gm).values())
    assert whole.flops.free_symbols == {B, T}
    assert sympy.degree(whole.flops, T) == 2  # attention is quadratic in the sequence length
    assert evaluate(whole.flops, hints(gm)) == float(whole.flops.subs({B: 2, T: 16}))


def test_gru_keeps_symbols_through_its_shape_rule():
    gm, _, _, _ = prepare(example("gru.py"))
    gru = next(c for n, c in node_costs(gm).items() if n.target == "gru")
    assert gru.flops == 2 * B * T * 3 * 64 * (64 + 64)


def test_fake_propagation_allocates_no_activations():
    loaded = example("resnet.py:resnet50_imagenet", input_shapes=["x:[64,3,224,224]"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gm, _, _, _ = prepare(loaded)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape)[1:] == (1000,)
    # one real activation of the first conv alone would be 64*64*112*112*4 bytes = 196 MiB
    assert grown_mib < 150


def test_every_node_has_metadata():
    for target in ("resnet.py", "vit.py", "lm.py", "gru.py", "mlp.py"):
        gm, _, _, _ = prepare(example(target))
        missing = [n.name for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta]
        assert not missing, (target, missing)


def test_a_cost_of_one_bare_symbol_evaluates():
    # a position-id add costs T FLOPs: xreplace turns the bare symbol into a plain int
    assert evaluate(T, {B: 2, T: 16}) == 16.0
    assert evaluate(2 * B * T, {B: 2, T: 16}) == 64.0
    assert evaluate(sympy.Integer(7), {}) == 7.0


def test_position_ids_add_costs_T_and_splits():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(10, 8), nn.Embedding(16, 8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 10)

        def forward(self, ids):
            positions = torch.arange(ids.shape[1]) + 0  # T FLOPs, a bare symbol
            return self.b(torch.relu(self.a(self.tok(ids) + self.pos(positions))))

    import gradxform

    ids = torch.randint(0, 10, (2, 5))
    staged = gradxform.compile(Positions(), "split{stages=2}", example_inputs=(ids,), tracer="export")
    assert len(staged.stages) == 2
    gm, _, _, _ = prepare(LoadedModel(Positions(), (ids,)), "export")
    assert T in {c.flops for c in node_costs(gm).values()}
