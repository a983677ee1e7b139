"""``lowrank``: full-rank equivalence, Eckart-Young, rank choices, skipped layers, USV truncation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import FileCheck

from gradxform.compiler import compile_loaded
from gradxform.errors import PipelineError
from gradxform.frontend.loader import LoadedModel
from gradxform.nn.lowrank import LowRankConv2d, LowRankLinear, USVLinear, choose_rank, truncate

from ..conftest import example


def _out(o):
    return o["logits"] if isinstance(o, dict) else o


@pytest.mark.parametrize("target", ["mlp.py", "resnet.py", "vit.py", "lm.py", "gru.py"])
def test_full_rank_equals_the_original_float64(target):
    loaded = example(target, double=True)
    reference = _out(loaded.module(*loaded.args, **loaded.kwargs))
    result = compile_loaded(loaded, "lowrank{rank=1.0,force=true,keep=none}", check=False)
    assert result.report["passes"][0]["info"]["layers"]  # something was factored
    out = _out(result.module(*loaded.args, **loaded.kwargs))
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)


def test_full_rank_float32():
    loaded = example("resnet.py")
    loaded.module.eval()
    reference = loaded.module(*loaded.args)
    module = compile_loaded(loaded, "lowrank{rank=1.0,force=true,keep=none}", check=False).module
    torch.testing.assert_close(module(*loaded.args), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncation_error_is_the_discarded_spectrum(rank):
    torch.manual_seed(0)
    layer = nn.Linear(40, 30).double()
    s = torch.linalg.svdvals(layer.weight)
    low = LowRankLinear.from_linear(layer, rank)
    w_r = low.b.weight @ low.a.weight
    err = layer.weight - w_r
    torch.testing.assert_close(torch.linalg.matrix_norm(err), s[rank:].pow(2).sum().sqrt(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.linalg.matrix_norm(err, ord=2), s[rank], rtol=1e-10, atol=1e-12)


def test_conv_truncation_error_and_shapes():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1).double()
    low = LowRankConv2d.from_conv(conv, 4)
    w = conv.weight.reshape(12, -1)
    s = torch.linalg.svdvals(w)
    w_r = low.second.weight.reshape(12, 4) @ low.first.weight.reshape(4, -1)
    torch.testing.assert_close(torch.linalg.matrix_norm(w - w_r), s[4:].pow(2).sum().sqrt(), rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    assert low(x).shape == conv(x).shape


def test_report_per_layer_with_the_eckart_young_error():
    result = compile_loaded(example("mlp.py", double=True), "lowrank{rank=0.25}", check=False)
    p = result.report["passes"][0]
    rows = {r["layer"]: r for r in p["info"]["layers"]}
    assert set(rows) == {"body.2", "body.4", "body.6"}          # first and last Linear kept
    assert rows["body.2"]["rank"] == 32 and rows["body.2"]["params"] == [128 * 128 + 128, 32 * 256 + 128]
    batch = 16  # the example input's batch
    assert rows["body.2"]["flops"] == [2 * batch * 128 * 128, 2 * batch * 32 * (128 + 128)]
    assert any(n.startswith("body.0 not factored: first or last layer") for n in p["notes"])
    assert p["params"][1] < p["params"][0] and p["flops"][1] < p["flops"][0]


def test_rank_choices():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5])
    assert choose_rank(s, rank=0.5) == 2 and choose_rank(s, rank=3) == 3
    assert choose_rank(s, energy=0.9) == 2          # 100+25 of 126.25 = 99% >= 90%
    assert choose_rank(s, energy=0.999) == 4
    assert choose_rank(s, cutoff=0.1) == 3          # sigma >= 1.0
    assert choose_rank(s, rank=100) == 4


def test_grouped_convs_embeddings_and_patterns_are_skipped():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 64)
            self.dw = nn.Conv1d(64, 64, 3, padding=1, groups=64)
            self.a, self.b, self.c, self.d = (nn.Linear(64, 64) for _ in range(4))

        def forward(self, ids):
            h = self.emb(ids)
            h = self.dw(h.transpose(1, 2)).transpose(1, 2)
            return self.d(self.c(self.b(self.a(h))))

    loaded = LoadedModel(Net(), (torch.randint(0, 50, (2, 7)),))
    result = compile_loaded(loaded, "lowrank{rank=0.25,skip=c,keep=none}", check=False)
    notes = result.report["passes"][0]["notes"]
    assert "emb not factored: embedding" in notes
    assert any(n.startswith("dw not factored") for n in notes)
    assert "c not factored: matched by skip=" in notes
    assert [r["layer"] for r in result.report["passes"][0]["info"]["layers"]] == ["a", "b", "d"]
    only = compile_loaded(LoadedModel(Net(), loaded.args), "lowrank{only=b,keep=none}", check=False)
    assert [r["layer"] for r in only.report["passes"][0]["info"]["layers"]] == ["b"]


def test_rank_that_saves_nothing_is_not_applied():
    result = compile_loaded(example("mlp.py"), "lowrank{rank=0.9}", check=False)
    notes = result.report["passes"][0]["notes"]
    assert any("saves nothing" in n for n in notes) and "no layer factored" in notes


def test_export_graph_linear_becomes_a_factored_call():
    result = compile_loaded(example("lm.py"), "lowrank{rank=0.25}", check=False)
    gm = result.module
    FileCheck().check("self.lowrank0(").check("self.lowrank1(").run(gm.code)
    assert all(isinstance(getattr(gm, f"lowrank{i}"), LowRankLinear) for i in range(4))
    p = result.report["passes"][0]["params"]
    assert p[1] < p[0]  # the dense weights are gone, not kept beside their factors
    ids = torch.randint(0, 256, (3, 5))
    assert gm(ids, attention_mask=torch.ones(3, 5, dtype=torch.long))["logits"].shape == (3, 5, 256)


def test_bad_options():
    with pytest.raises(PipelineError, match="energy must be in"):
        compile_loaded(example("mlp.py"), "lowrank{energy=1.5}")
    with pytest.raises(PipelineError, match="keep takes first, last or none"):
        compile_loaded(example("mlp.py"), "lowrank{keep=middle}")


def test_usv_truncation_keeps_optimizer_steps_consistent():
    """A step after truncation equals a step on a freshly built layer given the same sliced state."""
    torch.manual_seed(0)
    layer = USVLinear.from_linear(nn.Linear(12, 10).double(), 8)
    with torch.no_grad():  # a spectrum with small values to drop
        layer.s.copy_(torch.diag(torch.tensor([5, 4, 3, 2, 0.1, 0.05, 0.02, 0.01], dtype=torch.float64))
                      + 0.01 * torch.randn(8, 8, dtype=torch.float64))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(6, 12, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    w_before = (layer.u @ layer.s @ layer.v.T).detach()
    sigma = torch.linalg.svdvals(layer.s.detach())
    rank = truncate(layer, opt, cutoff=0.1)
    assert rank == 4  # four singular values >= 0.1 * sigma_max, at most half dropped
    w_after = (layer.u @ layer.s @ layer.v.T).detach()
    # the truncated weight is the best rank-4 approximation: the error is the dropped spectrum
    torch.testing.assert_close(torch.linalg.matrix_norm(w_before - w_after), sigma[4:].pow(2).sum().sqrt(),
                               rtol=1e-10, atol=1e-12)
    fresh = USVLinear(layer.u.clone(), layer.s.detach().clone(), layer.v.clone(), layer.bias.detach().clone())
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_opt.state[fresh.s] = {k: v.clone() for k, v in opt.state[layer.s].items()}
    fresh_opt.state[fresh.bias] = {k: v.clone() for k, v in opt.state[layer.bias].items()}
    for mod, o in ((layer, opt), (fresh, fresh_opt)):
        mod(x).pow(2).sum().backward()
        o.step()
    torch.testing.assert_close(layer.s, fresh.s, rtol=0, atol=0)
    assert layer.s.shape == (4, 4) and opt.state[layer.s]["momentum_buffer"].shape == (4, 4)


def test_truncation_never_drops_more_than_half():
    layer = USVLinear.from_linear(nn.Linear(12, 10).double(), 8)
    with torch.no_grad():
        layer.s.copy_(torch.diag(torch.tensor([1.0] + [1e-6] * 7, dtype=torch.float64)))
    assert truncate(layer, None, cutoff=0.5) == 4


def _train(pipeline: str, tmp, **cfg):
    from gradxform.compiler import compile
    from gradxform.runtime.data import digits
    from gradxform.runtime.train import TrainConfig, Trainer

    from ..conftest import EXAMPLES

    torch.manual_seed(0)
    staged = compile(str(EXAMPLES / "mlp.py"), pipeline, check=False).module
    if not hasattr(staged, "stages"):
        from gradxform.nn.staged import StagedModule

        staged = StagedModule([staged])
    train, test = digits(flat=True)
    trainer = Trainer(staged, TrainConfig(out=str(tmp), **cfg))
    return trainer, trainer.fit(train, test)


@pytest.mark.slow
def test_digits_quarter_rank_within_two_points_of_full_rank(tmp_path):
    _, full = _train("split{stages=1}", tmp_path / "full", schedule="backprop", epochs=8)
    _, low = _train("lowrank{rank=0.25},split{stages=1}", tmp_path / "low", schedule="backprop", epochs=8)
    assert full[-1]["test_accuracy"] > 0.9
    assert low[-1]["test_accuracy"] >= full[-1]["test_accuracy"] - 0.02


def test_adaptive_rank_truncates_during_training_and_resumes_exactly(tmp_path):
    pipeline = "lowrank{mode=usv,rank=1.0,force=true},split{stages=2}"
    opts = dict(schedule="petra", rank_every=10, rank_warmup=20)
    whole, hist = _train(pipeline, tmp_path / "a", epochs=2, **opts)
    ranks = hist[-1]["ranks"]
    assert any(r < 128 for stage in ranks.values() for r in stage.values())  # ranks came down
    _train(pipeline, tmp_path / "b", epochs=1, **opts)
    resumed, hist_b = _train(pipeline, tmp_path / "b", epochs=2, resume=True, **opts)
    assert hist_b[-1]["ranks"] == ranks
    assert hist_b[-1]["step_losses"] == hist[-1]["step_losses"]
    for (k, x), (_, y) in zip(whole.staged.state_dict().items(), resumed.staged.state_dict().items()):
        assert torch.equal(x, y), k


def test_adaptive_rank_refuses_stashing_schedules():
    from gradxform.errors import GradxformError
    from gradxform.runtime.train import TrainConfig

    with pytest.raises(GradxformError, match="--rank-every cannot be used with --schedule stash"):
        TrainConfig(schedule="stash", rank_every=5).validate()


class Conv1D(nn.Module):
    """HuggingFace GPT-2's Conv1D: a Linear whose weight is stored in x out, run as addmm(b, x, W)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class ConvOneDMLP(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * d, d), Conv1D(d, 4 * d)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


