"""Data parallelism (--replicas) and AB-training: equivalence with one process, the AB phase logic,
a 4-rank AB run, resume across a sync boundary, and the refused inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gradxform.errors import GradxformError
from gradxform.runtime.data_parallel import shard, stages_for
from gradxform.runtime.schedules import make_schedule
from gradxform.runtime.schedules.ab import ABOptions, check_groups, groups_of, phase_at, switch_after, trains
from gradxform.runtime.train import TrainConfig, Trainer

from ..conftest import EXAMPLES

# a float64 MLP without BatchNorm or dropout: R replicas of batch b then take exactly the step of one
# process with batch R*b (batch statistics would differ per shard)
MODEL = '''
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(),
                         nn.Linear(48, 10)).double()


def example_inputs():
    return (torch.randn(4, 64, dtype=torch.float64),)


def data():
    from gradxform.runtime.data import digits
    train, test = digits(flat=True)
    x, y = train.tensors
    return TensorDataset(x[:256].double(), y[:256]), TensorDataset(test.tensors[0][:64].double(), test.tensors[1][:64])
'''


def _run(tmp_path, name, *args):
    (tmp_path / "dpmodel.py").write_text(MODEL)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    r = subprocess.run([sys.executable, "-m", "gradxform", "train", str(tmp_path / "dpmodel.py"), "--data",
                        "dpmodel:data", "--tracer", "fx", "--no-progress", "--lr-schedule", "constant",
                        "--out", str(tmp_path / name), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def _weights(folder, epoch, stage, replica=None):
    name = f"stage{stage}.pt" if replica is None else f"stage{stage}-replica{replica}.pt"
    return torch.load(folder / "checkpoints" / f"epoch-{epoch:04d}" / name, weights_only=True)["module"]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- data parallel ------------------------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_the_global_batch():
    x = torch.arange(12)
    parts = [shard((x,), r, 3)[0] for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == x.tolist()
    assert parts[1].tolist() == [1, 4, 7, 10]  # DistributedSampler's interleaving


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_replicas_equal_one_process_with_the_global_batch(tmp_path):
    one = _run(tmp_path, "one", "--pass", "split{stages=1}", "--schedule", "backprop", "--batch-size", "32",
               "--epochs", "2")
    two = _run(tmp_path, "two", "--pass", "split{stages=1}", "--schedule", "backprop", "--batch-size", "16",
               "--replicas", "2", "--epochs", "2")
    assert len(one[0]["step_losses"]) == len(two[0]["step_losses"]) == 8
    diff = _max_diff(_weights(tmp_path / "one", 2, 0), _weights(tmp_path / "two", 2, 0, replica=0))
    assert diff < 1e-10, diff
    assert _max_diff(_weights(tmp_path / "two", 2, 0, 0), _weights(tmp_path / "two", 2, 0, 1)) == 0.0
    # each replica all-reduces its whole gradient once per step (float64), plus nothing else
    n = sum(t.numel() for t in _weights(tmp_path / "one", 2, 0).values())
    assert two[0]["allreduce_bytes_per_step"] == {"0": 8.0 * n, "1": 8.0 * n}
    assert one[0]["allreduce_bytes"] == {"0": 0}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_petra_two_replicas_of_two_stages_equal_one_pipeline_with_the_doubled_batch(tmp_path):
    one = _run(tmp_path, "one", "--pass", "split{stages=2}", "--schedule", "petra", "--batch-size", "32",
               "--nproc", "2", "--epochs", "1")
    two = _run(tmp_path, "two", "--pass", "split{stages=2}", "--schedule", "petra", "--batch-size", "16",
               "--replicas", "2", "--nproc", "4", "--epochs", "1")
    # the same arithmetic up to the order of a sum: the gradient of a mean over 32 samples against the
    # mean of two means over 16; measured 1e-16 .. 1e-15 after 8 steps in float64
    for j in range(2):
        diff = _max_diff(_weights(tmp_path / "one", 1, j), _weights(tmp_path / "two", 1, j, replica=1))
        assert diff < 1e-10, (j, diff)
    assert two[0]["sent_bytes"]["0"] > 0 and two[0]["sent_bytes"]["1"] > 0  # activations to stage 1 of each replica
    assert abs(one[0]["train_loss"] - two[0]["train_loss"]) < 1e-10


def test_replicas_that_do_not_divide_the_world_are_refused(cli, tmp_path):
    with pytest.raises(GradxformError, match="--replicas 3 does not divide the 4 processes"):
        stages_for(4, 3)
    code, _, err = cli("train", str(EXAMPLES / "mlp.py"), "--replicas", "3", "--nproc", "4", "--out", str(tmp_path))
    assert code == 2 and "--replicas 3 does not divide the 4 processes" in err and "Traceback" not in err


def test_a_trainer_without_the_ranks_for_its_replicas_is_refused(tmp_path):
    from gradxform.compiler import compile

    staged = compile(f"{EXAMPLES / 'mlp.py'}", "split{stages=1}", check=False).module
    with pytest.raises(GradxformError, match="--replicas 2 needs 2 processes per stage"):
        Trainer(staged, TrainConfig(schedule="backprop", replicas=2, out=str(tmp_path)))


# -- AB-training: the phase logic without processes ---------------------------------------------------------

def test_ab_phases_and_switches_at_each_step():
    o = ABOptions(sync_every=3, full_steps=2, warmup=2)
    assert [phase_at(k, o) for k in range(10)] == ["warmup"] * 2 + ["ab"] * 3 + ["full"] * 2 + ["ab"] * 3
    assert [switch_after(k, o) for k in range(8)] == [(), ("factor",), (), (), ("sync", "dense"), (), ("refactor",), ()]
    o = ABOptions(sync_every=2, full_steps=0)
    assert [phase_at(k, o) for k in range(4)] == ["ab"] * 4
    assert [switch_after(k, o) for k in range(4)] == [(), ("sync", "refactor"), (), ("sync", "refactor")]


def test_ab_groups_and_which_factor_each_trains():
    assert groups_of(4, 2) == [[0, 1], [2, 3]]
    assert groups_of(7, 2) == [[0, 1, 6], [2, 3], [4, 5]]  # the leftover rank joins the first group
    assert [trains(k, 2) for k in range(2)] == ["A", "B"]
    assert [trains(k, 3) for k in range(3)] == ["A", "B", "B"]
    assert [trains(k, 4) for k in range(4)] == ["A", "A", "B", "B"]


def test_ab_bad_inputs_are_refused(tmp_path):
    from gradxform.compiler import compile

    with pytest.raises(GradxformError, match="a group of 1 rank has no partner"):
        check_groups(4, 1)
    with pytest.raises(GradxformError, match="makes 1 group"):
        check_groups(6, 4)
    ab = make_schedule("ab{group_size=2}")
    with pytest.raises(GradxformError, match="data parallel on one stage; the model has 2"):
        ab.check_data_parallel(4, 2)
    dense = compile(f"{EXAMPLES / 'mlp.py'}", "split{stages=1}", check=False).module
    with pytest.raises(GradxformError, match="this model has none") as e:
        ab.check(dense)
    assert "lowrank{mode=factor}" in e.value.hint
    factored = compile(f"{EXAMPLES / 'mlp.py'}", "lowrank{mode=factor,rank=0.4},split{stages=1}", check=False).module
    ab.check(factored)
    with pytest.raises(GradxformError, match="needs data-parallel ranks"):
        Trainer(factored, TrainConfig(schedule="ab{group_size=2}", out=str(tmp_path)))


# -- AB-training on 4 ranks --------------------------------------------------------------------------------

AB = "ab{group_size=2,sync_every=7,full_steps=4,rebound=3,cutoff=0.7}"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ab_on_four_ranks_and_resume_across_a_sync_is_bit_identical(tmp_path):
    """256 samples, 4 x 16 a global batch: 4 steps an epoch. Steps 0-6 A/B, 7-10 full rank, 11-17 A/B:
    the checkpoint after epoch 2 (step 8) is taken inside a full-rank phase, with dense shapes, and the
    resumed run goes through the re-factorisation at step 11."""
    common = ["--pass", "lowrank{mode=factor,rank=0.4}", "--schedule", AB, "--replicas", "4", "--batch-size", "16"]
    full = _run(tmp_path, "full", *common, "--epochs", "4")
    _run(tmp_path, "half", *common, "--epochs", "2")
    assert [r["ab"]["phase"] for r in full] == ["ab", "full", "ab", "ab"]
    resumed = _run(tmp_path, "half", *common, "--epochs", "4", "--resume")
    assert [r["step_losses"] for r in resumed] == [r["step_losses"] for r in full]
    for r in range(4):
        assert _max_diff(_weights(tmp_path / "full", 4, 0, r), _weights(tmp_path / "half", 4, 0, r)) == 0.0
    w = [_weights(tmp_path / "full", 4, 0, r) for r in range(4)]
    # group {0, 1} trains A, group {2, 3} B: equal within a group, different across the groups
    assert _max_diff(w[0], w[1]) == 0.0 and _max_diff(w[2], w[3]) == 0.0
    a_key = next(k for k in w[0] if k.endswith(".a.weight"))
    b_key = a_key.replace(".a.", ".b.")
    assert not torch.equal(w[0][a_key], w[2][a_key]) and not torch.equal(w[0][b_key], w[2][b_key])
    head = [k for k in w[0] if w[0][k].dim() == 2 and ".a." not in k and ".b." not in k]
    assert head and all(torch.equal(w[0][k], w[2][k]) for k in head)  # full-rank layers: all-reduced by all
    # the re-factorisation cut the rank (cutoff 0.7: a rank-19 factorisation of a uniform random init
    # keeps about 12), the same on every rank, and the records say so
    assert w[0][a_key].shape == w[2][a_key].shape and w[0][a_key].shape[0] < 19
    assert full[-1]["ab"]["ranks"][a_key[:-len(".a.weight")]] == w[0][a_key].shape[0]
    assert full[-1]["ab"]["compression"] > full[0]["ab"]["compression"] > 1
    # an A/B step all-reduces one factor of each layer; a full-rank step the dense weights: more
    per_step = [r["allreduce_bytes_per_step"]["0"] for r in full]
    assert per_step[0] < per_step[1]
