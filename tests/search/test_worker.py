"""A worker's loop on a real study: trials trained in their own processes, early stopping by
gradxform's rule (several objectives) and by Optuna's pruner (one), repeats not trained twice, a
crashing trial recorded as failed while the study goes on, lost workers' trials marked failed."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from gradxform.search.objectives import OBJECTIVES
from gradxform.search.space import parse_space
from gradxform.search.study import STALE_S, fail_stale, open_storage, rows, study_id
from gradxform.search.worker import make_job, work
from tests.conftest import EXAMPLES

optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_for(tmp_path: Path, space: str, objectives: list[str], trials: int, pruner: str, epochs: int = 3):
    url = f"journal:{tmp_path / 'study.journal'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="t", storage=storage, directions=[OBJECTIVES[o].direction for o in objectives])
    job = make_job(storage=url, study="t", space=parse_space(space), objectives=objectives, trials=trials,
                   epochs=epochs, out=str(tmp_path), target=str(EXAMPLES / "mlp.py"), pruner=pruner,
                   startup_trials=1)
    return study, storage, job


@pytest.mark.slow
def test_dominated_trial_stops_and_a_repeat_is_not_trained(tmp_path):
    study, storage, job = study_for(tmp_path, "split{stages=1},train{lr=0.1|0.0001}", ["acc", "mem"], 3, "dominated")
    for lr in ("0.1", "0.0001", "0.1"):
        study.enqueue_trial({"train.lr": lr})
    assert work(job, 0) == 3
    good, bad, again = rows(storage.get_all_trials(study_id(storage, "t")), ["acc", "mem"])
    assert good["state"] == "complete" and good["acc"] > 0.8 and good["epochs_run"] == 3
    assert bad["state"] == "pruned" and bad["epochs_run"] == 2
    assert bad["pruned"].startswith("after epoch 2: test accuracy ") and ", trial 0 had " in bad["pruned"]
    assert bad["mem"] == good["mem"]  # the same pipeline holds the same bytes
    assert again["state"] == "complete" and again["same_as"] == 0 and again["values"] == good["values"]
    assert not (tmp_path / "trials" / "0002").exists()
    assert (tmp_path / "trials" / "0000" / "metrics.jsonl").read_text().count("\n") == 3


@pytest.mark.slow
def test_single_objective_uses_optunas_pruner(tmp_path):
    study, storage, job = study_for(tmp_path, "split{stages=1},train{lr=0.1|0.0001}", ["acc"], 2, "median")
    for lr in ("0.1", "0.0001"):
        study.enqueue_trial({"train.lr": lr})
    work(job, 0)
    good, bad = storage.get_all_trials(study_id(storage, "t"))
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
    assert sorted(bad.intermediate_values) == [1, 2]  # reported per epoch; stopped after epoch 2
    assert bad.user_attrs["pruned"].endswith("stopped by the median pruner")


@pytest.mark.slow
def test_a_crashing_trial_fails_and_the_study_goes_on(tmp_path):
    # rank_every with the stash schedule: the trainer refuses it (stashed weight copies); the
    # model is factored into USV layers so that the petra trial has ranks to truncate
    study, storage, job = study_for(tmp_path, "lowrank{mode=usv,keep=none},split{stages=2},train{schedule=stash|petra,rank_every=5}",
                                    ["acc", "mem"], 2, "none", epochs=1)
    for schedule in ("stash", "petra"):
        study.enqueue_trial({"train.schedule": schedule})
    work(job, 0)
    failed, ok = rows(storage.get_all_trials(study_id(storage, "t")), ["acc", "mem"])
    assert failed["state"] == "fail" and failed["error"].startswith("--rank-every cannot be used with --schedule stash")
    assert ok["state"] == "complete"


def test_lost_workers_trials_are_marked_failed(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 'study.journal'}")
    study = optuna.create_study(study_name="t", storage=storage)
    stale, fresh, dead = study.ask(), study.ask(), study.ask()
    stale.set_user_attr("heartbeat", time.time() - STALE_S - 1)
    fresh.set_user_attr("heartbeat", time.time())
    dead.set_user_attr("heartbeat", time.time())
    dead.set_user_attr("worker", "host:42")
    assert fail_stale(storage, "t") == [stale.number]
    assert fail_stale(storage, "t", worker="host:42", why="was killed by SIGKILL") == [dead.number]
    states = {t.number: (t.state.name, t.user_attrs.get("error")) for t in study.get_trials()}
    assert states[fresh.number] == ("RUNNING", None)
    assert states[stale.number][0] == "FAIL" and states[stale.number][1].startswith("its worker stopped (no heartbeat")
    assert states[dead.number] == ("FAIL", "its worker host:42 was killed by SIGKILL")
