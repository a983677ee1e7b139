"""The Moonwalk engine on hand-made chains: every rule, every mode, exact against autograd in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gradxform.autodiff.memory import held_bytes
from gradxform.autodiff.moonwalk import Held, Map
from gradxform.errors import GradxformError
from gradxform.nn.moonwalk import MoonwalkChain
from gradxform.nn.reversible import LeapfrogCoupling, MomentumCoupling, ReversibleChain

COUPLINGS = [LeapfrogCoupling(), LeapfrogCoupling("mean"), MomentumCoupling(0.9)]
MODES = ["mixed", "forward", "naive"]


class Layer(nn.Module):
    """A piece: ``layer(x, *side)``."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x, *side):
        return self.m(x)


class ConvBlock(nn.Module):
    def __init__(self, c: int, dropout: float = 0.0):
        super().__init__()
        layers = [nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
        self.f = nn.Sequential(*layers, *([nn.Dropout(dropout)] if dropout else []))

    def forward(self, x, *side):
        return self.f(x)


def every_rule(coupling, dropout: float = 0.0) -> tuple[list, list, list]:
    """A chain with one piece of every rule (and the rule's spec)."""
    pieces = [
        (Layer(nn.Conv2d(1, 4, 3, padding=1)), "whole", {}),             # raises the dimension
        (Layer(nn.BatchNorm2d(4)), "bn", {"weight": "m.weight"}),
        (Layer(nn.ReLU()), "diag", {}),
        (Layer(nn.Identity()), "isometry", {}),
        (ReversibleChain([ConvBlock(4, dropout) for _ in range(3)], coupling, random=[dropout > 0] * 3), "coupling", {}),
        (Layer(nn.Conv2d(4, 4, 2, stride=2)), "cg", {}),                  # a strided convolution: submersive
        (Layer(nn.Tanh()), "diag", {}),
        (ReversibleChain([ConvBlock(4, dropout)], coupling, random=[dropout > 0]), "coupling", {}),
        (Layer(nn.Dropout(dropout)), "diag", {}),
        (Layer(nn.AvgPool2d(2)), "isometry", {}),                          # disjoint windows: J J^T = I / 4
        (Layer(nn.Flatten()), "isometry", {}),
        (Layer(nn.LayerNorm(4)), "ln", {"weight": "m.weight", "dims": [4], "eps": 1e-5}),
        (Layer(nn.Linear(4, 3)), "linear", {"weight": "m.weight"}),
    ]
    return [p for p, _, _ in pieces], [r for _, r, _ in pieces], [s for _, _, s in pieces]


def build(coupling, mode: str, dropout: float = 0.0, **kw) -> MoonwalkChain:
    torch.manual_seed(0)
    pieces, rules, specs = every_rule(coupling, dropout)
    return MoonwalkChain(pieces, rules, specs=specs, mode=mode, **kw).double().train()


def step(module: nn.Module, x: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, dict, dict]:
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = module(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    return x.grad, {k: p.grad.clone() for k, p in module.named_parameters()}, \
        {k: b.clone() for k, b in module.named_buffers()}


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-10)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-10, atol=1e-10, msg=k)
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k  # BatchNorm statistics updated once, as by autograd


X = torch.randn(3, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("coupling", COUPLINGS, ids=lambda c: c.describe())
def test_every_rule_equals_autograd(mode, coupling):
    reference = step(build(coupling, "autograd"), X)
    assert_same(step(build(coupling, mode), X), reference)


def test_stored_anchors_give_the_same_gradients():
    reference = step(build(LeapfrogCoupling(), "autograd"), X)
    assert_same(step(build(LeapfrogCoupling(), "mixed", anchors="store"), X), reference)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_is_replayed(mode):
    reference = step(build(LeapfrogCoupling(), "autograd", dropout=0.3), X)
    got = step(build(LeapfrogCoupling(), mode, dropout=0.3), X)
    assert_same(got, reference)
    # the masks did drop something, and the backward left the global RNG where the forward put it
    module = build(LeapfrogCoupling(), mode, dropout=0.3)
    out = module(X)
    state = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(state, torch.get_rng_state())


def test_drift_check_is_logged():
    module = build(MomentumCoupling(0.9), "mixed")
    for _ in range(2):
        step(module, X)
    assert [d["call"] for d in module.drift_log] == [1, 2]
    assert all(d["relative_error"] < 1e-12 and d["exit_residual"] < 1e-12 for d in module.drift_log)
    assert module.last["fragment_bytes"]  # the fragments it kept, by piece


def test_float32_drift_is_small_but_visible():
    torch.manual_seed(0)
    pieces, rules, specs = every_rule(LeapfrogCoupling())
    module = MoonwalkChain(pieces, rules, specs=specs).train()
    step(module, X.float())
    assert 0 < module.last["drift"] < 1e-4


def _stack(depth: int, mode: str, width: int = 32) -> nn.Module:
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

        def forward(self, x, *side):
            return self.f(x)

    torch.manual_seed(0)
    chain = ReversibleChain([Block() for _ in range(depth)], LeapfrogCoupling(), memory_saving=mode != "backprop")
    head = Layer(nn.Linear(width, 10))
    if mode == "backprop":
        return nn.Sequential(chain, head)
    return MoonwalkChain([chain, head], ["coupling", "linear"], specs=[{}, {"weight": "m.weight"}], mode=mode)


def peak(module: nn.Module, x: torch.Tensor) -> int:
    with held_bytes() as counter:
        module(x).logsumexp(1).sum().backward()
    assert counter.live == 0  # everything packed was freed
    return counter.peak


@pytest.mark.parametrize("mode", ["mixed", "forward"])
def test_held_bytes_do_not_grow_with_depth(mode):
    x = torch.randn(16, 32)
    got = {d: peak(_stack(d, mode), x) for d in (4, 16)}
    assert got[16] <= got[4]
    assert got[16] * 4 <= peak(_stack(16, "backprop"), x)


def test_stored_anchors_are_held_for_backward():
    x = torch.randn(3, 1, 4, 4)
    recompute = build(LeapfrogCoupling(), "mixed").float()
    store = build(LeapfrogCoupling(), "mixed", anchors="store").float()
    with held_bytes() as a:
        out = recompute(x)
    with held_bytes() as b:
        out2 = store(x)
    # both keep the input of the last run that cannot be rebuilt; store also the one before it
    # (the first chain's final state after the strided convolution: 2 streams of 3 x 4 x 4 x 4 floats)
    assert b.live - a.live == 2 * 3 * 4 * 4 * 4 * 4
    del out, out2


def test_held_fragments_go_through_saved_tensor_hooks():
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.numel()) or t, lambda t: t):
        kept = Held([torch.ones(5), None, torch.zeros(2, 3)])
    assert seen == [5, 6] and kept.nbytes == 44
    a, none, b = kept.take()
    assert none is None and torch.equal(a, torch.ones(5)) and b.shape == (2, 3)


