"""Growth maths against closed forms and direct solutions (float64), surgery, optimizer state, digits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from gradxform.errors import GradxformError
from gradxform.ir.growth import growable_pairs, growth_record
from gradxform.nn.growth import (GrowthConfig, GrowthStep, Insertion, best_update, candidate, collect_statistics,
                                 forward_flops, grow_once, held_out_loss, inverse_sqrt, new_neurons, summed_cross_entropy)


class MLP(nn.Module):
    def __init__(self, d=5, h=3, out=4, act=nn.Tanh, depth=1):
        super().__init__()
        dims = [d] + [h] * depth
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), act()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], out)

    def forward(self, x):
        return self.head(self.body(x))


class ConvNet(nn.Module):
    def __init__(self, c=2, h=3, out=3, norm=False, act=nn.Tanh, bias=True):
        super().__init__()
        self.c1 = nn.Conv2d(c, h, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(h) if norm else nn.Identity()
        self.act = act()
        self.c2 = nn.Conv2d(h, out, 3, padding=1, stride=2)

    def forward(self, x):
        return self.c2(self.act(self.bn(self.c1(x)))).mean((2, 3))


def _graph(model, dtype=torch.float64):
    torch.manual_seed(0)
    return fx.symbolic_trace(model.to(dtype))


def _data(shape, n=96, classes=4, batches=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    step = n // batches
    return [(x[i:i + step], y[i:i + step]) for i in range(0, n, step)], x, y


def _pair(gm, i=0):
    return growable_pairs(gm)[0][i]


def test_statistics_equal_their_closed_forms_linear():
    gm = _graph(MLP())
    batches, x, y = _data((5,))
    pair = _pair(gm)
    stats, total, seen = collect_statistics(gm, [pair], batches)
    st = stats[pair.name]
    # closed forms on the whole statistical batch at once
    h = torch.tanh(gm.get_submodule("body.0")(x))
    a = gm.head(h)
    loss = F.cross_entropy(a, y, reduction="sum")
    dA, = torch.autograd.grad(loss, a)
    one = torch.ones(len(x), 1, dtype=x.dtype)
    B, Bp = torch.cat([h, one], 1).detach(), torch.cat([x, one], 1)
    n = len(x)
    for got, want in [(st.S, B.T @ B / n), (st.M, B.T @ dA / n), (st.S_prev, Bp.T @ Bp / n),
                      (st.M_prev, Bp.T @ dA / n), (st.C, Bp.T @ B / n)]:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert st.n == st.n_prev == n and seen == n
    assert total == pytest.approx(float(loss.detach()), rel=1e-12)
    assert all(p.grad is None for p in gm.parameters())   # the statistics pass leaves no gradient behind


def test_conv_statistics_match_the_weight_gradient_and_positions_are_samples():
    gm = _graph(ConvNet())
    batches, x, y = _data((2, 5, 5), classes=3)
    pair = _pair(gm)
    st = collect_statistics(gm, [pair], batches)[0][pair.name]
    assert st.n == len(x) * 3 * 3 and st.n_prev == len(x) * 5 * 5   # stride-2 l2: 3x3 positions
    # n M is the gradient of the summed loss with respect to l2's weight and bias
    loss = F.cross_entropy(gm(x), y, reduction="sum")
    gw, gb = torch.autograd.grad(loss, [gm.c2.weight, gm.c2.bias])
    torch.testing.assert_close(st.M[:-1].T * st.n, gw.reshape(3, -1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.M[-1] * st.n, gb, rtol=1e-10, atol=1e-12)
    # S_-2 by an explicit loop over padded positions
    xp = F.pad(x, (1, 1, 1, 1))
    rows = [torch.cat([xp[:, :, i:i + 3, j:j + 3].reshape(len(x), -1), torch.ones(len(x), 1, dtype=x.dtype)], 1)
            for i in range(5) for j in range(5)]
    Bp = torch.cat(rows)
    torch.testing.assert_close(st.S_prev, Bp.T @ Bp / st.n_prev, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model,shape", [(lambda: MLP(h=3), (5,)), (lambda: ConvNet(), (2, 5, 5))], ids=["linear", "conv"])
def test_two_passes_give_the_one_pass_bottleneck_product(model, shape):
    gm = _graph(model())
    batches, _, _ = _data(shape, classes=4 if shape == (5,) else 3)
    pair = _pair(gm)
    one = collect_statistics(gm, [pair], batches)[0][pair.name]
    first = collect_statistics(gm, [pair], batches, kernel=False)[0][pair.name]
    assert first.M_prev is None and first.C is None
    torch.testing.assert_close(first.S, one.S, rtol=1e-12, atol=1e-14)
    dW, _ = best_update(first.S, first.M)
    second = collect_statistics(gm, [pair], batches, moves={pair.name: dW})[0][pair.name]
    torch.testing.assert_close(second.N, -one.M_prev + one.C @ dW.T, rtol=1e-10, atol=1e-12)
    first.N = second.N
    a, b = candidate(pair, first, gm, k_max=2), candidate(pair, one, gm, k_max=2)
    torch.testing.assert_close(a.alpha.T @ a.omega.T, b.alpha.T @ b.omega.T, rtol=1e-8, atol=1e-10)


def test_best_update_is_the_least_squares_solution():
    gm = _graph(MLP(h=6))
    batches, x, y = _data((5,))
    pair = _pair(gm)
    st = collect_statistics(gm, [pair], batches)[0][pair.name]
    dW, D = best_update(st.S, st.M)
    h = torch.tanh(gm.get_submodule("body.0")(x)).detach()
    a = gm.head(h)
    dA, = torch.autograd.grad(F.cross_entropy(a, y, reduction="sum"), a)
    B = torch.cat([h, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    ls = torch.linalg.lstsq(B, dA).solution            # argmin ||B X - dA||
    torch.testing.assert_close(dW, ls.T, rtol=1e-8, atol=1e-10)
    assert D == pytest.approx(float((st.M * ls).sum()), rel=1e-8)


def test_singular_statistics_fall_back_and_a_negative_gain_gives_no_move():
    S = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)   # a dead unit: singular
    M = torch.tensor([[2.0], [0.0]], dtype=torch.float64)
    dW, D = best_update(S, M)
    torch.testing.assert_close(dW, torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert D == pytest.approx(4.0)
    # float32 statistics that a float32 solve cannot take are redone in float64
    dW32, _ = best_update(S.float(), M.float())
    assert dW32.dtype == torch.float32 and torch.isfinite(dW32).all()
    # an indefinite S (rounding) whose gain comes out negative: no move
    dW, D = best_update(-torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64))
    assert D == 0.0 and not dW.any()


def test_inverse_sqrt_drops_small_eigenvalues():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    S = q @ torch.diag(torch.tensor([4.0, 1.0, 1e-8, 0.0], dtype=torch.float64)) @ q.T
    R = inverse_sqrt(S)
    torch.testing.assert_close(R, q[:, :2] @ torch.diag(torch.tensor([0.5, 1.0], dtype=torch.float64)) @ q[:, :2].T)


def _projected_target(gm, pair, x, y):
    """Direct B_-2 and -v_proj (v_proj = dA - B dW*^T) of a Linear pair, from autograd."""
    h = torch.tanh(gm.get_submodule("body.0")(x)).detach()
    a = gm.head(h)
    dA, = torch.autograd.grad(F.cross_entropy(a, y, reduction="sum"), a)
    one = torch.ones(len(x), 1, dtype=x.dtype)
    B, Bp = torch.cat([h, one], 1), torch.cat([x, one], 1)
    dW = torch.linalg.lstsq(B, dA).solution.T
    return Bp, -(dA - B @ dW.T)


def test_new_neurons_equal_the_direct_least_squares_solution():
    gm = _graph(MLP(d=5, h=6, out=4))
    batches, x, y = _data((5,))
    pair = _pair(gm)
    st = collect_statistics(gm, [pair], batches)[0][pair.name]
    Bp, target = _projected_target(gm, pair, x, y)
    full = candidate(pair, st, gm, k_max=10, sv_floor=0.0)
    # every singular value kept: alpha^T omega^T is the unconstrained least-squares fit of -v_proj
    ls = torch.linalg.lstsq(Bp, target).solution
    assert full.neurons == 4
    torch.testing.assert_close(full.alpha.T @ full.omega.T, ls, rtol=1e-8, atol=1e-10)
    # k < rank: reduced-rank regression, the top-k principal directions of the fitted values
    fitted = Bp @ ls
    _, vecs = torch.linalg.eigh(fitted.T @ fitted)
    for k in (1, 2):
        top = vecs[:, -k:]
        c = candidate(pair, st, gm, k_max=k, sv_floor=0.0)
        torch.testing.assert_close(c.alpha.T @ c.omega.T, ls @ top @ top.T, rtol=1e-8, atol=1e-10)
    # the threshold s_j >= min(1e-3, s_max)
    alpha, omega, s = new_neurons(torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 1e-4],
                                                                                                  dtype=torch.float64)), 5)
    assert s.tolist() == [1.0]
    _, _, s = new_neurons(torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([1e-4, 1e-5], dtype=torch.float64)), 5)
    assert s.tolist() == [1e-4]


def _loss(gm, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(gm(x), y, reduction="sum"))


@pytest.mark.parametrize("model,shape", [(lambda: MLP(h=3), (5,)), (lambda: ConvNet(), (2, 5, 5))],
                         ids=["linear", "conv3x3-stride2"])
def test_first_order_decrease_matches_the_measured_one(model, shape):
    gm = _graph(model())
    batches, x, y = _data(shape, classes=4 if shape == (5,) else 3)
    pair = _pair(gm)
    st = collect_statistics(gm, [pair], batches)[0][pair.name]
    base = _loss(gm, x, y)
    # the move of l2's weights: L(0) - L(gamma) = gamma n D + o(gamma)
    c = candidate(pair, st, gm, k_max=2)
    ins = Insertion(gm, c.truncate(0))
    ins.set_scale(1e-4)
    measured = base - _loss(gm, x, y)
    ins.undo()
    assert measured == pytest.approx(1e-4 * st.n * c.D, rel=1e-2)
    # new neurons alone (N = -M_-2): their contribution is gamma^2 omega tanh(alpha b); decrease gamma^2 n sum s^2
    c = candidate(pair, st, gm, k_max=2, project=False)
    assert c.neurons == 2
    ins = Insertion(gm, c)
    ins.set_scale(1e-3)
    measured = base - _loss(gm, x, y)
    ins.undo()
    assert measured == pytest.approx(1e-6 * st.n * c.gain_neurons, rel=1e-2)
    assert _loss(gm, x, y) == base                       # undo restores the original exactly


def test_projected_neurons_gain_after_the_best_move_on_a_quadratic_loss():
    """With a squared loss the best move (gamma = 1) lands exactly where the gradient is v_proj; the
    projected neurons then lower the loss by gamma^2 n sigma'(0) sum s^2 to first order."""
    gm = _graph(MLP(h=3))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 5, generator=g, dtype=torch.float64)
    y = torch.randn(90, 4, generator=g, dtype=torch.float64)
    loss_fn = lambda out, t: 0.5 * ((out - t) ** 2).sum()  # noqa: E731
    batches = [(x[i:i + 30], y[i:i + 30]) for i in range(0, 90, 30)]
    pair = _pair(gm)
    st = collect_statistics(gm, [pair], batches, loss_fn)[0][pair.name]
    c = candidate(pair, st, gm, k_max=2)
    assert c.bottleneck == pytest.approx(1 - c.D / float(st.grad_sq), rel=1e-8)
    ins = Insertion(gm, c)
    eps = 1e-3
    ins.set_scale(1.0, neurons=0.0)               # l2 at W - dW*: the minimum over l2's weights
    after_move = float(loss_fn(gm(x), y).detach())
    ins.set_scale(1.0, neurons=eps)
    measured = after_move - float(loss_fn(gm(x), y).detach())
    assert measured == pytest.approx(eps ** 2 * len(x) * c.gain_neurons, rel=1e-2)


