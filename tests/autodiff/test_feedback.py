"""F³'s engine: the connector's gradient against hand-computed e·B, feedback matrices, error kinds, the
error buffer, indexed data, and the reference loop's properties (epoch 1 = DRTP, LLO, DFA, resume)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import IterableDataset, TensorDataset

import gradxform
from gradxform.autodiff.feedback import (ERROR_KINDS, ErrorBuffer, IndexedDataset, check_error_kind, error_rows,
                                         feedback, feedback_backward, feedback_matrix, is_feedback_output,
                                         loss_value, target_rows, with_indices)
from gradxform.errors import GradxformError
from gradxform.nn.feedback import connectors, feedback_errors

from . import f3_reference as ref


def tanh_mlp(widths=(5, 7, 6, 3), out=nn.Sigmoid):
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    if out is not None:
        layers.append(out())
    return nn.Sequential(*layers)


def compiled(model, x, pipeline="f3", double=True):
    if double:
        model, x = model.double(), x.double()
    return gradxform.compile(model, pipeline, example_inputs=(x,))


# ------------------------------------------------------------------------- the connector's gradient

def test_block_updates_equal_hand_computed_feedback_gradients_in_float64():
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    gm = compiled(tanh_mlp(), x)
    B1, B2 = gm.feedback0.B, gm.feedback1.B
    assert B1.shape == (3, 7) and B2.shape == (3, 6)
    e = torch.randn(4, 3, dtype=torch.float64)
    before = [p.detach().clone() for p in gm.parameters()]
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    with feedback_errors(gm, e):
        out = gm(x)
    F.binary_cross_entropy(out, F.one_hot(y, 3).double()).backward()
    opt.step()

    with torch.no_grad():
        h1 = torch.tanh(x @ before[0].T + before[1])
        h2 = torch.tanh(h1 @ before[2].T + before[3])
        p = torch.sigmoid(h2 @ before[4].T + before[5])
        d1 = (e @ B1) * (1 - h1 ** 2)                    # block 1: e·B through its own tanh
        d2 = (e @ B2) * (1 - h2 ** 2)                    # block 2: the same with its own B
        d3 = (p - F.one_hot(y, 3).double()) / p.numel()  # last block: the true gradient of the mean BCE
        grads = [d1.T @ x, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]
    for p_now, p_was, g in zip(gm.parameters(), before, grads):
        torch.testing.assert_close(p_was - p_now, 0.1 * g, rtol=0, atol=1e-12)
    assert out.grad_fn is not None and not is_feedback_output(out)


def test_the_incoming_gradient_is_ignored_and_e_is_what_backward_keeps():
    h = torch.randn(3, 2, 4, requires_grad=True, dtype=torch.float64)
    e = torch.randn(3, 5, dtype=torch.float64)
    B = feedback_matrix("trinomial", 5, 8, dtype=torch.float64)
    out = feedback(h * 1.0, e, B)
    assert is_feedback_output(out) and torch.equal(out, h)
    (out * torch.randn_like(out)).sum().backward()                  # whatever comes in ...
    torch.testing.assert_close(h.grad, (e @ B).reshape(3, 2, 4))    # ... e·B goes out
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        feedback(h * 1.0, e, B)
    assert {tuple(t.shape) for t in saved if t.data_ptr() != B.data_ptr()} <= {(3, 5), (3, 8), (3, 2, 4)}
    assert any(t.data_ptr() == e.data_ptr() for t in saved)         # e, not an (N, 8) gradient
    with pytest.raises(ValueError, match="do not fit an activation"):
        feedback(h, e, feedback_matrix("kaiming", 5, 9))


def test_feedback_backward_trains_a_stage_without_a_loss_and_refuses_plain_outputs():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64)
    staged = compiled(tanh_mlp((5, 7, 6, 3)), x, "split{stages=2},f3{at=stages}")
    first, second = staged.stages
    e = torch.randn(6, 3, dtype=torch.float64)
    reference = copy.deepcopy(staged)
    with feedback_errors(reference, e):      # in-process: one loss.backward() through both stages
        out = reference(x)
    F.binary_cross_entropy(out, torch.rand(6, 3, dtype=torch.float64)).backward()
    with feedback_errors(first, e):          # a pipeline stage: its own backward, right after its forward
        h = first(x)
    feedback_backward(h)
    for a, b in zip(first.parameters(), reference.stages[0].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-14)
    plain = second(*[t.detach().requires_grad_() for t in h])
    with pytest.raises(ValueError, match="does not come from a feedback connector"):
        feedback_backward(plain)


# ------------------------------------------------------------------------------ feedback matrices

def test_feedback_matrices_are_seeded_and_drawn_from_their_sets():
    k = feedback_matrix("kaiming", 10, 400, seed=3, index=1)
    assert k.shape == (10, 400) and float(k.abs().max()) <= 1 / math.sqrt(400)
    assert float(k.abs().max()) > 0.9 / math.sqrt(400) and abs(float(k.mean())) < 0.01 / math.sqrt(400) * 10
    assert torch.equal(k, feedback_matrix("kaiming", 10, 400, seed=3, index=1))        # the same on every rank
    assert not torch.equal(k, feedback_matrix("kaiming", 10, 400, seed=3, index=2))    # its own per connector
    assert not torch.equal(k, feedback_matrix("kaiming", 10, 400, seed=4, index=1))
    assert set(feedback_matrix("trinomial", 10, 400).unique().tolist()) == {-1.0, 0.0, 1.0}
    assert set(feedback_matrix("binomial", 10, 400).unique().tolist()) == {0.0, 1.0}
    ident = feedback_matrix("identity", 3, 8)
    eye = torch.eye(3)
    assert torch.equal(ident, torch.cat([eye, -eye, eye[:, :2]], dim=1))
    assert feedback_matrix("kaiming", 4, 6, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown feedback initialisation 'gauss'"):
        feedback_matrix("gauss", 3, 4)


# -------------------------------------------------------------------------------------- error kinds

FITTING = [(k, loss) for loss in ("bce", "cross-entropy", "mse") for k in ERROR_KINDS
           if not (loss == "mse" and ("softmax" in k or "one-hot" in k))
           and not (loss == "cross-entropy" and (k.startswith("delayed-error") and "softmax" not in k))
           and not (loss == "cross-entropy" and k.startswith("delayed-loss-softmax"))]


def _closed_form(kind, loss, out, y):
    """Each error kind written out by hand (not through autograd)."""
    base = kind.removesuffix("-one-hot")
    s = torch.softmax(out, 1)
    if base == "delayed-error":
        e = y - out
    elif base == "delayed-error-softmax":
        e = y - s
    elif base == "delayed-loss":
        e = {"bce": (y - out) / (out * (1 - out)), "cross-entropy": y - s, "mse": 2 * (y - out)}[loss]
    else:   # bce on softmax(out): -J_softmax^T dL/ds
        g = (s - y) / (s * (1 - s))
        e = -s * (g - (s * g).sum(1, keepdim=True))
    return y * e if kind.endswith("-one-hot") else e


@pytest.mark.parametrize("kind, loss", FITTING)
def test_error_kinds_match_their_closed_forms_and_the_sign_of_the_negative_gradient(kind, loss):
    torch.manual_seed(0)
    raw = torch.randn(8, 4, dtype=torch.float64)
    out = torch.sigmoid(raw) if loss == "bce" else raw
    labels = torch.randint(0, 4, (8,))
    targets = torch.randn(8, 4, dtype=torch.float64) if loss == "mse" else labels
    y = target_rows(targets, loss, 4).double()
    e = error_rows(kind, loss, out, targets)
    torch.testing.assert_close(e, _closed_form(kind, loss, out, y), rtol=1e-12, atol=1e-12)
    o = out.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_value(loss, o, targets), o)
    nonzero = e != 0
    assert torch.equal(torch.sign(e[nonzero]), torch.sign(-g[nonzero]))
    if kind.endswith("-one-hot"):
        assert int(nonzero.sum()) == 8 and torch.equal(nonzero, F.one_hot(labels, 4).bool())


@pytest.mark.parametrize("kind, loss, message", [
    ("delayed-error-softmax", "mse", "does not fit loss=mse: a regression output has no classes"),
    ("delayed-error-one-hot", "mse", "does not fit loss=mse"),
    ("delayed-error", "cross-entropy", "y - y_hat on logits does not have the sign"),
    ("delayed-loss-softmax", "cross-entropy", "the loss already applies the softmax"),
    ("delayed-eror", "bce", "unknown F³ error kind 'delayed-eror'"),
])
def test_an_error_kind_that_does_not_fit_the_loss_is_refused(kind, loss, message):
    with pytest.raises(GradxformError, match=message) as info:
        check_error_kind(kind, loss)
    assert info.value.hint
    with pytest.raises(GradxformError, match=message):
        ErrorBuffer(torch.tensor([0, 1]), kind, loss, classes=2)


def test_outputs_that_are_not_n_by_c_or_not_probabilities_for_bce_are_refused():
    with pytest.raises(GradxformError, match=r"output to be \(N, C\).*got \(4, 3, 2\)"):
        error_rows("delayed-error", "bce", torch.rand(4, 3, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(GradxformError, match=r"loss=bce needs outputs in \[0, 1\]"):
        error_rows("delayed-error", "bce", torch.randn(4, 3) * 5, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(GradxformError, match="class targets range over 0..5 but the model has 3 outputs"):
        target_rows(torch.tensor([0, 5]), "cross-entropy", 3)


# --------------------------------------------------------------------------------------- the buffer

def test_the_buffer_starts_from_one_hot_targets_and_stores_one_value_per_sample_for_one_hot_kinds():
    labels = torch.tensor([2, 0, 1, 2, 1])
    full = ErrorBuffer(labels, "delayed-error", "bce", classes=3)
    assert torch.equal(full.rows(torch.arange(5)), F.one_hot(labels, 3).float())
    one = ErrorBuffer(labels, "delayed-error-one-hot", "bce", classes=3)
    assert torch.equal(one.rows(torch.arange(5)), F.one_hot(labels, 3).float())
    assert one.values.shape == (5,) and full.values.shape == (5, 3)
    assert one.nbytes == 5 * 4 + 5 * 8 and full.nbytes == 5 * 3 * 4 + 5 * 8
    out = torch.rand(2, 3)
    written = one.update(torch.tensor([3, 1]), out, labels[[3, 1]])
    rows = one.rows(torch.tensor([3, 1]))
    assert torch.equal(rows, written)
    assert rows[0, 2] == 1 - out[0, 2] and rows[1, 0] == 1 - out[1, 0] and int((rows != 0).sum()) == 2
    reg = ErrorBuffer(torch.tensor([0.5, -1.0, 2.0]), "delayed-error", "mse")
    assert reg.classes == 1 and torch.equal(reg.rows(torch.tensor([2, 0])), torch.tensor([[2.0], [0.5]]))


def test_the_buffer_state_dict_round_trips_and_refuses_another_run():
    buf = ErrorBuffer(torch.tensor([0, 1, 1, 0]), "delayed-loss", "bce", classes=2, dtype=torch.float64)
    buf.update(torch.tensor([0, 2]), torch.tensor([[0.3, 0.6], [0.2, 0.9]], dtype=torch.float64),
               torch.tensor([0, 1]))
    other = ErrorBuffer(torch.tensor([0, 1, 1, 0]), "delayed-loss", "bce", classes=2, dtype=torch.float64)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.values, buf.values) and other.values.data_ptr() != buf.values.data_ptr()
    wrong = ErrorBuffer(torch.tensor([0, 1, 1, 0]), "delayed-error", "bce", classes=2)
    with pytest.raises(GradxformError, match="checkpoint's error buffer .* does not match"):
        wrong.load_state_dict(buf.state_dict())


@pytest.mark.parametrize("indices, message", [
    (None, "came without sample indices"),
    (torch.tensor([0.0, 1.0]), "must be a 1-d integer tensor"),
    (torch.tensor([0, 9]), "sample index 9 is outside the error buffer of 4"),
    (torch.tensor([0]), "1 sample indices for a micro-batch of 2"),
    (torch.tensor([1, 0]), "sample index 1 holds class 1 in the error buffer but came with class 0"),
])
def test_updates_with_missing_or_wrong_sample_indices_are_refused(indices, message):
    buf = ErrorBuffer(torch.tensor([0, 1, 1, 0]), "delayed-error", "bce", classes=2)
    with pytest.raises(GradxformError, match=message) as info:
        buf.update(indices, torch.rand(2, 2), torch.tensor([0, 0]))
    assert info.value.hint or "micro-batch of 2" in message


# ------------------------------------------------------------------------------------ indexed data

class _Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.full((2,), float(i)), i % 2


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


class _Singles(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.zeros(2)


def test_with_indices_yields_index_x_y():
    x, y = torch.randn(5, 3), torch.arange(5) % 2
    indexed = with_indices(TensorDataset(x, y))
    assert isinstance(indexed, TensorDataset) and torch.equal(indexed.tensors[0], torch.arange(5))
    i, xi, yi = indexed[3]
    assert int(i) == 3 and torch.equal(xi, x[3]) and int(yi) == int(y[3])
    assert with_indices(indexed) is indexed
    wrapped = with_indices(_Pairs())
    assert isinstance(wrapped, IndexedDataset) and len(wrapped) == 3
    assert wrapped[2][0] == 2 and torch.equal(wrapped[2][1], torch.full((2,), 2.0)) and wrapped[2][2] == 0


@pytest.mark.parametrize("dataset, message", [
    (_Stream(), "needs each training sample's index, and a _Stream cannot give one"),
    (_Singles(), r"yields Tensor, not \(x, y\)"),
    (TensorDataset(torch.zeros(0, 2), torch.zeros(0)), "is empty"),
    (TensorDataset(torch.zeros(2, 2)), "a TensorDataset of 1 tensors"),
])
def test_a_dataset_that_cannot_give_sample_indices_is_refused(dataset, message):
    with pytest.raises(GradxformError, match=message):
        with_indices(dataset)


# ------------------------------------------------------------------------- the reference loop

def _digits_like(n=40, features=6, classes=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=dtype)
    y = (x[:, :classes] + 0.3 * torch.randn(n, classes, generator=gen, dtype=dtype)).argmax(1)
    return TensorDataset(x, y)


def _model(seed=0, widths=(6, 8, 8, 3)):
    torch.manual_seed(seed)
    return compiled(tanh_mlp(widths), torch.randn(4, widths[0]))


@pytest.mark.parametrize("kind", ["delayed-error", "delayed-loss-one-hot"])
def test_epoch_one_of_f3_equals_drtp_exactly(kind):
    data = _digits_like()
    runs = {}
    for method in ("f3", "drtp"):
        run = ref.start(_model(), data, "bce", kind, lr=1e-2, dtype=torch.float64)
        ref.epoch(run, data, method, "bce", kind, batch=8, seed=1, number=0)
        runs[method] = run
    for a, b in zip(runs["f3"].model.parameters(), runs["drtp"].model.parameters()):
        assert torch.equal(a, b)
    ref.epoch(runs["f3"], data, "f3", "bce", kind, 8, 1, 1)     # epoch 2: the stored errors take over
    ref.epoch(runs["drtp"], data, "drtp", "bce", kind, 8, 1, 1)
    assert not torch.equal(runs["f3"].model.get_submodule("0").weight, runs["drtp"].model.get_submodule("0").weight)


def test_llo_changes_only_the_last_block():
    data = _digits_like()
    run = ref.start(_model(), data, "bce", "delayed-error", lr=1e-2, dtype=torch.float64)
    before = {k: v.clone() for k, v in run.model.named_parameters()}
    ref.epoch(run, data, "llo", "bce", "delayed-error", 8, 1, 0)
    changed = {k for k, v in run.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"4.weight", "4.bias"}    # the block after the last connector: Linear(8, 3) + sigmoid


@pytest.mark.parametrize("kind, loss", [("delayed-error", "bce"), ("delayed-loss", "bce"),
                                        ("delayed-error-softmax-one-hot", "cross-entropy"),
                                        ("delayed-loss", "mse")])
def test_the_buffer_after_an_epoch_equals_the_errors_of_the_stored_outputs(kind, loss):
    data = _digits_like()
    if loss == "mse":
        x = data.tensors[0]
        data = TensorDataset(x, x[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    widths = (6, 8, 8, 1 if loss == "mse" else 3)
    torch.manual_seed(0)
    model = compiled(tanh_mlp(widths, out=nn.Sigmoid if loss == "bce" else None), torch.randn(4, 6),
                     f"f3{{loss={loss},error={kind}}}")
    run = ref.start(model, data, loss, kind, lr=1e-2, dtype=torch.float64)
    record = []
    ref.epoch(run, data, "f3", loss, kind, 8, 1, 0, record=record)
    stored = torch.zeros(len(data), widths[-1], dtype=torch.float64)
    for idx, out, y, _ in record:
        stored[idx] = _closed_form(kind, loss, out, target_rows(y, loss, widths[-1]).double())
    torch.testing.assert_close(run.buffer.rows(torch.arange(len(data))), stored, rtol=1e-12, atol=1e-12)
    assert sorted(torch.cat([r[0] for r in record]).tolist()) == list(range(len(data)))


class _ConvBlocks(nn.Module):
    """Two residual conv-BN blocks and a classifier: BatchNorm makes the extra forward matter."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


