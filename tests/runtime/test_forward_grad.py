"""Forward gradients: the estimators, the JVP directional derivative, and the engine end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradxform
from gradxform.errors import GradxformError
from gradxform.runtime.engine import InProcess, run_schedule
from gradxform.runtime.losses import classification_loss
from gradxform.runtime.executor import StageExecutor
from gradxform.autodiff.forward_grad import project, push
from gradxform.runtime.losses import per_sample_losses
from gradxform.runtime.schedules import make_schedule

D64 = dict(dtype=torch.float64)


def test_projection_equals_the_gradient_when_the_guess_is_the_target():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 3, 4, generator=g, **D64)                 # per-sample targets (N=5)
    v = t * torch.rand(5, 1, 1, generator=g, **D64) * 3          # guesses parallel to them, any scale
    d = (t * v).flatten(1).sum(1)                                 # <t_n, v_n>
    torch.testing.assert_close(project(v.unsqueeze(0), d.unsqueeze(0)), t, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_k_equal_n_independent_tangents_recover_the_gradient(n):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(4, n, generator=g, **D64)
    tangents = torch.randn(n, 4, n, generator=g, **D64)           # k = n random (independent) tangents
    d = torch.einsum("knd,nd->kn", tangents, t)
    torch.testing.assert_close(project(tangents, d, "project"), t, rtol=1e-9, atol=1e-9)
    if n > 1:  # fewer tangents only project onto their span
        approx = project(tangents[:-1], d[:-1], "project")
        assert (approx - t).abs().max() > 1e-3


@pytest.mark.parametrize("k, combine", [(1, "mean"), (4, "mean")])
def test_random_guess_estimator_is_unbiased(k, combine):
    """<t, e> e with e ~ N(0, I) (k = 1: what guess=random uses), and the mean over k tangents."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 6, generator=g, **D64)
    draws = 40000
    tangents = torch.randn(draws, k, 1, 6, generator=g, **D64)
    d = torch.einsum("bknd,nd->bkn", tangents, t)
    estimates = torch.stack([project(tangents[i], d[i], combine) for i in range(draws)])
    mean = estimates.mean(0)
    # the standard error per coordinate is about |t| sqrt((1 + 1/k) / draws); allow 4 of them
    tol = 4 * float(t.norm()) * ((1 + 1 / k) / draws) ** 0.5
    assert float((mean - t).abs().max()) < tol
    # one draw alone is far from the gradient (high variance), which is why local guesses matter
    assert float((estimates[0] - t).norm()) > 0.3 * float(t.norm())
    if k == 1:  # normalising by |e|^2 (the local-guess projection) would shrink the mean to t / D
        normalised = torch.stack([project(tangents[i], d[i], "project") for i in range(2000)]).mean(0)
        assert float((normalised - t / 6).abs().max()) < float((normalised - t).abs().max())


def test_jvp_directional_derivative_equals_the_backprop_dot_product():
    torch.manual_seed(0)
    rest = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    h = torch.randn(5, 6, **D64)
    y = torch.randint(0, 3, (5,))
    v = torch.randn(2, 5, 6, **D64)                               # two tangents, stacked
    d = push(lambda a: per_sample_losses(rest(a), y), (h,), (v,), "test")
    h_ = h.clone().requires_grad_(True)
    losses = per_sample_losses(rest(h_), y)
    for n in range(5):
        (grad,) = torch.autograd.grad(losses[n], h_, retain_graph=True)
        for i in range(2):
            torch.testing.assert_close(d[i, n], (grad * v[i]).sum(), rtol=1e-12, atol=1e-14)
    assert torch.isclose(losses.sum(), classification_loss(rest(h), y))


def test_tangents_through_dropout_see_the_forward_mask():
    """With the forward's RNG state replayed, every tangent is pushed through the mask the forward drew:
    the directional derivatives equal backprop's through that same mask."""
    torch.manual_seed(0)
    rest = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    h, y = torch.randn(5, 6, **D64), torch.randint(0, 3, (5,))
    v = torch.randn(3, 5, 6, **D64)
    rng = torch.get_rng_state()
    h_ = h.clone().requires_grad_(True)
    losses = per_sample_losses(rest(h_), y)          # the forward draws its mask here
    d = push(lambda a: per_sample_losses(rest(a), y), (h,), (v,), "test", rng=rng)
    for n in range(5):
        (grad,) = torch.autograd.grad(losses[n], h_, retain_graph=True)
        for i in range(3):
            torch.testing.assert_close(d[i, n], (grad * v[i]).sum(), rtol=1e-12, atol=1e-14)
    other = push(lambda a: per_sample_losses(rest(a), y), (h,), (v,), "test")  # another mask: other numbers
    assert not torch.allclose(other, d)


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.cls = nn.Linear(8, 3)

    def forward(self, x):
        return self.cls(self.body(x))


def _staged(pipeline: str, model: nn.Module | None = None):
    torch.manual_seed(0)
    model = (model or _TwoLayer()).double()
    return gradxform.compile(model, pipeline, example_inputs=(torch.randn(4, 6, **D64),))


def _train(staged, schedule: str, steps: int = 3, **kw):
    sched = make_schedule(schedule, **kw)
    sched.check(staged)  # what the schedule requires of the model, as the Trainer checks it
    exs = {j: StageExecutor(j, len(staged.stages), st, sched, torch.optim.SGD(st.parameters(), lr=0.5),
                            classification_loss) for j, st in enumerate(staged.stages)}
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(5, 6, generator=gen, **D64) for _ in range(steps)]
    ys = [torch.randint(0, 3, (5,), generator=gen) for _ in range(steps)]
    run_schedule(sched.ticks(len(staged.stages), steps), exs, InProcess(len(staged.stages)),
                 lambda mb: staged.first_inputs((xs[mb],), {}), lambda mb: ys[mb])
    return exs