def test_exported_addmm_of_a_conv1d_becomes_a_factored_call():
    torch.manual_seed(0)
    model = ConvOneDMLP().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    result = compile_loaded(LoadedModel(model, (x,)), "lowrank{rank=0.25,keep=none}", tracer="export", check=False)
    gm = result.module
    # Before: view -> addmm(c_fc.bias, view, c_fc.weight) -> view -> relu -> view -> addmm(...) -> view
    # Expected: view -> lowrank0(view) -> view -> relu -> view -> lowrank1(view) -> view
    FileCheck().check("aten.view").check("self.lowrank0(view").check("aten.view").check("aten.relu") \
        .check("aten.view").check("self.lowrank1(view").check("aten.view").check_not("addmm").run(gm.code)
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # the dense weights and biases are gone
    assert [r["rank"] for r in result.report["passes"][0]["info"]["layers"]] == [4, 4]
    # the factors approximate W^T (out x in): the best rank-4 approximation of the stored weight
    w = model.c_fc.weight.detach()
    low = gm.lowrank0
    u, s, vh = torch.linalg.svd(w.T)
    torch.testing.assert_close(low.b.weight @ low.a.weight, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(low.b.bias, model.c_fc.bias, rtol=0, atol=0)
    full = compile_loaded(LoadedModel(model, (x,)), "lowrank{rank=1.0,force=true,keep=none}", tracer="export",
                          check=False).module
    torch.testing.assert_close(full(x), model(x), rtol=1e-10, atol=1e-12)


def test_multihead_attention_left_whole_is_noted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, 5, 16)
    notes = compile_loaded(LoadedModel(Net(), (x,)), "lowrank{keep=none}", tracer="fx", check=False) \
        .report["passes"][0]["notes"]
    assert notes[0].startswith("mha not factored: nn.MultiheadAttention runs its projections inside one layer")
    exported = compile_loaded(LoadedModel(Net(), (x,)), "lowrank{keep=none}", tracer="export", check=False)
    assert len(exported.report["passes"][0]["info"]["layers"]) == 2  # in_proj and out_proj


