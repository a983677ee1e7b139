"""Parameters tied across stages train exactly as in the unsplit model (synchronous schedules), and
the schedules that step stages on their own refuse them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradxform
from gradxform.api import staged as staged_module
from gradxform.errors import GradxformError
from gradxform.runtime.engine import InProcess, run_schedule
from gradxform.runtime.executor import StageExecutor
from gradxform.runtime.losses import classification_loss
from gradxform.runtime.schedules import make_schedule
from gradxform.runtime.tied import TiedCopies
from gradxform.runtime.train import TrainConfig, Trainer


class TiedLM(nn.Module):
    """An embedding and an output layer sharing one weight (as GPT-2's wte and lm_head do)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.mid = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids)))


def _train(pipeline: str, schedule: str, steps: int = 4):
    torch.manual_seed(0)
    model = TiedLM().double()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 11, (4, 5), generator=gen) for _ in range(steps)]
    ys = [torch.randint(0, 11, (4, 5), generator=gen) for _ in range(steps)]
    staged = gradxform.compile(model, pipeline, example_inputs=(xs[0],), tracer="fx", check=False)
    staged = staged if hasattr(staged, "tied") else staged_module(staged)
    sched = make_schedule(schedule)
    n = len(staged.stages)
    exs = {j: StageExecutor(j, n, st, sched, torch.optim.SGD(st.parameters(), lr=0.5, momentum=0.9),
                            classification_loss) for j, st in enumerate(staged.stages)}
    tied = TiedCopies(staged, exs, distributed=False)
    tied.check(sched)
    run_schedule(sched.ticks(n, steps), exs, InProcess(n), lambda mb: staged.first_inputs((xs[mb],), {}),
                 lambda mb: ys[mb])
    return staged, exs[n - 1].stats.losses


def test_tied_copies_train_like_the_unsplit_model():
    one, losses_one = _train("split{stages=1}", "backprop")
    three, losses_three = _train("split{stages=3}", "backprop")
    assert three.tied == [[(0, "emb.weight"), (2, "head.weight")]]
    torch.testing.assert_close(torch.tensor(losses_three), torch.tensor(losses_one), rtol=1e-12, atol=1e-12)
    (j, a), (k, b) = three.tied[0]
    copy_a = dict(three.stages[j].named_parameters())[a]
    copy_b = dict(three.stages[k].named_parameters())[b]
    assert torch.equal(copy_a, copy_b)  # the copies stayed equal, step after step
    torch.testing.assert_close(copy_a, one.stages[0].emb.weight, rtol=1e-12, atol=1e-12)


def test_without_the_sum_the_copies_drift_apart():
    """The check above can fail: each stage stepping its copy alone gives other numbers."""
    staged, _ = _train("split{stages=3}", "backprop")
    torch.manual_seed(0)
    model = TiedLM().double()
    ids = torch.randint(0, 11, (4, 5))
    lone = gradxform.compile(model, "split{stages=3}", example_inputs=(ids,), tracer="fx", check=False)
    sched = make_schedule("backprop")
    exs = {j: StageExecutor(j, 3, st, sched, torch.optim.SGD(st.parameters(), lr=0.5), classification_loss)
           for j, st in enumerate(lone.stages)}
    run_schedule(sched.ticks(3, 2), exs, InProcess(3), lambda mb: lone.first_inputs((ids,), {}),
                 lambda mb: torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(mb)))
    (j, a), (k, b) = lone.tied[0]
    assert not torch.equal(dict(lone.stages[j].named_parameters())[a], dict(lone.stages[k].named_parameters())[b])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_synchronous_pipelines_keep_tied_copies_equal(schedule):
    three, _ = _train("split{stages=3}", schedule)
    (j, a), (k, b) = three.tied[0]
    assert torch.equal(dict(three.stages[j].named_parameters())[a], dict(three.stages[k].named_parameters())[b])


@pytest.mark.parametrize("schedule", ["petra", "local"])
def test_schedules_that_step_stages_alone_refuse_tied_copies(tmp_path, schedule):
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (4, 5))
    pipeline = "split{stages=3}" + (",aux-heads{head=linear}" if schedule == "local" else "")
    staged = gradxform.compile(TiedLM().double(), pipeline, example_inputs=(ids,), tracer="fx", check=False)
    with pytest.raises(GradxformError, match=f"tied across stages .* and the {schedule} schedule steps each stage"):
        Trainer(staged, TrainConfig(schedule=schedule, out=str(tmp_path)))


TIED_FILE = '''
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.mid = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids)))


def build_model():
    return TiedLM()


def example_inputs():
    return (torch.randint(0, 11, (4, 6)),)


def tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (400, 6), generator=g)
    y = (x + 1) % 11  # learnable: the next token id
    return TensorDataset(x[:320], y[:320]), TensorDataset(x[320:], y[320:])
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tied_copies_on_two_ranks_equal_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "tiedlm.py").write_text(TIED_FILE)
    args = ["train", str(tmp_path / "tiedlm.py"), "--pass", "split{stages=2}", "--schedule", "1f1b", "--epochs", "1",
            "--data", "tiedlm:tokens", "--batch-size", "16", "--no-progress", "--tracer", "fx"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        r = subprocess.run([sys.executable, "-m", "gradxform", *args, *extra, "--out", str(tmp_path / name)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, two = runs["one"][0], runs["two"][0]
    assert len(one["step_losses"]) == 20 and one["step_losses"] == two["step_losses"]
    assert one["test_accuracy"] == two["test_accuracy"]
