"""Training runs that never lose or corrupt work: checkpoints whole or ignored, run folders never
silently reused, resume bit-identical, inputs checked before work starts, errors as messages."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gradxform.runtime.checkpoint import Checkpoints, CheckpointError, RunFolder
from gradxform.runtime.data import digits
from gradxform.runtime.train import TrainConfig, Trainer

from ..conftest import EXAMPLES, ROOT

MLP = f"{EXAMPLES / 'mlp.py'}"
DIGITS = f"{EXAMPLES / 'resnet.py'}:digits_resnet"

DROPOUT_MODEL = """
import torch
import torch.nn as nn


def build_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, 48), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(48, 10))


def example_inputs():
    return (torch.randn(4, 64),)
"""


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _staged(pipeline: str = "split{stages=2}", model: str = MLP, seed: int = 0):
    from gradxform.api import staged

    return staged(model, pipeline, seed=seed)


def _fit(out, epochs: int, *, pipeline: str = "split{stages=2}", model: str = MLP, seed: int = 0, **cfg):
    train, test = digits(flat=True)
    trainer = Trainer(_staged(pipeline, model, seed), TrainConfig(epochs=epochs, out=str(out), batch_size=64, **cfg))
    return trainer, trainer.fit(train, test)


def _same_run(a, b):
    """Same step losses, same accuracy, same weights."""
    (ta, ha), (tb, hb) = a, b
    assert [r["step_losses"] for r in ha] == [r["step_losses"] for r in hb]
    assert [r["test_accuracy"] for r in ha] == [r["test_accuracy"] for r in hb]
    for (k, x), (_, y) in zip(ta.staged.state_dict().items(), tb.staged.state_dict().items()):
        assert torch.equal(x, y), k


# -- 1. checkpoints: whole or ignored ------------------------------------------------------------

def test_a_save_interrupted_between_stages_is_ignored_and_resume_falls_back(tmp_path, monkeypatch):
    """A crash after stage 0 of epoch 2 is written but before the epoch is committed: resume takes
    epoch 1, says it skipped epoch 2, and ends exactly where an uninterrupted run ends."""
    full = _fit(tmp_path / "full", 3)
    real = Checkpoints.write_stage

    def crash_on_stage1_of_epoch2(self, epoch, stage, state):
        if epoch == 2 and stage == 1:
            raise KeyboardInterrupt  # as a kill between the two stage files would
        real(self, epoch, stage, state)

    monkeypatch.setattr(Checkpoints, "write_stage", crash_on_stage1_of_epoch2)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", 3)
    monkeypatch.setattr(Checkpoints, "write_stage", real)
    ck = tmp_path / "cut" / "checkpoints"
    assert (ck / "epoch-0002" / "stage0.pt").exists() and not (ck / "epoch-0002" / "COMMITTED.json").exists()
    assert (ck / "epoch-0001" / "COMMITTED.json").exists()  # kept until the next epoch commits
    resumed = _fit(tmp_path / "cut", 3, resume=True)
    assert resumed[0].resume_notes == ["epoch-0002: never committed (the run stopped while writing it)"]
    _same_run(full, resumed)
    assert [m["epoch"] for m in metrics(tmp_path / "cut")] == [1, 2, 3]


def test_a_checkpoint_missing_a_stage_file_is_not_used(tmp_path):
    _fit(tmp_path, 2)
    ck = Checkpoints(tmp_path / "checkpoints", 2)
    (ck.epoch_dir(2) / "stage1.pt").unlink()
    assert ck.latest() == (None, ["epoch-0002: missing stage1.pt"])
    with pytest.raises(CheckpointError, match="holds no committed checkpoint to resume from"):
        _fit(tmp_path, 3, resume=True)


# -- 2. a run folder holds one run -----------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path):
    _fit(tmp_path, 1)
    with pytest.raises(CheckpointError, match="already holds a run") as e:
        _fit(tmp_path, 1)
    assert "--resume" in e.value.hint and "--overwrite" in e.value.hint
    _, history = _fit(tmp_path, 1, overwrite=True)
    assert len(metrics(tmp_path)) == 1 and history[0]["run"]["seed"] == 0


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no committed checkpoint"):
        _fit(tmp_path / "empty", 1, resume=True)


def test_a_second_job_on_the_same_folder_gets_a_message(tmp_path):
    holder = RunFolder(tmp_path)
    holder.open(resume=False, overwrite=False, record={})
    try:
        with pytest.raises(CheckpointError, match=f"another gradxform train is using --out {tmp_path}"):
            _fit(tmp_path, 1, overwrite=True)
    finally:
        holder.close()
    _fit(tmp_path, 1, overwrite=True)  # the lock went with its holder


def test_every_epoch_records_the_run_its_seed_and_command(tmp_path, cli):
    code, _, err = cli("train", MLP, "--pass", "split{stages=2}", "--epochs", "2", "--out", str(tmp_path),
                       "--no-progress", "--seed", "3")
    assert code == 0, err
    run = json.loads((tmp_path / "run.json").read_text())
    records = metrics(tmp_path)
    assert {r["run"]["id"] for r in records} == {run["id"]} and len(run["id"]) == 12
    assert all(r["run"]["seed"] == 3 and "--seed 3" in r["run"]["command"] for r in records)
    code, _, err = cli("train", MLP, "--pass", "split{stages=2}", "--epochs", "1", "--out", str(tmp_path))
    assert code == 2 and "already holds a run" in err


# -- 3. resume is bit-identical when the model draws random numbers ---------------------------------

@pytest.mark.parametrize("pipeline, schedule", [("split{stages=2}", "petra"),
                                                ("fwd-local{stages=2,head=linear}", "forward-grad{guess=random}")])
def test_resume_is_bit_identical_with_dropout_and_random_tangents(tmp_path, pipeline, schedule):
    model = tmp_path / "dropout.py"
    model.write_text(DROPOUT_MODEL)
    full = _fit(tmp_path / "full", 3, pipeline=pipeline, model=str(model), schedule=schedule)
    _fit(tmp_path / "cut", 1, pipeline=pipeline, model=str(model), schedule=schedule)
    resumed = _fit(tmp_path / "cut", 3, pipeline=pipeline, model=str(model), schedule=schedule, resume=True, seed=0)
    _same_run(full, resumed)


# -- 4. metrics are never written twice ------------------------------------------------------------

def test_a_kill_after_the_commit_does_not_duplicate_metrics(tmp_path, monkeypatch):
    real = Trainer._write_metrics

    def die_at_epoch2(self, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt
        real(self, record)

    monkeypatch.setattr(Trainer, "_write_metrics", die_at_epoch2)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, 3)
    monkeypatch.setattr(Trainer, "_write_metrics", real)
    assert [m["epoch"] for m in metrics(tmp_path)] == [1]
    _fit(tmp_path, 3, resume=True)  # epoch 2 was committed: its metrics come back from the checkpoint
    assert [m["epoch"] for m in metrics(tmp_path)] == [1, 2, 3]


def test_epochs_after_the_last_checkpoint_are_not_written_twice(tmp_path, monkeypatch):
    real = Trainer.save

    def die_at_epoch4(self):
        if self.epoch == 4:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(Trainer, "save", die_at_epoch4)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, 4, checkpoint_every=2)
    monkeypatch.setattr(Trainer, "save", real)
    assert [m["epoch"] for m in metrics(tmp_path)] == [1, 2, 3]   # epoch 3 had no checkpoint
    _fit(tmp_path, 4, checkpoint_every=2, resume=True)
    assert [m["epoch"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


# -- 7. the output folder and a full disk -----------------------------------------------------------

def test_an_out_that_is_a_file_or_unwritable_fails_before_training(tmp_path, cli):
    file = tmp_path / "afile"
    file.write_text("")
    code, _, err = cli("train", MLP, "--epochs", "1", "--out", str(file))
    assert code == 2 and "is a file, not a folder" in err
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        code, _, err = cli("train", MLP, "--epochs", "1", "--out", str(locked / "run"))
        assert code == 2 and "cannot write to --out" in err
    finally:
        locked.chmod(0o700)


def test_a_full_disk_leaves_no_temp_file_and_the_last_checkpoint_intact(tmp_path, monkeypatch):
    _fit(tmp_path, 1)
    before = (tmp_path / "checkpoints" / "epoch-0001" / "stage0.pt").read_bytes()
    real = torch.save

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        _fit(tmp_path, 2, resume=True)
    monkeypatch.setattr(torch, "save", real)
    assert "free some disk space" in e.value.hint and "last committed checkpoint is intact" in e.value.hint
    ck = tmp_path / "checkpoints"
    assert not [p for p in ck.rglob("*") if p.name.endswith(".tmp")]
    assert (ck / "epoch-0001" / "stage0.pt").read_bytes() == before
    assert Checkpoints(ck, 2).latest()[0] == 1


# -- 8. --data checked before the first step --------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ("raise ValueError('no such file: data.csv')", "--data baddata:load raised ValueError: no such file: data.csv"),
    ("return TensorDataset(torch.randn(20, 32), torch.zeros(20).long()), TensorDataset(torch.randn(5, 64), "
     "torch.zeros(5).long())", "the training set has inputs of shape (32,), the model takes (64,)"),
    ("return TensorDataset(torch.randn(20, 64), torch.zeros(20).long()), TensorDataset(torch.randn(5, 64), "
     "torch.tensor([0, 1, 99, 2, 3]))", "the test set: sample 2 has label 99, outside the model's 10 classes"),
    ("return TensorDataset(torch.randn(20, 64), torch.rand(20)), TensorDataset(torch.randn(5, 64), "
     "torch.zeros(5).long())", "the training set has labels of dtype float32"),
    ("return TensorDataset(torch.randn(20, 64), torch.zeros(20).long()), TensorDataset(torch.randn(0, 64), "
     "torch.zeros(0).long())", "the test set is empty"),
    ("x = torch.randn(5, 64); x[3, 7] = float('nan')\n    return TensorDataset(torch.randn(20, 64), "
     "torch.zeros(20).long()), TensorDataset(x, torch.zeros(5).long())",
     "the test set: sample 3 has a NaN or infinite input"),
])
def test_bad_user_data_is_a_message_before_the_first_step(tmp_path, cli, monkeypatch, body, message):
    (tmp_path / "baddata.py").write_text("import torch\nfrom torch.utils.data import TensorDataset\n\n\n"
                                         f"def load():\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("baddata", None)
    code, out, err = cli("train", MLP, "--data", "baddata:load", "--epochs", "1", "--out", str(tmp_path / "run"),
                         "--no-progress")
    assert code == 2 and message in err, err
    assert "epoch 1" not in out


# -- 9. every user-caused error is a message with exit code 2 ---------------------------------------

def test_a_non_finite_loss_is_exit_code_2_with_a_message(tmp_path, cli):
    code, _, err = cli("train", MLP, "--epochs", "1", "--lr", "1e30", "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "non-finite" in err and "lower the learning rate" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["garbage", "hostile", "other-model"])
def test_a_damaged_or_foreign_checkpoint_is_a_message(tmp_path, cli, damage):
    assert cli("train", MLP, "--pass", "split{stages=2}", "--epochs", "1", "--out", str(tmp_path),
               "--no-progress")[0] == 0
    stage0 = tmp_path / "checkpoints" / "epoch-0001" / "stage0.pt"
    pipeline = "split{stages=2}"
    if damage == "garbage":
        stage0.write_bytes(b"\x00not a checkpoint")
        expected = "cannot read checkpoint"
    elif damage == "hostile":  # a pickle that would run code if it were unpickled unsafely
        torch.save({"epoch": 1, "module": os.system}, stage0)
        expected = "cannot read checkpoint"
    else:
        pipeline = "split{at=body.2}"  # other cut points: the saved stage 0 has other parameters
        expected = "does not fit this model"
    code, _, err = cli("train", MLP, "--pass", pipeline, "--epochs", "2", "--out", str(tmp_path), "--resume",
                       "--no-progress")
    assert code == 2 and expected in err and "Traceback" not in err, err


def test_a_damaged_artefact_is_a_message(tmp_path, cli):
    assert cli("compile", MLP, "--pass", "split{stages=2}", "-o", str(tmp_path / "a"), "--emit", "pt")[0] == 0
    (tmp_path / "a" / "weights.pt").write_bytes(b"junk")
    code, _, err = cli("train", str(tmp_path / "a"), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and "cannot read" in err and "weights.pt" in err


# -- 10. an artefact imports only its own copy of the source ---------------------------------------

@pytest.mark.parametrize("source", ["../evil.py", "/etc/hostname"])
def test_an_artefact_source_outside_its_folder_is_refused(tmp_path, cli, source):
    assert cli("compile", MLP, "--pass", "split{stages=2}", "-o", str(tmp_path / "a"), "--emit", "pt")[0] == 0
    (tmp_path / "evil.py").write_text("raise SystemExit('imported')\n")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["source"] = source
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli("train", str(tmp_path / "a"), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert code == 2 and "is not a file inside the artefact folder" in err


# -- 5, 6. processes: signals to the launcher, a failed or hung rank ---------------------------------

def _job_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def _start(tmp_path, *extra, env=None):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradxform", "train", DIGITS, "--pass", "split{stages=2}", "--nproc", "2",
           "--epochs", "40", "--no-progress", "--out", str(out), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    deadline = time.monotonic() + 300
    while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the ranks train once the first epoch's metrics are written
    assert proc.poll() is None, proc.communicate()
    return proc, str(out)


@pytest.mark.slow
@pytest.mark.multiprocess
# SIGINT takes the same handler as SIGTERM (cli/train.py forwards both), so one of the two is launched
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_launcher_leaves_no_process_behind(tmp_path, sig):
    proc, marker = _start(tmp_path)
    assert len(_job_processes(marker)) >= 4, _job_processes(marker)
    time.sleep(2)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _job_processes(marker), _job_processes(marker)
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "continue with --resume" in proc.stderr.read()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_hung_rank_ends_the_job_and_is_named(tmp_path):
    proc, marker = _start(tmp_path, env={"GRADXFORM_TIMEOUT": "12"})
    time.sleep(3)
    rank1 = _rank_pid(marker, 1)
    start = time.monotonic()
    os.kill(rank1, signal.SIGSTOP)
    proc.wait(timeout=120)
    elapsed = time.monotonic() - start
    err = proc.stderr.read()
    assert proc.returncode == 1
    assert "rank 1 (stage 1) hung" in err, err
    assert elapsed < 12 + 25, elapsed  # the timeout, a grace of 5 s, and no wait for torchrun's SIGKILL
    assert not _job_processes(marker)


def _rank_pid(marker: str, rank: int) -> int:
    """The pid of a rank: the job's worker whose environment says RANK=rank."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines()[1:]:
        if marker not in line or "torch.distributed.run" in line:
            continue
        pid = int(line.split()[0])
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} among {_job_processes(marker)}")