def test_dfa_uses_the_current_error_from_an_extra_forward_that_leaves_batch_norm_statistics_alone():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = compiled(_ConvBlocks(), x)
    assert len(connectors(model)) == 2
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer = ErrorBuffer(y, "delayed-error-softmax", "cross-entropy", classes=3, dtype=torch.float64)
    result = ref.step(model, opt, "dfa", torch.arange(6), x, y, "cross-entropy", "delayed-error-softmax", buffer)
    # the error handed to the connectors is the error of this very step's output
    torch.testing.assert_close(result["e"], error_rows("delayed-error-softmax", "cross-entropy", result["out"], y),
                               rtol=0, atol=1e-15)
    twin(x)                                    # one training forward's worth of running statistics
    for name in ("b1", "b2"):
        assert torch.equal(getattr(model, name).running_mean, getattr(twin, name).running_mean)
        assert int(getattr(model, name).num_batches_tracked) == 1


def test_bp_through_untouched_connectors_is_plain_backprop():
    data = _digits_like()
    torch.manual_seed(0)
    plain = tanh_mlp((6, 8, 8, 3)).double()
    model = compiled(copy.deepcopy(plain), torch.randn(4, 6))
    run = ref.start(model, data, "bce", "delayed-error", lr=1e-2, dtype=torch.float64)
    ref.epoch(run, data, "bp", "bce", "delayed-error", 8, 1, 0)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for idx, x, y in ref.batches(with_indices(data), 8, 1, 0):
        opt.zero_grad()
        F.binary_cross_entropy(plain(x), F.one_hot(y, 3).double()).backward()
        opt.step()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_resume_from_model_optimizer_and_buffer_is_bit_identical(tmp_path):
    data = _digits_like()
    kind = "delayed-error"
    straight = ref.start(_model(), data, "bce", kind, lr=1e-2)
    for n in range(3):
        ref.epoch(straight, data, "f3", "bce", kind, 8, 1, n)
    first = ref.start(_model(), data, "bce", kind, lr=1e-2)
    ref.epoch(first, data, "f3", "bce", kind, 8, 1, 0)
    torch.save({"model": first.model.state_dict(), "opt": first.opt.state_dict(), "buffer": first.buffer.state_dict()},
               tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = ref.start(_model(seed=5), data, "bce", kind, lr=1e-2)
    resumed.model.load_state_dict(state["model"])
    resumed.opt.load_state_dict(state["opt"])
    resumed.buffer.load_state_dict(state["buffer"])
    for n in (1, 2):
        ref.epoch(resumed, data, "f3", "bce", kind, 8, 1, n)
    assert torch.equal(resumed.buffer.values, straight.buffer.values)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(resumed.model.feedback0.B, straight.model.feedback0.B)   # B travels in the state_dict
