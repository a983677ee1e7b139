"""``highway`` on whole models: golden graphs, unchanged outputs, exact gradients at k = L, cosines."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import gradxform
from gradxform.compiler import compile_loaded
from gradxform.nn.highway import HighwayGRU, HighwaySegment
from gradxform.runtime.losses import logits_of
from gradxform.autodiff.highway import gradient_cosines

from ..conftest import example

DIGITS = ["x:[16,1,8,8]"]


def test_golden_resnet34_segments_between_projection_blocks():
    result = compile_loaded(example("resnet.py:digits_resnet34", input_shapes=DIGITS), "highway")
    code = result.module.code
    FileCheck().check("relu = self.relu(bn1)").check_not("maxpool").check("highway0 = self.highway0(relu)").check(
        "downsample").check("add").check("highway1 = self.highway1(").check("downsample").check(
        "highway2 = self.highway2(").check("highway3 = self.highway3(").check("self.fc(").run(code)
    segments = [m for m in result.module.modules() if isinstance(m, HighwaySegment)]
    assert [s.names for s in segments] == [["layer1.0", "layer1.1", "layer1.2"], [f"layer2.{i}" for i in (1, 2, 3)],
                                           [f"layer3.{i}" for i in range(1, 6)], ["layer4.1", "layer4.2"]]
    assert all(s.kinds == ["relu"] * len(s.names) for s in segments)
    # g is the block's body; the ReLU after the addition stays in r
    FileCheck().check("self.l0(x)").check("self.l4(").check("return").run(segments[0].blocks[0].code)
    assert "self.l5" not in segments[0].blocks[0].code
    notes = result.report["passes"][0]["notes"]
    assert any(n.startswith("block layer2.0 stays an ordinary layer between highway segments (projection skip")
               for n in notes)
    assert any(n.startswith("highway2: 5 layers layer3.1 .. layer3.5; residual relu(x + g(x))") for n in notes)


def test_golden_vit_attention_and_mlp_are_separate_gamma_layers():
    result = compile_loaded(example("vit.py"), "highway{gamma=0.25}")
    FileCheck().check("add = cat + pos_embed").check("highway0 = self.highway0(add)").check(
        "self.norm(").run(result.module.code)
    seg = result.module.highway0
    assert len(seg.blocks) == 12 and seg.kinds == ["gamma"] * 12
    assert seg.group_layers == [list(range(0, 12, 2)), list(range(1, 12, 2))]   # attention, MLP
    notes = result.report["passes"][0]["notes"]
    assert any("(1-0.25) x + (g(x) + 0.25 x), K = 0.75 I; 2 group(s) of identical blocks [6, 6]" in n for n in notes)


def test_gru_becomes_a_highway_gru_with_the_same_state_dict():
    loaded = example("gru.py")
    keys = set(loaded.module.state_dict())
    result = compile_loaded(loaded, "highway{iterations=3}")
    assert isinstance(result.module.gru, HighwayGRU) and result.module.gru.highway_iterations == 3
    assert set(result.module.state_dict()) == keys
    notes = result.report["passes"][0]["notes"]
    assert any(n.startswith("gru: GRU (1 layer(s)) unrolled, one Highway layer per time step (32 at the example)")
               for n in notes)


def test_second_run_changes_nothing():
    result = compile_loaded(example("vit.py"), "highway,highway")
    first, second = result.report["passes"]
    assert first["changed"] and not second["changed"]
    assert second["notes"] == ["no residual run or recurrent layer found: nothing to convert"]


def test_short_runs_and_options():
    from gradxform.errors import PipelineError

    notes = compile_loaded(example("resnet.py"), "highway{min_layers=3}").report["passes"][0]["notes"]
    assert any(n.startswith("blocks layer1.0, layer1.1 not converted: fewer than min_layers=3") for n in notes)
    with pytest.raises(PipelineError, match="gamma must be in"):
        compile_loaded(example("mlp.py"), "highway{gamma=1.0}")
    with pytest.raises(PipelineError, match="iterations must be 0 or more"):
        compile_loaded(example("mlp.py"), "highway{iterations=-1}")


def _loss(loaded):
    return lambda m: logits_of(m(*loaded.args, **loaded.kwargs)).pow(2).mean()


@pytest.mark.parametrize("target, shapes", [("resnet.py:digits_resnet34", DIGITS), ("vit.py", None),
                                            ("gru.py", None), ("lm.py", None)])
def test_k_equal_to_depth_reproduces_autograd(target, shapes):
    """float64, training mode (BatchNorm on batch statistics): every gradient within 1e-10, buffers equal."""
    loaded = example(target, double=True, input_shapes=shapes)
    module = compile_loaded(loaded, "highway{iterations=64}", check=False).module.train()
    segments = [m for m in module.modules() if hasattr(m, "highway_iterations")]
    assert segments
    grads, buffers = {}, {}
    start = {k: b.clone() for k, b in module.named_buffers()}
    for exact in (True, False):
        for m in segments:
            m.exact = exact
        for k, b in module.named_buffers():
            b.copy_(start[k])
        module.zero_grad()
        _loss(loaded)(module).backward()
        grads[exact] = {k: p.grad.clone() for k, p in module.named_parameters()}
        buffers[exact] = {k: b.clone() for k, b in module.named_buffers()}
    for k in grads[True]:
        torch.testing.assert_close(grads[False][k], grads[True][k], rtol=1e-10, atol=1e-10, msg=k)
    for k in buffers[True]:
        assert torch.equal(buffers[True][k], buffers[False][k]), k


@pytest.mark.parametrize("target, layers, reached_by", [("gru.py", 32, 1), ("lm.py", 8, 2), ("vit.py", 12, 8)])
def test_cosine_reaches_099_before_k_equals_depth(target, layers, reached_by):
    loaded = example(target, double=True)
    module = compile_loaded(loaded, "highway", check=False).module.train()
    cos = gradient_cosines(module, _loss(loaded), [0, 1, 2, 4, 8, layers])
    assert cos[layers] == pytest.approx(1.0, abs=1e-12)
    assert cos[reached_by] > 0.99 and reached_by < layers, cos
    assert cos[0] < cos[layers]


@pytest.mark.slow
def test_digits_resnet_with_two_iterations_matches_backprop():
    """ResNet-34 on digits, 6 epochs: Highway-BP with k = 2 within 2 points of backprop (same seed, same
    epochs). Once trained, two iterations already give the exact gradient's direction (cosine > 0.99;
    its longest segment has L = 5 layers)."""
    import importlib.util

    from gradxform.runtime.data import digits

    from ..conftest import EXAMPLES
    from .test_reversible import train_digits

    spec = importlib.util.spec_from_file_location("resnet_example", EXAMPLES / "resnet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.randn(4, 1, 8, 8)
    accs, modules = {}, {}
    for pipeline in ("split{stages=1}", "highway{iterations=2}"):
        torch.manual_seed(0)
        modules[pipeline] = gradxform.compile(mod.digits_resnet34(), pipeline, example_inputs=(x,))
        accs[pipeline] = train_digits(modules[pipeline], epochs=6)
    print("digits ResNet-34 test accuracy:", accs)
    plain, highway = accs.values()
    assert plain > 0.95
    assert highway >= plain - 0.02, accs
    trained = modules["highway{iterations=2}"].train()
    xs, ys = digits()[0].tensors
    cos = gradient_cosines(trained, lambda m: torch.nn.functional.cross_entropy(m(xs[:256]), ys[:256]), [0, 1, 2, 5])
    print("cosine per k after training:", cos)
    assert cos[2] > 0.99 and cos[5] == pytest.approx(1.0, abs=1e-5), cos


class _LSTMTagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(16, 32, batch_first=True)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_lstm_becomes_a_highway_lstm_with_exact_gradients_at_k_equal_steps():
    from gradxform.nn.highway import HighwayLSTM

    torch.manual_seed(0)
    model = _LSTMTagger().double()
    x = torch.randn(4, 12, 16, dtype=torch.float64)
    ref = torch.autograd.grad(model(x).pow(2).mean(), list(model.parameters()))
    result = gradxform.compile(model, "highway{iterations=12}", example_inputs=(x,))
    assert isinstance(result.lstm, HighwayLSTM)
    notes = result.gx_report["passes"][0]["notes"]
    assert any(n.startswith("lstm: LSTM (1 layer(s)) unrolled, one Highway layer per time step (12 at the example)")
               for n in notes)
    got = torch.autograd.grad(result(x).pow(2).mean(), list(result.parameters()))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class _TwoWayGRU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = torch.nn.GRU(8, 8, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.gru(x)[0][:, -1]


def test_layers_it_cannot_convert_are_reported():
    from gradxform.errors import PipelineError

    result = gradxform.compile(_TwoWayGRU(), "highway", example_inputs=(torch.randn(2, 5, 8),))
    assert result.gx_report["passes"][0]["notes"][0] == "gru: not converted: bidirectional GRU"
    assert type(result.gru) is torch.nn.GRU
    with pytest.raises(PipelineError, match="min_layers must be at least 1"):
        compile_loaded(example("mlp.py"), "highway{min_layers=0}")


class _DropBlock(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.ln, self.fc, self.drop = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.fc(self.ln(x)))


@pytest.mark.parametrize("p, converted", [(0.0, True), (0.1, False)])
def test_dropout_that_cannot_draw_does_not_stop_highway(p, converted):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(_DropBlock(p) for _ in range(3))).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    out = gradxform.compile(model, "highway{iterations=1}", example_inputs=(x,))
    segments = [m for m in out.modules() if isinstance(m, HighwaySegment)]
    assert len(segments) == int(converted)
    notes = out.gx_report["passes"][0]["notes"]
    if converted:
        assert len(segments[0].blocks) == 3
        torch.testing.assert_close(out(x), model(x), rtol=0, atol=1e-12)
    else:
        assert "block 0 not converted: it draws random numbers (dropout); the backward's re-run would draw others" \
            in notes
