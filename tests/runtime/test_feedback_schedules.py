"""The f3, dfa, drtp and llo schedules: against the reference loop, their defining properties, resume,
no backward messages, and the bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from gradxform.api import staged as staged_module
from gradxform.autodiff.feedback import ErrorBuffer
from gradxform.errors import GradxformError
from gradxform.runtime.data import digits
from gradxform.runtime.engine import InProcess
from gradxform.runtime.train import TrainConfig, Trainer, micro_batches

from ..autodiff.f3_reference import step
from ..conftest import EXAMPLES

MLP = f"{EXAMPLES / 'mlp.py'}"
SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr_schedule="constant", lr=0.002, batch_size=64)


def _fit(out, schedule, pipeline="f3", epochs=2, transport=None, **cfg):
    train, test = digits(flat=True)
    staged = staged_module(MLP, pipeline)
    trainer = Trainer(staged, TrainConfig(schedule=schedule, epochs=epochs, out=str(out), **{**SGD, **cfg}),
                      transport=transport)
    initial = copy.deepcopy(staged)
    return trainer, trainer.fit(train, test), initial


@pytest.mark.parametrize("method", ["f3", "dfa", "drtp", "llo"])
def test_one_stage_equals_the_reference_loop(tmp_path, method):
    """The schedule's updates equal the reference F³ loop's, step for step, bit for bit."""
    trainer, history, model = _fit(tmp_path, method)
    info = next(r["info"] for r in trainer.staged.gx_report["passes"] if r["name"] == "f3")
    train, _ = digits(flat=True)
    opt = torch.optim.SGD(model.parameters(), lr=SGD["lr"])
    buffer = ErrorBuffer(train.tensors[1], info["error"], info["loss"], info["classes"])  # f3's, and the classes
    losses = []
    torch.manual_seed(0)
    for e in range(2):
        for x, y, idx in micro_batches(train, SGD["batch_size"], 0, e):
            r = step(model, opt, method, idx, x, y, info["loss"], info["error"], buffer)
            losses.append(float(r["loss"]))
    assert [s for h in history for s in h["step_losses"]] == losses
    for a, b in zip(trainer.staged.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_f3_epoch_one_is_drtp(tmp_path):
    _, f3, _ = _fit(tmp_path / "f3", "f3", epochs=1)
    _, drtp, _ = _fit(tmp_path / "drtp", "drtp", epochs=1)
    assert f3[0]["step_losses"] == drtp[0]["step_losses"]
    _, f3_two, _ = _fit(tmp_path / "f3b", "f3", epochs=2)
    _, drtp_two, _ = _fit(tmp_path / "drtpb", "drtp", epochs=2)
    assert f3_two[1]["step_losses"] != drtp_two[1]["step_losses"]  # epoch 2 reads last epoch's errors


def test_two_stages_send_nothing_backwards_and_llo_trains_only_the_last(tmp_path):
    transport = InProcess(2)
    trainer, _, before = _fit(tmp_path / "f3", "f3", pipeline="split{stages=2},f3{at=stages}", epochs=1,
                              transport=transport)
    assert not [k for k in transport.mailbox if k[1] == "b"]
    assert all(ex.stats.updates > 0 for ex in trainer.executors.values())
    assert any(not torch.equal(a, b) for a, b in zip(trainer.staged.stages[0].parameters(),
                                                     before.stages[0].parameters()))
    llo, _, start = _fit(tmp_path / "llo", "llo", pipeline="split{stages=2},f3{at=stages}", epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(llo.staged.stages[0].parameters(), start.stages[0].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(llo.staged.stages[1].parameters(), start.stages[1].parameters()))


def test_the_buffer_after_an_epoch_holds_the_errors_of_the_stored_outputs(tmp_path):
    """Every training sample's row was written by its own step: rows differ from the one-hot start
    exactly for the samples the epoch saw."""
    trainer, _, _ = _fit(tmp_path, "f3", epochs=1)
    buf = trainer.schedule.buffer
    train, _ = digits(flat=True)
    seen = torch.cat([idx for _, _, idx in micro_batches(train, SGD["batch_size"], 0, 0)])
    start = type(buf)(train.tensors[1], buf.kind, buf.loss, buf.classes)
    changed = (buf.rows(torch.arange(len(buf))) != start.rows(torch.arange(len(buf)))).any(1)
    assert set(changed.nonzero().flatten().tolist()) == set(seen.tolist())


def test_resume_with_the_error_buffer_is_bit_identical(tmp_path):
    full, history, _ = _fit(tmp_path / "full", "f3", epochs=3)
    _fit(tmp_path / "cut", "f3", epochs=1)
    resumed, again, _ = _fit(tmp_path / "cut", "f3", epochs=3, resume=True)
    assert [h["step_losses"] for h in again] == [h["step_losses"] for h in history]
    assert torch.equal(resumed.schedule.buffer.values, full.schedule.buffer.values)


def test_a_model_without_connectors_or_boundaries_in_them_is_refused(tmp_path):
    with pytest.raises(GradxformError, match="the f3 schedule trains through feedback connectors"):
        _fit(tmp_path / "a", "f3", pipeline="split{stages=2}")
    staged = staged_module(MLP, "split{stages=2},f3{at=stages}")
    stage0 = staged.stages[0]
    for node in list(stage0.graph.nodes):  # bypass the boundary's connector, as a hand-edited graph might
        if node.op == "call_module" and node.target.startswith("feedback"):
            node.replace_all_uses_with(node.args[0])
    stage0.recompile()
    with pytest.raises(GradxformError, match="stage 0 does not end in a feedback connector"):
        Trainer(staged, TrainConfig(schedule="f3", out=str(tmp_path / "b"), **SGD))


def test_dfa_needs_the_whole_model_in_one_process(tmp_path):
    staged = staged_module(MLP, "split{stages=2},f3{at=stages}")

    class OneStage(InProcess):
        def __init__(self):
            super().__init__(2)
            self.stages = [0]
            self.device = torch.device("cpu")

    trainer = Trainer(staged, TrainConfig(schedule="dfa", out=str(tmp_path), **SGD), transport=OneStage())
    train, _ = digits(flat=True)
    with pytest.raises(GradxformError, match="dfa needs the whole model's output"):
        trainer.schedule.start(trainer, train)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_f3_on_two_ranks_equals_one_process(tmp_path):
    import os
    import subprocess
    import sys

    args = ["train", MLP, "--pass", "split{stages=2},f3{at=stages}", "--schedule", "f3", "--epochs", "2",
            "--batch-size", "64", "--no-progress", "--lr", "0.002", "--momentum", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        r = subprocess.run([sys.executable, "-m", "gradxform", *args, *extra, "--out", str(tmp_path / name)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    one, two = ([json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                for n in ("one", "two"))
    assert [h["step_losses"] for h in one] == [h["step_losses"] for h in two]  # epoch 2 reads the sent buffer
    assert one[-1]["test_accuracy"] == two[-1]["test_accuracy"]