@pytest.mark.parametrize("model,shape", [(lambda: MLP(h=3, act=nn.ReLU, depth=2), (5,)),
                                         (lambda: ConvNet(norm=True, act=nn.ReLU, bias=False), (2, 5, 5))],
                         ids=["mlp", "conv-batchnorm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inserting_neurons_leaves_the_function_unchanged(model, shape, mode):
    gm = _graph(model())
    getattr(gm, mode)()
    batches, x, y = _data(shape, classes=4 if shape == (5,) else 3)
    ref = gm(x).detach()
    pairs = growable_pairs(gm)[0]
    stats = collect_statistics(gm, pairs, batches)[0]
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)       # statistics change nothing
    ins = [Insertion(gm, candidate(p, stats[p.name], gm, k_max=2, sv_floor=0.0)) for p in pairs]
    assert all(i.cand.neurons == 2 for i in ins)
    if pairs[0].norms:  # the batch norm grew with gamma 1, beta 0, mean 0, variance 1
        bn = gm.bn
        assert bn.num_features == 5 and bn.weight[3:].tolist() == [1.0, 1.0] and bn.bias[3:].tolist() == [0.0, 0.0]
        assert bn.running_mean[3:].tolist() == [0.0, 0.0] and bn.running_var[3:].tolist() == [1.0, 1.0]
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-12)   # at gamma = 0
    # new units that already see their inputs (alpha != 0) but whose fan-out is still zero
    with torch.no_grad():
        for i in ins:
            i.dW_w.zero_()
            if i.dW_b is not None:
                i.dW_b.zero_()
            i.set_scale(1.0)
            i.w2.data[:i.out, i.hidden:] = 0
            assert float(i.w1.data[i.hidden:].abs().sum()) > 0
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_state_grows_with_zeros_and_keeps_the_old_moments(opt):
    gm = _graph(MLP(h=3, act=nn.ReLU, depth=2))
    batches, x, y = _data((5,))
    optimizer = (torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9) if opt == "sgd"
                 else torch.optim.AdamW(gm.parameters(), lr=0.01))
    for xb, yb in batches:
        optimizer.zero_grad()
        F.cross_entropy(gm(xb), yb).backward()
        optimizer.step()
    keys = ["momentum_buffer"] if opt == "sgd" else ["exp_avg", "exp_avg_sq"]
    before = {n: {k: optimizer.state[p][k].clone() for k in keys} for n, p in gm.named_parameters()}
    old_params = {n: p for n, p in gm.named_parameters()}
    step = optimizer.state[old_params["head.weight"]].get("step")
    report = grow_once(gm, batches, optimizer, config=GrowthConfig(neurons=2, strategy="all"))
    assert report.grown and report.grown_tensors
    params = dict(gm.named_parameters())
    group = optimizer.param_groups[0]["params"]
    assert len(group) == len(params) and all(any(p is q for q in group) for p in params.values())
    assert not any(p is old_params[n] for n in report.grown_tensors for p in group)
    for name, p in params.items():
        state = optimizer.state[p]
        for k in keys:
            old = before[name][k]
            region = tuple(slice(0, s) for s in old.shape)
            torch.testing.assert_close(state[k][region], old, rtol=0, atol=0)   # old entries kept
            assert state[k].shape == p.shape
            rest = state[k].clone()
            rest[region] = 0
            assert not rest.any()                                              # new entries zero
    if step is not None:
        assert float(optimizer.state[params["head.weight"]]["step"]) == float(step)
    optimizer.zero_grad()
    F.cross_entropy(gm(x), y).backward()
    optimizer.step()                                                           # the grown model trains on


