"""The stage executor and the in-process engine: equivalences, kept memory, failures."""

from __future__ import annotations

import pytest
import torch

from gradxform.compiler import compile_loaded
from gradxform.runtime.engine import InProcess, run_schedule
from gradxform.runtime.losses import classification_loss
from gradxform.runtime.executor import StageExecutor, TrainingError
from gradxform.runtime.schedules import make_schedule

from ..conftest import example


def run(schedule: str, stages: int, target: str = "mlp.py", pipeline: str | None = None, accumulate: int = 2,
        count: int = 6, lr: float = 0.1, micro_batches: int | None = None, data_scale: float = 1.0):
    """Train ``count`` float64 micro-batches in-process; returns (final weights, losses, executors)."""
    torch.manual_seed(0)
    loaded = example(target, double=True)
    staged = compile_loaded(loaded, pipeline or f"split{{stages={stages}}}", check=False).module.double()
    shape = tuple(loaded.args[0].shape[1:])
    gen = torch.Generator().manual_seed(1)
    xs = [data_scale * torch.randn(8, *shape, generator=gen, dtype=torch.float64) for _ in range(count)]
    ys = [torch.randint(0, 10, (8,), generator=gen) for _ in range(count)]
    inverses = staged.inverses() if schedule == "petra" else {}
    sched = make_schedule(schedule, **({"micro_batches": micro_batches} if micro_batches else {"accumulate": accumulate}))
    exs = {j: StageExecutor(j, len(staged.stages), st, sched, torch.optim.SGD(st.parameters(), lr=lr),
                            classification_loss, inverses.get(j))
           for j, st in enumerate(staged.stages)}
    transport = InProcess(len(staged.stages))
    if micro_batches:
        for start in range(0, count, micro_batches):
            run_schedule(sched.ticks(len(staged.stages), micro_batches), exs, transport,
                         lambda mb, s=start: staged.first_inputs((xs[mb + s],), {}), lambda mb, s=start: ys[mb + s])
    else:
        run_schedule(sched.ticks(len(staged.stages), count), exs, transport,
                     lambda mb: staged.first_inputs((xs[mb],), {}), lambda mb: ys[mb])
    weights = [p.detach().clone() for p in staged.parameters()]
    losses = exs[len(staged.stages) - 1].stats.losses
    return weights, losses, exs


def assert_same(a, b, tol=0.0):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("schedule", ["petra", "stash", "dsp", "delayed-exact"])
def test_one_stage_equals_backprop_exactly(schedule):
    ref_w, ref_l, _ = run("backprop", 1)
    w, l, _ = run(schedule, 1)
    assert_same(w, ref_w)
    assert l == ref_l


def test_backprop_does_not_depend_on_the_number_of_stages():
    assert_same(run("backprop", 3)[0], run("backprop", 1)[0], tol=1e-12)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_synchronous_pipelines_equal_backprop(schedule):
    # one update per 4 micro-batches, averaged: the same as backprop accumulating 4
    ref_w, _, _ = run("backprop", 1, accumulate=4, count=8)
    w, _, _ = run(schedule, 3, count=8, micro_batches=4)
    assert_same(w, ref_w, tol=1e-12)


def test_stash_and_delayed_exact_compute_the_same_delayed_gradient():
    # both differentiate at the forward-time weights and input; they differ only in what they store
    assert_same(run("stash", 3, accumulate=1)[0], run("delayed-exact", 3, accumulate=1)[0], tol=1e-12)


def test_staleness_changes_the_result():
    stash, _, _ = run("stash", 3, accumulate=1)
    dsp, _, _ = run("dsp", 3, accumulate=1)
    assert max(float((a - b).abs().max()) for a, b in zip(stash, dsp)) > 1e-6


def test_kept_memory_per_policy():
    """At J=4 on a reversible ViT: petra keeps nothing on its invertible stages, stash keeps most."""
    kept = {}
    for schedule in ("stash", "dsp", "petra"):
        _, _, exs = run(schedule, 4, target="vit.py", pipeline="petra{stages=4}", count=8, accumulate=1)
        kept[schedule] = [exs[j].stats.peak_kept_bytes for j in range(4)]
    inverses = [j for j, ex in exs.items() if ex.policy.name == "invert"]
    assert inverses == [1, 2]
    assert all(kept["petra"][j] == 0 for j in inverses)
    assert all(kept["dsp"][j] > 0 for j in inverses)
    assert sum(kept["petra"]) < 0.5 * sum(kept["stash"])
    assert kept["stash"][3] == kept["dsp"][3] == kept["petra"][3] == 0  # the last stage keeps nothing


def test_petra_on_invertible_stages_tracks_dsp_closely():
    # Same current weights in backward; petra reconstructs the input instead of storing it.
    p, _, _ = run("petra", 4, target="vit.py", pipeline="petra{stages=4}", count=6, accumulate=1, lr=0.01)
    d, _, _ = run("dsp", 4, target="vit.py", pipeline="petra{stages=4}", count=6, accumulate=1, lr=0.01)
    diff = max(float((a - b).abs().max()) for a, b in zip(p, d))
    assert 0 < diff < 1e-3


def test_non_finite_loss_names_the_stage():
    with pytest.raises(TrainingError, match="stage 1: non-finite loss"):
        run("petra", 2, data_scale=float("nan"))
