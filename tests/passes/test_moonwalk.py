"""``moonwalk`` on whole models: the rewrite, exact gradients on the examples, the report, errors, training."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradxform
from gradxform.autodiff.memory import held_bytes
from gradxform.errors import GradxformError, PipelineError
from gradxform.nn import MoonwalkChain, ReversibleChain, StoredInputBlock

from ..conftest import EXAMPLES, run_cli


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


resnet, vit, lm = _example("resnet"), _example("vit"), _example("lm")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.f1 = nn.Linear(8, 8)
        self.f2 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + torch.tanh(self.f1(h))
        h = h + torch.tanh(self.f2(h))
        return self.head(self.norm(h))


def _code(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


BEFORE = """
def forward(self, x):
    stem = self.stem(x);  x = None
    relu = torch.nn.functional.relu(stem, inplace = False);  stem = None
    f1 = self.f1(relu)
    tanh = torch.tanh(f1);  f1 = None
    add = relu + tanh;  relu = tanh = None
    f2 = self.f2(add)
    tanh_1 = torch.tanh(f2);  f2 = None
    add_1 = add + tanh_1;  add = tanh_1 = None
    norm = self.norm(add_1);  add_1 = None
    head = self.head(norm);  norm = None
    return head
"""

EXPECTED = """
def forward(self, x):
    moonwalk0 = self.moonwalk0(x);  x = None
    return moonwalk0
"""

EXPECTED_PIECES = [  # (name, rule, code)
    ("stem", "whole", "def forward(self, x):\n stem = self.stem(x);  x = None\n return stem"),
    ("relu", "diag", "def forward(self, x):\n relu = torch.nn.functional.relu(x, inplace = False);  x = None\n"
                     " return relu"),
    ("rev0", "coupling", None),
    ("norm", "ln", "def forward(self, x):\n norm = self.norm(x);  x = None\n return norm"),
    ("head", "linear", "def forward(self, x):\n head = self.head(x);  x = None\n return head"),
]
EXPECTED_BLOCK = "def forward(self, x):\n f1 = self.f1(x);  x = None\n tanh = torch.tanh(f1);  f1 = None\n return tanh"


def test_before_and_expected_on_a_tiny_graph():
    x = torch.randn(2, 4)
    before = gradxform.trace(Tiny(), (x,))
    assert _code(before.code) == _code(BEFORE)
    after = gradxform.compile(Tiny(), "moonwalk", example_inputs=(x,))
    assert _code(after.code) == _code(EXPECTED)
    chain = after.moonwalk0
    assert isinstance(chain, MoonwalkChain)
    assert [(n, r) for n, r in zip(chain.names, chain.rules)] == [(n, r) for n, r, _ in EXPECTED_PIECES]
    for piece, (_, rule, code) in zip(chain.pieces, EXPECTED_PIECES):
        if rule == "coupling":
            assert isinstance(piece, ReversibleChain) and piece.names == ["f1", "f2"]
            assert _code(piece.blocks[0].code) == _code(EXPECTED_BLOCK)
        else:
            assert _code(piece.code) == _code(code)
    assert chain.specs[3] == {"random": False, "dims": [8], "eps": 1e-5, "weight": "norm.weight"}
    assert chain.specs[4] == {"random": False, "weight": "head.weight"}


def test_a_second_run_changes_nothing():
    x = torch.randn(2, 4)
    module = gradxform.compile(Tiny(), "moonwalk,moonwalk", example_inputs=(x,))
    first, second = module.gx_report["passes"]
    assert first["changed"] and not second["changed"]


# ------------------------------------------------------------------------------------ exact gradients


def _models():
    return {
        # the digits ResNet at width 4: every kind of piece, small enough for forward and naive modes
        "resnet": lambda: (resnet.resnet18(in_channels=1, width=4, image_size=8),
                           (torch.randn(2, 1, 8, 8),), {}),
        "digits_resnet": lambda: (resnet.digits_resnet(), (torch.randn(2, 1, 8, 8),), {}),
        "vit": lambda: (vit.ViT(image=8, patch=4, channels=1, dim=8, depth=2, heads=2, num_classes=3),
                        (torch.randn(2, 1, 8, 8),), {}),
        "lm": lambda: (lm.DecoderLM(lm.LMConfig(vocab_size=16, hidden_size=8, num_layers=2, num_heads=2,
                                                max_positions=8)),
                       (torch.randint(0, 16, (2, 4)),), {"attention_mask": torch.ones(2, 4, dtype=torch.long)}),
    }


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


_COMPILED: dict[tuple[str, str], tuple] = {}


def compiled(name: str, pipeline: str = "moonwalk") -> tuple:
    """(model, compiled module, args, kwargs, initial state) in float64, compiled once per test session."""
    key = (name, pipeline)
    if key not in _COMPILED:
        torch.manual_seed(0)
        model, args, kwargs = _models()[name]()
        model.double().train()
        args = tuple(a.double() if a.is_floating_point() else a for a in args)
        module = gradxform.compile(model, pipeline, example_inputs=args, example_kwargs=kwargs, check=False)
        _COMPILED[key] = (model, module, args, kwargs, {k: v.clone() for k, v in model.state_dict().items()})
    return _COMPILED[key]


def gradients(name: str, mode: str, pipeline: str = "moonwalk") -> tuple[dict, dict, object]:
    """Gradients and buffers of one training step in ``mode``, by the original model's parameter names."""
    model, module, args, kwargs, initial = compiled(name, pipeline)
    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    for m in module.modules():
        if isinstance(m, MoonwalkChain):
            m.mode = mode
    module.train()
    out = _logits(module(*args, **kwargs))
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return ({k: p.grad.clone() for k, p in model.named_parameters()},
            {k: b.clone() for k, b in model.named_buffers()}, module)


