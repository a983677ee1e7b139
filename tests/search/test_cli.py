"""``gradxform search`` as a user runs it: two workers on a journal file, the outputs, a best trial
that re-runs to the same numbers, --resume; and bad input as exit code 2 with a message."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest

from gradxform.search.study import open_storage, study_id
from tests.conftest import EXAMPLES, ROOT, run_cli

MLP = str(EXAMPLES / "mlp.py")
SPACE = "split{stages=1|2};dgl{stages=2};train{lr=0.02..0.2:log,batch_size=32|64}"


@pytest.mark.slow
def test_two_workers_on_a_journal_then_rerun_and_resume(tmp_path):
    out = tmp_path / "search"
    r = run_cli("search", MLP, "--space", SPACE, "--trials", "4", "--workers", "2", "--epochs", "2",
                "--out", str(out), "--no-progress", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Pareto front over acc, mem, throughput" in r.stdout and "re-run     OMP_NUM_THREADS=" in r.stdout
    trials = json.loads((out / "trials.json").read_text())["trials"]
    # MaxTrialsCallback counts after each trial: two workers finishing at the same instant may both go on
    assert 4 <= len(trials) <= 5
    assert sorted(t["number"] for t in trials) == list(range(len(trials)))
    ran = sum(int(line.split(": ")[1].split()[0]) for i in range(2)
              for line in (out / "logs" / f"worker-{i}.log").read_text().splitlines() if line.startswith(f"worker {i}: "))
    assert ran == len(trials)  # every trial was run by exactly one worker
    assert len({t["worker"] for t in trials}) <= 2
    for t in trials:
        assert t["state"] in ("complete", "pruned")
        if t["same_as"] is None:
            lines = (out / "trials" / f"{t['number']:04d}" / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == t["epochs_run"]
    header = (out / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("number,state,method,acc,mem,mem_total,throughput")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pareto.txt").read_text().startswith("Pareto front over acc, mem, throughput")
    best = json.loads((out / "best.json").read_text())

    # the best trial's command re-runs it to the same accuracy and the same losses, epoch by epoch
    env_part, cmd = best["command"].split(" ", 1)
    argv = shlex.split(cmd)
    assert argv[:2] == ["gradxform", "train"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", **dict([env_part.split("=")]))
    rerun = subprocess.run([sys.executable, "-m", "gradxform", *argv[1:], "--no-progress"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    folder = argv[argv.index("--out") + 1]
    again = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    first = [json.loads(line) for line in (out / "trials" / f"{best['number']:04d}" / "metrics.jsonl").open()]
    assert again[-1]["test_accuracy"] == best["acc"]
    assert [r["step_losses"] for r in again] == [r["step_losses"] for r in first]

    # --resume continues the same study to more trials; other settings are refused
    more = len(trials) + 1
    r = run_cli("search", MLP, "--space", SPACE, "--trials", str(more), "--epochs", "2", "--out", str(out),
                "--resume", "--no-progress", timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == more
    r = run_cli("search", MLP, "--space", "dgl{stages=2}", "--epochs", "2", "--out", str(out), "--resume")
    assert r.returncode == 2 and "--resume: the study 'search' was started with other settings: space:" in r.stderr


@pytest.mark.slow
def test_a_killed_worker_loses_only_its_running_trial(tmp_path):
    out = tmp_path / "search"
    cmd = [sys.executable, "-m", "gradxform", "search", MLP, "--space", SPACE, "--trials", "4", "--workers", "2",
           "--epochs", "3", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    storage = None
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline:  # the first trial that has started training
        time.sleep(0.5)
        if not (out / "study.journal").exists():
            continue
        storage = storage or open_storage(f"journal:{out / 'study.journal'}")
        for t in storage.get_all_trials(study_id(storage, "search"), deepcopy=False):
            if t.state.name == "RUNNING" and "curve" in t.user_attrs:
                victim = t
    assert victim is not None
    worker = victim.user_attrs["worker"]
    os.kill(int(worker.split(":")[1]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f"was killed by SIGKILL (trial {victim.number} lost)" in stderr
    trials = {t["number"]: t for t in json.loads((out / "trials.json").read_text())["trials"]}
    assert trials[victim.number]["state"] == "fail"
    assert trials[victim.number]["error"] == f"its worker {worker} was killed by SIGKILL"
    others = [t for n, t in trials.items() if n != victim.number]
    assert len(trials) >= 4 and all(t["state"] in ("complete", "pruned") for t in others)


# -- bad input ---------------------------------------------------------------------------------------

def search(cli, tmp_path, *args: str, space: str = "split{stages=1|2}"):
    return cli("search", MLP, "--space", space, "--out", str(tmp_path / "s"), "--no-progress", *args)


def test_malformed_space_is_exit_2_with_a_caret(cli, tmp_path):
    code, _, err = search(cli, tmp_path, space="petra{stages=2..};dgl")
    assert code == 2
    assert err.splitlines()[:3] == ["error: --space: option 'stages' of 'petra': the range has no high end",
                                    "  petra{stages=2..};dgl", "                ^^"]


def test_unknown_objective_is_exit_2(cli, tmp_path):
    code, _, err = search(cli, tmp_path, "--objectives", "acc,latency")
    assert code == 2
    assert err.startswith("error: unknown objective 'latency' in --objectives acc,latency\n  hint: ")


def test_unknown_knob_for_a_pass_is_exit_2(cli, tmp_path):
    code, _, err = search(cli, tmp_path, space="dgl{stages=2,heads=cnn|linear}")
    assert code == 2
    assert err.splitlines()[:3] == ["error: --space: 'dgl' has no option 'heads'", "  dgl{stages=2,heads=cnn|linear}",
                                    "               ^^^^^"]
    assert "did you mean 'head'?" in err


@pytest.mark.parametrize("args, message", [
    (["--objectives", "acc,mem", "--pruner", "median"], "error: --pruner median: Optuna prunes only single-objective studies"),
    (["--objectives", "mem", "--pruner", "dominated"], "error: --pruner dominated judges per-epoch accuracy"),
    (["--epochs", "1"], "error: the throughput objective needs --epochs 2 or more"),
    (["--workers", "0"], "error: --workers must be at least 1"),
    (["--storage", "sqlite:////no/such/folder/s.db"], "error: --storage sqlite:////no/such/folder/s.db cannot be opened: "),
    (["--storage", "journal:/no/such/folder/s.journal"], "error: --storage journal:/no/such/folder/s.journal: the folder "
                                                          "/no/such/folder does not exist"),
    (["--resume"], "error: --resume: there is no study 'search' in the journal in --out"),
])
def test_bad_options_are_exit_2(cli, tmp_path, args, message):
    code, _, err = search(cli, tmp_path, *args)
    assert code == 2 and err.startswith(message), err


def test_an_existing_study_needs_resume(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="search", storage=url)
    code, _, err = search(cli, tmp_path, "--storage", url)
    assert code == 2 and err.startswith(f"error: the study 'search' exists in {url}\n  hint: --resume continues")


def test_a_model_that_does_not_load_is_one_message(cli, tmp_path):
    code, _, err = cli("search", str(tmp_path / "nope.py"), "--space", "split{stages=1|2}", "--out", str(tmp_path))
    assert code == 2 and "nope.py" in err.splitlines()[0]


def test_without_optuna_it_says_how_to_install(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    code, _, err = search(cli, tmp_path)
    assert code == 2
    assert err.splitlines() == ["error: gradxform search needs Optuna, which is not installed",
                                "  hint: it is one of gradxform's dependencies: reinstall with pip install -c "
                                "constraints.txt -e ."]
