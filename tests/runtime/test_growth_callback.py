"""Growing while training: the --grow-* options, the metrics, resume across a growth step, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import gradxform
from gradxform.api import staged
from gradxform.errors import GradxformError
from gradxform.runtime.data import digits
from gradxform.runtime.train import TrainConfig, Trainer

from ..conftest import EXAMPLES

MLP = f"{EXAMPLES / 'mlp.py'}"
GROW = dict(grow_every=1, grow_neurons=8, lr=0.05, batch_size=64)


def _fit(out, epochs, resume=False, pipeline="grow{width=0.125}"):
    train, test = digits(flat=True)
    trainer = Trainer(staged(MLP, pipeline), TrainConfig(epochs=epochs, out=str(out), resume=resume, **GROW))
    return trainer, trainer.fit(train, test)


def test_the_model_grows_every_epoch_and_the_metrics_say_where(tmp_path):
    trainer, history = _fit(tmp_path, 3)
    grown = [h["growth"] for h in history]
    assert all(g["grown"] for g in grown)
    for g in grown:
        (row,) = g["pairs"]
        assert row["hidden"][1] == row["hidden"][0] + 8
    params = [g["params"] for g in grown]
    assert params[0][1] > params[0][0] and params[1][0] == params[0][1]  # each step starts where the last ended
    (ex,) = trainer.executors.values()
    assert sum(p.numel() for p in ex.params) == params[-1][1]  # the optimizer trains the grown layers


def test_resume_across_a_growth_step_is_bit_identical(tmp_path):
    full, history = _fit(tmp_path / "full", 3)
    _fit(tmp_path / "cut", 1)
    resumed, again = _fit(tmp_path / "cut", 3, resume=True)
    assert [h["step_losses"] for h in again] == [h["step_losses"] for h in history]
    for (k, a), (_, b) in zip(full.staged.state_dict().items(), resumed.staged.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), k


def test_a_staged_model_is_refused(tmp_path):
    with pytest.raises(GradxformError, match="growth works on a one-stage model, and this one has 2 stages"):
        Trainer(staged(MLP, "grow{width=0.25},split{stages=2}"), TrainConfig(out=str(tmp_path), **GROW))


def test_a_model_with_nothing_to_grow_is_refused_before_training(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    compiled = gradxform.compile(model, "split{stages=1}", example_inputs=(torch.randn(2, 64),))
    with pytest.raises(GradxformError, match="--grow-every: the model has no growable pair"):
        Trainer(staged(compiled), TrainConfig(out=str(tmp_path), **GROW))


def test_the_cli_grows_and_reports(cli, tmp_path):
    code, out, err = cli("train", MLP, "--pass", "grow{width=0.125}", "--grow-every", "1", "--epochs", "2",
                         "--no-progress", "--out", str(tmp_path))
    assert code == 0, err
    assert "grew" in out
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["growth"]["grown"]