def test_forward_mode_uses_one_tangent_per_sample_direction_without_batchnorm():
    torch.manual_seed(0)
    pieces = [Layer(nn.Linear(6, 6)), Layer(nn.Tanh()), Layer(nn.Linear(6, 2))]
    kw = dict(specs=[{"weight": "m.weight"}, {}, {"weight": "m.weight"}])
    mw = MoonwalkChain(pieces, ["linear", "diag", "linear"], mode="forward", **kw).double()
    ref = MoonwalkChain(pieces, ["linear", "diag", "linear"], mode="autograd", **kw).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert_same(step(mw, x), step(ref, x))
    assert mw.last["jvps"] == 6  # g_0 from the 6 directions of a sample, not 5 * 6


def test_a_misclassified_isometry_is_caught():
    torch.manual_seed(0)
    module = MoonwalkChain([Layer(nn.Linear(4, 3))], ["isometry"]).double()
    with pytest.raises(GradxformError, match="was taken for an isometry"):
        step(module, torch.randn(2, 4, dtype=torch.float64))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        MoonwalkChain([Layer(nn.Tanh())], ["diag"], mode="sideways")
    with pytest.raises(ValueError, match="rule 'coupling' goes with a ReversibleChain"):
        MoonwalkChain([Layer(nn.Tanh())], ["coupling"])
    with pytest.raises(ValueError, match="unknown rule"):
        Map(nn.Tanh(), "guess", "t")


@pytest.mark.parametrize("mode", MODES)
def test_runs_under_saved_tensor_hooks(mode):
    """Memory accounting and offloading hooks stay on through every sweep (torch.func.vjp would refuse)."""
    reference = step(build(LeapfrogCoupling(), "autograd"), X)
    with held_bytes() as counter:
        got = step(build(LeapfrogCoupling(), mode), X)
    assert_same(got, reference)
    assert counter.peak > 0 and counter.live == 0


def test_a_layer_that_changes_between_sweeps_is_named():
    class Drifting(nn.Module):
        """ReLU(x - c) with c moving at every call: the sweeps disagree on which units are zero."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x, *side):
            self.calls += 1
            return torch.relu(x - 0.3 * self.calls)

    torch.manual_seed(0)
    module = MoonwalkChain([Layer(nn.Linear(8, 8)), Drifting(), Layer(nn.Linear(8, 2))], ["linear", "diag", "linear"],
                           names=["fc1", "act", "fc2"], specs=[{"weight": "m.weight"}, {}, {"weight": "m.weight"}])
    with pytest.raises(GradxformError, match="the fragment of 'act' does not fit its recomputed mask"):
        step(module.double(), torch.randn(16, 8, dtype=torch.float64))


def test_unknown_couplings_and_open_chains_are_refused():
    class Twisted:
        name = "twisted"

    with pytest.raises(GradxformError, match="no vijp for the 'twisted' coupling"):
        from gradxform.autodiff.moonwalk import Step

        Step(Twisted(), nn.Identity(), "b0")
    open_chain = ReversibleChain([ConvBlock(2)], LeapfrogCoupling(), exit=False)
    with pytest.raises(ValueError, match="must enter and exit its coupling"):
        MoonwalkChain([open_chain], ["coupling"])