def test_grow_once_lowers_the_held_out_loss_and_reports():
    gm = _graph(MLP(h=2, act=nn.ReLU, depth=2))
    batches, x, y = _data((5,), n=120, batches=4)
    before = held_out_loss(gm, batches[-1:], summed_cross_entropy)
    ref = copy.deepcopy(gm)
    report = grow_once(gm, batches, None, config=GrowthConfig(neurons=3))
    assert report.grown and len(report.pairs) == 1
    row = report.pairs[0]
    best = max(report.gains, key=lambda k: report.gains[k]["total"])
    assert row["pair"] == best and row["hidden"][1] - row["hidden"][0] == row["neurons"] <= 3
    assert report.loss[0] == pytest.approx(before) and report.loss[1] < report.loss[0]
    assert report.loss[1] == pytest.approx(held_out_loss(gm, batches[-1:], summed_cross_entropy))
    assert report.losses[0.0] == pytest.approx(before)     # gamma = 0 is the unchanged model
    assert report.params[1] > report.params[0] == sum(p.numel() for p in ref.parameters())
    assert report.as_dict()["pairs"] == report.pairs


def test_budget_limits_the_neurons_and_an_exceeded_budget_is_an_error():
    gm = _graph(MLP(h=2, act=nn.ReLU, depth=2))
    batches, x, _ = _data((5,), n=120, batches=4)
    # FLOPs (torch's counter, forward, per sample): 2 (5*2 + 2*2 + 2*4) = 44; a unit of the first pair
    # costs 2 (5 + 2) = 14, of the second 2 (2 + 4) = 12
    small = copy.deepcopy(gm)
    assert forward_flops(small, x) == 44
    report = grow_once(small, batches, config=GrowthConfig(neurons=8, strategy="all", budget="flops", limit=44 + 14))
    assert report.grown and sum(r["neurons"] for r in report.pairs) == 1 and forward_flops(small, x) <= 44 + 14
    start = sum(p.numel() for p in gm.parameters())
    # one more unit of body.0->body.2 costs 5 + 1 + 2 = 8 parameters, of body.2->head 2 + 1 + 4 = 7
    report = grow_once(gm, batches, config=GrowthConfig(neurons=8, strategy="all", limit=start + 8))
    assert report.grown and report.params[1] <= start + 8 and sum(r["neurons"] for r in report.pairs) == 1
    with pytest.raises(GradxformError, match=r"the params budget is already exceeded: \d+ > 10"):
        grow_once(gm, batches, config=GrowthConfig(limit=10))
    full = grow_once(gm, batches, config=GrowthConfig(limit=report.params[1]))
    assert not full.grown and full.reason == "the budget has no room for one more neuron"