def assert_exact(name: str, mode: str, pipeline: str = "moonwalk") -> object:
    ref_grads, ref_buffers, _ = gradients(name, "autograd")
    grads, buffers, module = gradients(name, mode, pipeline)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-10, atol=1e-10, msg=k)
    for k in buffers:
        assert torch.equal(buffers[k], ref_buffers[k]), k
    return module


@pytest.mark.parametrize("mode", ["mixed", "forward", "naive"])
@pytest.mark.parametrize("name", ["resnet", "vit", "lm"])
def test_gradients_equal_autograd(name, mode):
    module = assert_exact(name, mode)
    assert any(isinstance(m, MoonwalkChain) for m in module.modules())
    if name == "lm":
        assert module.gx_report["tracer"] == "export"


def test_digits_resnet_mixed_gradients_equal_autograd():
    assert_exact("digits_resnet", "mixed")
    assert_exact("digits_resnet", "mixed", "moonwalk{anchors=store}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["forward", "naive"])
def test_digits_resnet_forward_and_naive_gradients_equal_autograd(mode):
    assert_exact("digits_resnet", mode)


def test_the_mode_option_reaches_the_chains():
    module = gradxform.compile(Tiny(), "moonwalk{mode=forward,anchors=store,chunk=8}", example_inputs=(torch.randn(2, 4),))
    assert (module.moonwalk0.mode, module.moonwalk0.anchors, module.moonwalk0.chunk) == ("forward", "store", 8)


def test_fragments_off_stores_inputs_and_stays_exact():
    module = assert_exact("resnet", "mixed", "moonwalk{fragments=false}")
    stored = [m.name for m in module.modules() if isinstance(m, StoredInputBlock)]
    assert stored == ["conv1", "layer2.0", "layer3.0", "layer4.0"]
    chains = [m for m in module.modules() if isinstance(m, MoonwalkChain)]
    assert [c.names for c in chains][0] == ["rev0"]  # the example's nn.Identity maxpool is dropped at trace


# ------------------------------------------------------------------------------------ report


def test_report_lists_every_block():
    module = compiled("digits_resnet")[1]
    record = module.gx_report["passes"][0]
    blocks = {b["block"]: b for b in record["info"]["chains"][0]["blocks"]}
    assert [(k, b["kind"]) for k, b in blocks.items()] == [
        ("conv1", "fragmental checkpoint"), ("bn1", "fragmental checkpoint"), ("relu", "fragmental checkpoint"),
        ("rev0", "invertible"), ("layer2.0", "fragmental checkpoint"),
        ("rev1", "invertible"), ("layer3.0", "fragmental checkpoint"), ("rev2", "invertible"),
        ("layer4.0", "fragmental checkpoint"), ("rev3", "invertible"), ("avgpool", "invertible"),
        ("flatten", "invertible"), ("fc", "submersive with a right inverse")]
    # bytes kept at the example (batch 2, float64): BatchNorm's 2 scalars per channel, whole cotangents
    assert blocks["bn1"]["bytes_kept"] == 2 * 16 * 8
    assert blocks["conv1"]["bytes_kept"] == 2 * 16 * 8 * 8 * 8
    assert blocks["layer2.0"]["bytes_kept"] == 2 * 32 * 4 * 4 * 8
    assert blocks["rev0"]["bytes_kept"] == 2 * 16 * 8 * 8 * 8     # the second stream's cotangent
    assert 0 < blocks["relu"]["bytes_kept"] < blocks["conv1"]["bytes_kept"]
    assert blocks["fc"]["bytes_kept"] is None
    assert record["info"]["chains"][0]["drift_at_example"] < 1e-12
    notes = "\n".join(record["notes"])
    assert "conv1: fragmental checkpoint: 'Conv2d' raises the dimension (128 -> 2048 values)" in notes
    assert "fc: submersive with a right inverse: Linear 128 -> 10: least squares" in notes
    assert "reversible: block layer2.0 not converted: projection skip" in notes
    assert record["info"]["schedule"] == "moonwalk"


def test_the_pass_declares_its_schedule():
    from gradxform.passes import PASSES, compiled_schedule

    assert PASSES["moonwalk"].schedule == "moonwalk" and compiled_schedule("moonwalk") == "moonwalk"


# ------------------------------------------------------------------------------------ the module


def test_loss_backward_runs_moonwalk_and_keeps_only_the_input():
    x = torch.randn(2, 1, 8, 8)
    torch.manual_seed(0)
    module = gradxform.compile(resnet.digits_resnet(), "moonwalk", example_inputs=(x,), check=False).train()
    with held_bytes() as counter:
        out = module(x)
        kept = counter.live
        assert type(out.grad_fn).__name__ == "_MoonwalkFunctionBackward"
        out.logsumexp(1).sum().backward()
    # the chain's input, BatchNorm's recorded statistics (2 per channel per layer) and the last coupling's
    # final state (the input of the head, which cannot be rebuilt): no activation of any layer
    stats = sum(2 * m.num_features * 4 for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    last_state = 2 * (2 * 128 * 1 * 1) * 4
    assert kept == x.numel() * 4 + stats + last_state
    assert module.moonwalk0.last["drift"] < 1e-4


def test_retracing_keeps_the_chain_a_leaf():
    x = torch.randn(2, 4)
    module = gradxform.compile(Tiny(), "moonwalk", example_inputs=(x,))
    again = gradxform.trace(module, (x,))
    assert [n.target for n in again.graph.nodes if n.op == "call_module"] == ["moonwalk0"]


def test_reload_from_an_artefact(tmp_path):
    x = torch.randn(3, 64)
    module = gradxform.compile(str(EXAMPLES / "mlp.py"), "moonwalk")
    gradxform.save(module, tmp_path)
    again = gradxform.load(tmp_path)
    module.eval(), again.eval()
    torch.testing.assert_close(again(x), module(x), rtol=0, atol=0)
    assert any(isinstance(m, MoonwalkChain) for m in again.modules())


# ------------------------------------------------------------------------------------ bad input


class Widening(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 16)
        self.fc2 = nn.Linear(16, 32)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_a_model_with_nothing_to_carry_is_refused():
    with pytest.raises(GradxformError) as e:
        gradxform.compile(Widening(), "moonwalk", example_inputs=(torch.randn(2, 4),))
    text = str(e.value)
    assert "has no reversible or submersive part: the chain stops at block 'fc1': Linear 4 -> 16 raises the " \
           "dimension" in text
    assert "no identity-skip residual block for `reversible`" in text


def test_without_fragments_the_first_blocking_layer_is_named():
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.down = nn.Conv2d(4, 4, 3, padding=1, stride=2)
            self.skip = nn.Conv2d(4, 4, 1, stride=2)

        def forward(self, x):
            h = F.relu(self.conv(x))
            return F.relu(self.down(h) + self.skip(h))

    with pytest.raises(GradxformError) as e:
        gradxform.compile(Stem(), "moonwalk{fragments=false}", example_inputs=(torch.randn(2, 1, 8, 8),))
    text = str(e.value)
    assert "the chain stops at block 'conv': 'Conv2d' raises the dimension (128 -> 512 values)" in text
    assert "--pass reversible` first to see why" in text and "moonwalk{fragments=true}" in text


class ResidualMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU()) for _ in range(6)])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_low_precision_is_refused_with_the_measured_drift():
    torch.manual_seed(0)
    model = ResidualMLP().to(torch.bfloat16)
    with pytest.raises(GradxformError) as e:
        gradxform.compile(model, "moonwalk", example_inputs=(torch.randn(4, 8, dtype=torch.bfloat16),), check=False)
    text = str(e.value)
    found = re.search(r"runs in bfloat16: on the example inputs the carried cotangent misses the loss gradient by "
                      r"([0-9.e+-]+) \(relative\)", text)
    assert found and float(found.group(1)) > 1e-4, text
    assert "moonwalk{low_precision=warn}" in text


