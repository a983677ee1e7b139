"""Training end to end: accuracy on digits, resume, transports, faults, errors."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from gradxform.errors import GradxformError
from gradxform.runtime.train import TrainConfig, Trainer

from ..conftest import EXAMPLES, run_cli

DIGITS = f"{EXAMPLES / 'resnet.py'}:digits_resnet"


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _staged(pipeline: str, seed: int = 0):
    from gradxform.compiler import compile

    torch.manual_seed(seed)
    return compile(DIGITS, pipeline, check=False).module


@pytest.mark.slow
def test_digits_backprop_and_petra(tmp_path):
    from gradxform.runtime.data import digits

    train, test = digits()
    acc = {}
    for schedule in ("backprop", "petra"):
        staged = _staged("petra{stages=4}")
        cfg = TrainConfig(schedule=schedule, epochs=6, out=str(tmp_path / schedule))
        history = Trainer(staged, cfg).fit(train, test)
        acc[schedule] = history[-1]["test_accuracy"]
    assert acc["backprop"] >= 0.95
    assert acc["petra"] >= acc["backprop"] - 0.02, acc


def test_resume_continues_to_the_same_result(tmp_path):
    from gradxform.runtime.data import digits

    train, test = digits()
    full = Trainer(_staged("split{stages=2}"), TrainConfig(epochs=2, out=str(tmp_path / "a")))
    full.fit(train, test)
    half = Trainer(_staged("split{stages=2}"), TrainConfig(epochs=1, out=str(tmp_path / "b")))
    half.fit(train, test)
    rest = Trainer(_staged("split{stages=2}", seed=123),  # other initial weights: the checkpoint must win
                   TrainConfig(epochs=2, out=str(tmp_path / "b"), resume=True))
    rest.fit(train, test)
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [m["step_losses"] for m in a] == [m["step_losses"] for m in b]
    assert a[-1]["test_accuracy"] == b[-1]["test_accuracy"]
    for (k, x), (_, y) in zip(full.staged.state_dict().items(), rest.staged.state_dict().items()):
        assert torch.equal(x, y), k
    assert (tmp_path / "b" / "checkpoints" / "epoch-0002" / "stage1.pt").exists()
    assert not list((tmp_path / "b" / "checkpoints").rglob("*.tmp"))
    assert not (tmp_path / "b" / "checkpoints" / "epoch-0001").exists()  # dropped once epoch 2 committed


@pytest.mark.slow
def test_digits_local_learning_and_forward_gradients(tmp_path):
    """dgl with 2 stages within 3 points of backprop; forward gradients with a local guess clearly
    better than with a random one (4 stages, where the guess matters)."""
    from gradxform.runtime.data import digits

    train, test = digits()
    acc = {}
    for name, pipeline, schedule in [("backprop", "split{stages=2}", "backprop"), ("dgl", "dgl{stages=2}", "auto"),
                                     ("fwd-local", "fwd-local{stages=4}", "forward-grad{guess=local}"),
                                     ("fwd-random", "fwd-local{stages=4}", "forward-grad{guess=random}")]:
        cfg = TrainConfig(schedule=schedule, epochs=4, out=str(tmp_path / name))
        acc[name] = Trainer(_staged(pipeline), cfg).fit(train, test)[-1]["test_accuracy"]
    print("digits test accuracy:", acc)
    assert acc["backprop"] >= 0.95
    assert acc["dgl"] >= acc["backprop"] - 0.03, acc
    assert acc["fwd-local"] >= acc["fwd-random"] + 0.03, acc


def test_cli_train_picks_the_schedule_the_model_was_compiled_for(cli, tmp_path):
    code, out, err = cli("train", str(EXAMPLES / "gru.py"), "--pass", "highway{iterations=2}", "--data", "synthetic",
                         "--epochs", "1", "--out", str(tmp_path / "hw"), "--no-progress")
    assert code == 0, err
    assert "(backprop, 1 stage(s)" in out
    code, out, err = cli("train", str(EXAMPLES / "mlp.py"), "--pass", "dgl{stages=2,head=linear}", "--epochs", "1",
                         "--out", str(tmp_path / "dgl"), "--no-progress")
    assert code == 0, err
    assert "(local, 2 stage(s)" in out
    code, _, err = cli("train", str(EXAMPLES / "mlp.py"), "--pass", "split{stages=2}", "--schedule", "local",
                       "--epochs", "1", "--out", str(tmp_path / "none"))
    assert code == 2 and "stage 0 has no auxiliary head" in err
    code, _, err = cli("train", str(EXAMPLES / "mlp.py"), "--schedule", "forward-grad{guess=best}",
                       "--out", str(tmp_path / "bad"))
    assert code == 2 and "option 'guess' of 'forward-grad': expected one of local, random, got 'best'" in err


def test_config_errors():
    with pytest.raises(GradxformError, match="did you mean 'petra'"):
        TrainConfig(schedule="petr").validate()
    with pytest.raises(GradxformError, match="--batch-size must be at least 1"):
        TrainConfig(batch_size=0).validate()


@pytest.mark.slow
def test_cli_train_in_process(tmp_path):
    r = run_cli("train", DIGITS, "--pass", "split{stages=2}", "--schedule", "1f1b", "--epochs", "1",
                "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "final test accuracy" in r.stdout
    assert (tmp_path / "training.png").exists() and len(metrics(tmp_path)) == 1


def test_cli_train_data_mismatch(cli, tmp_path):
    code, _, err = cli("train", str(EXAMPLES / "resnet.py"), "--epochs", "1", "--out", str(tmp_path))
    assert code == 2 and "takes inputs of shape (3, 32, 32) but digits are (1, 8, 8)" in err


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule, pipeline", [("petra", "split{stages=2}"), ("1f1b", "split{stages=2}"),
                                               ("local", "dgl{stages=2}"),
                                               ("forward-grad{tangents=2}", "fwd-local{stages=2}")])
def test_in_process_and_two_ranks_give_the_same_losses(tmp_path, schedule, pipeline):
    """petra, local, forward-grad: gradxform's point-to-point engine; 1f1b across ranks:
    torch.distributed.pipelining."""
    args = ["train", DIGITS, "--pass", pipeline, "--schedule", schedule, "--epochs", "1",
            "--data", "synthetic", "--batch-size", "64", "--no-progress"]
    env_one_thread = dict(os.environ, OMP_NUM_THREADS="1")
    import subprocess
    import sys

    single = subprocess.run([sys.executable, "-m", "gradxform", *args, "--out", str(tmp_path / "one")],
                            env=env_one_thread, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    double = run_cli(*args, "--nproc", "2", "--out", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr
    one, two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert len(one["step_losses"]) >= 20
    # same thread count per stage: bit-identical (with more threads in-process, float rounding differs)
    assert one["step_losses"][:20] == two["step_losses"][:20]
    assert one["test_accuracy"] == two["test_accuracy"]  # BatchNorm statistics agree too


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_rank_stops_the_job_and_resume_finishes_it(tmp_path):
    args = ["train", DIGITS, "--pass", "split{stages=2}", "--schedule", "petra", "--epochs", "3",
            "--nproc", "2", "--no-progress", "--out", str(tmp_path)]
    env = dict(os.environ, GRADXFORM_KILL_AT="1:1:5")  # rank 1 is killed (SIGKILL) at tick 5 of epoch 2
    import subprocess
    import sys

    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "gradxform", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert elapsed < 90
    assert "rank 1 (stage 1) died without a word" in r.stderr, r.stderr
    assert len(metrics(tmp_path)) == 1  # epoch 1 finished and was checkpointed
    again = run_cli(*args, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout and [m["epoch"] for m in metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.multiprocess
def test_more_ranks_than_stages_is_a_clear_error(tmp_path):
    r = run_cli("train", DIGITS, "--pass", "split{stages=3}", "--nproc", "2", "--epochs", "1",
                "--no-progress", "--out", str(tmp_path))
    assert r.returncode != 0
    assert "the model has 3 stage(s) but 2 ranks were started" in r.stdout + r.stderr


def test_user_dataset_through_module_function(cli, tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def load():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(600, 64, generator=g)\n"
        "    y = (x[:, 0] > 0).long()\n"
        "    return TensorDataset(x[:500], y[:500]), TensorDataset(x[500:], y[500:])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli("train", str(EXAMPLES / "mlp.py"), "--pass", "split{stages=2}", "--data", "mydata:load",
                         "--epochs", "4", "--batch-size", "16", "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 0, err
    assert "final test accuracy" in out and metrics(tmp_path / "run")[-1]["test_accuracy"] > 0.8


def test_bad_user_dataset(cli, tmp_path):
    code, _, err = cli("train", str(EXAMPLES / "mlp.py"), "--data", "no_such_module:load", "--epochs", "1",
                       "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "--data no_such_module:load" in err and "importable" in err


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torch_pipelining_across_epochs_with_uneven_steps(tmp_path):
    """11 micro-batches in steps of 4 give steps of 4, 4 and 3: each step size gets its own prepared
    PipelineStage, epoch after epoch (one stage shared by both sizes failed in epoch 2)."""
    r = run_cli("train", DIGITS, "--pass", "split{stages=2}", "--schedule", "1f1b", "--micro-batches", "4",
                "--batch-size", "128", "--epochs", "2", "--nproc", "2", "--no-progress", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["epoch"] for m in metrics(tmp_path)] == [1, 2]