def test_a_perfect_local_guess_makes_forward_gradients_equal_backprop():
    """When stage 0's head computes what stage 1 computes, its local gradient is the end-to-end one:
    the forward-gradient updates equal backprop's, step after step (the head copies stage 1's weights
    before each step, as its own training would otherwise move it away)."""
    ref = _staged("split{at=cls}")
    _train(ref, "backprop")
    fg = _staged("split{at=cls},aux-heads{head=linear}")
    head, cls = fg.stages[0].aux_head.body[0], fg.stages[1].get_submodule("cls")
    head.weight.data.copy_(cls.weight.data)
    head.bias.data.copy_(cls.bias.data)
    head.weight.requires_grad_(False)
    head.bias.requires_grad_(False)
    exs = _train(fg, "forward-grad", steps=1, guess="local")
    ref1 = _staged("split{at=cls}")
    _train(ref1, "backprop", steps=1)
    for a, b in zip(ref1.stages[0].parameters(), [p for n, p in fg.stages[0].named_parameters() if "aux" not in n]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert exs[0].stats.local_losses and exs[1].stats.losses


def test_random_guess_needs_no_head_and_moves_towards_lower_loss():
    staged = _staged("split{at=cls}")
    before = [p.clone() for p in staged.stages[0].parameters()]
    torch.manual_seed(0)
    _train(staged, "forward-grad", steps=2, guess="random", tangents=8, combine="project")
    assert any(not torch.equal(a, b) for a, b in zip(before, staged.stages[0].parameters()))


def test_local_schedule_trains_each_stage_on_its_head_only():
    staged = _staged("split{at=cls},aux-heads{head=linear}")
    stage0 = staged.stages[0]
    torch.manual_seed(0)
    x, y = torch.randn(5, 6, **D64), torch.randint(0, 3, (5,))
    expected = torch.autograd.grad(classification_loss(stage0.aux_head(stage0(x)[0]), y),
                                   list(stage0.parameters()))
    exs = {j: StageExecutor(j, 2, st, make_schedule("local"), torch.optim.SGD(st.parameters(), lr=0.0), classification_loss)
           for j, st in enumerate(staged.stages)}
    sched = make_schedule("local").ticks(2, 1)
    # stop before the update to read the gradients
    sched.ticks = [[[a for a in acts if a.kind != "update"] for acts in row] for row in sched.ticks]
    transport = InProcess(2)
    run_schedule(sched, exs, transport, lambda mb: (x,), lambda mb: y)
    for p, g in zip(stage0.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert not any(k[1] == "b" for k in transport.mailbox)      # no backward message was ever sent


def test_one_stage_local_equals_backprop():
    a, b = _staged("split{stages=1}"), _staged("split{stages=1}")
    _train(a, "backprop")
    _train(b, "local")
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_missing_head_is_a_clear_error():
    staged = _staged("split{at=cls}")
    with pytest.raises(GradxformError, match="stage 0 has no auxiliary head, which the local schedule"):
        _train(staged, "local")


class _Distances(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchors = nn.Parameter(torch.randn(5, 8))

    def forward(self, h):
        return torch.cdist(h, self.anchors)


class _Cdist(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.dist = _Distances()
        self.cls = nn.Linear(5, 3)

    def forward(self, x):
        return self.cls(self.dist(self.body(x)))


def test_op_without_forward_mode_names_the_op_and_the_layer():
    staged = _staged("split{at=dist},aux-heads{head=linear}", _Cdist())
    with pytest.raises(GradxformError, match=r"stage 1: '_cdist_forward' has no forward-mode derivative|"
                                             r"stage 1: 'cdist' has no forward-mode derivative") as e:
        _train(staged, "forward-grad", steps=1)
    assert "layer 'dist'" in str(e.value) and "local schedule" in e.value.hint


def test_forward_mode_error_outside_a_graph_still_names_the_failure():
    """Without a GraphModule to walk, the error still says what failed and where."""
    h = torch.randn(3, 4, **D64)
    with pytest.raises(GradxformError, match=r"^stage 2: an op has no forward-mode derivative: .*_cdist_forward"):
        push(lambda a: torch.cdist(a, a), (h,), (torch.randn(1, 3, 4, **D64),), "stage 2")


def test_non_finite_local_losses_and_estimates_name_the_stage():
    from gradxform.runtime.executor import Kept, TrainingError

    staged = _staged("split{at=cls},aux-heads{head=linear}")
    with pytest.raises(TrainingError, match="stage 0: non-finite auxiliary loss"):
        exs = {j: StageExecutor(j, 2, st, make_schedule("local"), torch.optim.SGD(st.parameters(), lr=0.1), classification_loss)
               for j, st in enumerate(staged.stages)}
        run_schedule(make_schedule("local").ticks(2, 1), exs, InProcess(2), lambda mb: (torch.full((5, 6), float("nan"), **D64),),
                     lambda mb: torch.zeros(5, dtype=torch.long))
    ex = StageExecutor(0, 2, staged.stages[0], make_schedule("forward-grad"), torch.optim.SGD(staged.stages[0].parameters(), lr=0.1),
                       classification_loss)
    h = torch.randn(5, 8, **D64, requires_grad=True)
    keep = Kept(outputs=h * 2, tangents=torch.randn(1, 5, 8, **D64))
    with pytest.raises(TrainingError, match="stage 0: non-finite forward-gradient estimate"):
        ex.kept[0] = keep
        ex.backward(0, {"derivatives": (torch.full((1, 5), float("inf"), **D64),)})