def test_growth_step_stops_at_the_maximum_width_and_logs():
    gm = _graph(MLP(h=2, act=nn.ReLU, depth=1))
    batches, _, _ = _data((5,), n=120, batches=4)
    step = GrowthStep(gm, None, GrowthConfig(every=2, neurons=4, max_width=4))
    assert [step.due(e) for e in range(5)] == [False, False, True, False, True]
    for _ in range(4):
        if step.stopped:
            break
        step(batches, epoch=2)
    assert step.stopped == "every pair is at its maximum width"
    assert gm.get_submodule("body.0").out_features == gm.head.in_features == gm.get_submodule("body.0").weight.shape[0] == 4
    assert step.log[-1]["reason"] == step.stopped and not step.due(6)


def test_models_without_a_growable_pair_are_refused_with_the_reason_per_layer():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.n = nn.LayerNorm(4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.n(self.a(x)))

    gm = _graph(Flat())
    with pytest.raises(GradxformError, match=r"no growable pair: a: a layer norm \(n\) mixes the hidden units; "
                                             r"b: its output is a model output"):
        grow_once(gm, [(torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1]))])
    gm = _graph(MLP())
    with pytest.raises(GradxformError, match="no growable pair matches targets=nope"):
        grow_once(gm, _data((5,))[0], config=GrowthConfig(targets=("nope",)))