@pytest.mark.parametrize("shape", [(30, 40), (40, 30), (12, 8 * 3 * 3)])
def test_one_gram_eigendecomposition_gives_the_svd_truncation(shape):
    from gradxform.nn.lowrank import Spectrum

    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    spectrum = Spectrum(w)
    torch.testing.assert_close(spectrum.s, s, rtol=1e-10, atol=1e-12)
    for r in (1, 5, min(shape)):
        a, b = spectrum.factors(r)
        torch.testing.assert_close(b @ a, (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-9, atol=1e-11)
        assert spectrum.discarded(r) == pytest.approx(float(s[r:].pow(2).sum().sqrt()), rel=1e-9, abs=1e-10)
        uu, ss, vv = spectrum.usv(r)
        torch.testing.assert_close(uu.T @ uu, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(vv.T @ vv, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-10)
        torch.testing.assert_close(uu @ ss @ vv.T, b @ a, rtol=1e-9, atol=1e-11)


def test_a_zero_weight_factors_without_dividing_by_zero():
    from gradxform.nn.lowrank import Spectrum

    w = torch.zeros(6, 4, dtype=torch.float64)
    w[0, 0] = 2.0  # rank one: the other singular values are zero
    a, b = Spectrum(w).factors(4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(b @ a, w, rtol=0, atol=1e-12)
    a, b = Spectrum(torch.zeros(3, 5)).factors(2)
    assert torch.equal(b @ a, torch.zeros(3, 5))


def test_float32_weights_factor_within_float32_rounding_of_the_optimum():
    from gradxform.nn.lowrank import Spectrum

    torch.manual_seed(0)
    w = torch.randn(96, 200) / 14
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = 24
    a, b = Spectrum(w).factors(r)
    assert a.dtype == torch.float32
    best = float(s[r:].pow(2).sum().sqrt())
    got = float(torch.linalg.matrix_norm(w.double() - b.double() @ a.double()))
    assert best <= got < best * (1 + 1e-5)