def test_low_precision_warns_when_asked():
    torch.manual_seed(0)
    model = ResidualMLP().to(torch.bfloat16)
    with pytest.warns(UserWarning, match="runs in torch.bfloat16; drift at the example"):
        module = gradxform.compile(model, "moonwalk{low_precision=warn}",
                                   example_inputs=(torch.randn(4, 8, dtype=torch.bfloat16),), check=False)
    assert any("low precision" in n for n in module.gx_report["passes"][0]["notes"])


def test_invalid_options():
    with pytest.raises(PipelineError, match="gamma must be in"):
        gradxform.compile(Tiny(), "moonwalk{coupling=momentum,gamma=1.5}", example_inputs=(torch.randn(2, 4),))
    with pytest.raises(PipelineError, match="option 'mode' of 'moonwalk'"):
        gradxform.compile(Tiny(), "moonwalk{mode=backwards}", example_inputs=(torch.randn(2, 4),))


# ------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_cli_trains_with_moonwalk(tmp_path):
    r = run_cli("train", f"{EXAMPLES / 'resnet.py'}:digits_resnet", "--pass", "moonwalk", "--epochs", "1",
                "--batch-size", "128", "--data", "digits", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final test accuracy" in r.stdout and "(moonwalk, 1 stage(s)" in r.stdout


@pytest.mark.slow
def test_digits_training_matches_backprop():
    """Exact gradients: 8 epochs of Moonwalk reach backprop's test accuracy on the same architecture."""
    from .test_reversible import train_digits

    x = torch.randn(4, 1, 8, 8)
    acc = {}
    for mode in ("autograd", "mixed"):
        torch.manual_seed(0)
        module = gradxform.compile(resnet.digits_resnet(), f"moonwalk{{mode={mode}}}", example_inputs=(x,))
        acc[mode] = train_digits(module, epochs=8)
    assert acc["autograd"] > 0.95
    # float32 rounding (1e-6 per step) moves the two trajectories apart over 8 epochs; 0.02 is 7 of
    # the 360 test digits
    assert abs(acc["mixed"] - acc["autograd"]) <= 0.02, acc