def test_conv_pair_with_batch_norm_grows_and_trains_on():
    gm = _graph(ConvNet(norm=True, act=nn.ReLU, bias=False))
    gm.train()
    batches, x, y = _data((2, 5, 5), classes=3, n=120, batches=4)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    report = grow_once(gm, batches, optimizer, config=GrowthConfig(neurons=2))
    assert report.grown and report.loss[1] < report.loss[0]
    k = report.pairs[0]["neurons"]
    assert gm.c1.weight.shape[0] == gm.bn.weight.shape[0] == gm.c2.weight.shape[1] == 3 + k
    assert gm.c1.out_channels == gm.bn.num_features == gm.c2.in_channels == 3 + k
    assert "c1.weight" in report.grown_tensors and "bn.weight" in report.grown_tensors
    optimizer.zero_grad()
    F.cross_entropy(gm(x), y).backward()
    optimizer.step()


def test_exported_graph_grows_through_its_parameters():
    from gradxform.frontend.tracer import trace

    torch.manual_seed(0)
    model = MLP(h=3, act=nn.ReLU, depth=2).double()
    gm = trace(model, (torch.randn(4, 5, dtype=torch.float64),), {}, "export").gm
    batches, x, _ = _data((5,), n=120, batches=4)
    ref = model(x)
    torch.testing.assert_close(gm(x), ref)
    report = grow_once(gm, batches, config=GrowthConfig(neurons=2, strategy="all"))
    assert report.grown
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters()}
    grown = {r["pair"]: r["hidden"][1] for r in report.pairs}
    for (name, width) in grown.items():
        first = name.split("->")[0]
        assert shapes[f"{first}.weight"][0] == width


def _train_digits(model_width: str, epochs: int, grow: GrowthConfig | None, seed: int = 0):
    """A depth-2 digits MLP trained with SGD (cosine learning rate); ``grow`` adds a growth step after every ``grow.every`` epochs."""
    import sys

    from gradxform.compiler import compile_loaded
    from gradxform.frontend.loader import LoadedModel
    from gradxform.runtime.data import digits

    from ..conftest import EXAMPLES

    sys.path.insert(0, str(EXAMPLES))
    try:
        from mlp import MLP as DigitsMLP
    finally:
        sys.path.remove(str(EXAMPLES))
    torch.manual_seed(seed)
    gm = compile_loaded(LoadedModel(DigitsMLP(depth=2), (torch.randn(16, 64),)), f"grow{{width={model_width}}}").module
    train, test = digits(flat=True)
    x, y = train.tensors
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)   # keeps working as groups change
    step = GrowthStep(gm, optimizer, grow) if grow is not None else None
    gen = torch.Generator().manual_seed(seed)
    statistical = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            optimizer.zero_grad()
            F.cross_entropy(gm(x[idx]), y[idx]).backward()
            optimizer.step()
        schedule.step()
        if step is not None and step.due(epoch):
            step(statistical, epoch=epoch)
    with torch.no_grad():
        accuracy = float((gm(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    return accuracy, gm, step


@pytest.mark.slow
def test_digits_mlp_grown_from_width_4_to_32_is_close_to_the_full_width_model(capsys):
    grown, gm, step = _train_digits("4", 30, GrowthConfig(every=1, neurons=8, strategy="all", max_width=32))
    full, _, _ = _train_digits("1.0", 30, None)
    small, _, _ = _train_digits("4", 30, None)
    widths = [gm.get_submodule(n).weight.shape[0] for n in ("body.0", "body.2")]
    with capsys.disabled():
        print(f"\ndigits MLP depth 2, 30 epochs: grown 4 -> {widths} {grown:.3f}, full width 128 {full:.3f}, "
              f"width 4 {small:.3f}; growth steps {sum(r['grown'] for r in step.log)}")
    assert widths == [32, 32]
    assert grown >= full - 0.02 and grown >= small + 0.03


class Residual(nn.Module):
    def __init__(self, kind="conv", c=3):
        super().__init__()
        conv = kind == "conv"
        self.stem = nn.Conv2d(1, c, 3, padding=1) if conv else nn.Linear(4, c)
        self.f = nn.Conv2d(c, c, 3, padding=1) if conv else nn.Linear(c, c)
        self.head = nn.Linear(c, 3)
        self.conv = conv

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.f(h))
        return self.head(h.mean((2, 3)) if self.conv else h)


@pytest.mark.parametrize("kind,shape", [("conv", (1, 5, 5)), ("linear", (4,))])
def test_a_new_block_enters_with_a_zero_output_and_grows(kind, shape):
    from gradxform.ir.growth import block_sites
    from gradxform.ir.meta import propagate
    from gradxform.nn.growth import grow_block, insert_block, remove_block

    gm = _graph(Residual(kind))
    batches, x, y = _data(shape, classes=3, n=120, batches=4)
    propagate(gm, [x[:4]])
    ref = gm(x).detach()
    (site,) = block_sites(gm)
    block = insert_block(gm, site, hidden=2)
    assert "grown_block_l1 = self.grown_block.l1(relu_1)" in gm.code
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-12)       # l2 starts at zero
    assert block.pair_name in [p.name for p in growable_pairs(gm)[0]]
    remove_block(gm, block)
    assert "grown_block" not in gm.code and not hasattr(gm, "grown_block")
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    report, block = grow_block(gm, batches, optimizer, config=GrowthConfig(neurons=2))
    assert report.grown and block is not None and report.pairs[0]["block"] == site.name
    assert report.loss[1] < report.loss[0]
    params = {id(p) for p in gm.parameters()}
    assert params == {id(p) for g in optimizer.param_groups for p in g["params"]}
    optimizer.zero_grad()
    F.cross_entropy(gm(x), y).backward()
    optimizer.step()


def test_a_model_without_residual_blocks_takes_no_new_block():
    from gradxform.nn.growth import grow_block

    with pytest.raises(GradxformError, match="the model has no residual block to insert a new block after"):
        grow_block(_graph(MLP()), _data((5,))[0])
    gm = _graph(Residual("linear"))
    with pytest.raises(GradxformError, match="no block site 'after nowhere'") as err:
        grow_block(gm, _data((4,), classes=3)[0], site="after nowhere")
    assert "sites: after " in str(err.value)


def test_resuming_rebuilds_grown_pairs_and_blocks_bit_identically():
    from gradxform.ir.meta import propagate
    from gradxform.nn.growth import grow_block, resize_to_state

    def fresh():
        gm = _graph(Residual("linear"))
        propagate(gm, [torch.randn(2, 4, dtype=torch.float64)])
        return gm

    batches, x, _ = _data((4,), classes=3, n=120, batches=4)
    gm = fresh()
    assert grow_block(gm, batches, config=GrowthConfig(neurons=3))[1] is not None
    assert grow_once(gm, batches, config=GrowthConfig(neurons=2, strategy="all")).grown
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    blocks = growth_record(gm)["blocks"]
    assert blocks == [{"name": "grown_block", "site": "after f"}]
    again = fresh()
    with pytest.raises(RuntimeError, match="Unexpected key"):        # the grown shapes are not there yet
        again.load_state_dict(state)
    assert resize_to_state(again, state, blocks)
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), gm(x), rtol=0, atol=0)
    assert again.code == gm.code
    assert not resize_to_state(again, state, blocks)          # nothing left to rebuild
