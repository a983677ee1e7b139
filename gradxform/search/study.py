"""The study every worker shares: its storage, its settings, and the trials as rows.

``--storage`` takes a database URL (``sqlite:///search.db`` on one machine; ``postgresql://`` or
``mysql://`` to share one study between machines) or a journal file (``journal:PATH``, or a plain
path): Optuna's JournalStorage, an append-only log guarded by a lock file, which needs no server and
works for several machines on one shared file system. Every worker opens the storage itself and asks
it for trials, so workers never wait for each other and no trial is handed out twice.

A worker writes a heartbeat into its running trial every few seconds; a running trial whose
heartbeat is older than ``STALE_S`` lost its worker (killed, or its machine) and is marked failed
by whichever worker or search command looks next, so a lost worker costs only its running trial.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import GradxformError

HEARTBEAT_S = 5.0
STALE_S = 60.0

INSTALL_HINT = "it is one of gradxform's dependencies: reinstall with pip install -c constraints.txt -e ."


def optuna_module() -> Any:
    """Optuna, or a message saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise GradxformError("gradxform search needs Optuna, which is not installed", hint=INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``; a URL that cannot be opened is a message naming it."""
    optuna = optuna_module()
    if "://" in url and not url.startswith("journal:"):
        try:
            return optuna.storages.RDBStorage(url)
        except ImportError as e:
            raise GradxformError(f"--storage {url}: its database driver is not installed ({e.name or e})",
                                 hint="install the driver (psycopg2 for postgresql, pymysql for mysql+pymysql)") from None
        except Exception as e:  # SQLAlchemy's errors: bad URL, unreachable server, unwritable file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GradxformError(f"--storage {url} cannot be opened: {first}",
                                 hint="sqlite:///PATH (a folder that exists), postgresql://USER@HOST/DB, "
                                      "or journal:PATH") from None
    path = Path(url[len("journal:"):].removeprefix("//") if url.startswith("journal:") else url)
    if not path.parent.is_dir():
        raise GradxformError(f"--storage {url}: the folder {path.parent} does not exist",
                             hint="create it, or give a journal file in a folder that exists")
    try:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        # the open lock (O_CREAT|O_EXCL) holds on NFSv3 and later, where a symlink lock may not
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), JournalFileOpenLock(str(path))))
    except OSError as e:
        raise GradxformError(f"--storage {url} cannot be opened: {e.strerror or e}") from None


def study_id(storage: Any, name: str) -> int:
    return storage.get_study_id_from_name(name)


def beat(trial: Any) -> None:
    """The worker running ``trial`` is alive."""
    trial.set_user_attr("heartbeat", time.time())


def fail_stale(storage: Any, name: str, now: float | None = None, worker: str | None = None,
               why: str = "") -> list[int]:
    """Mark failed the running trials whose worker stopped beating (or, given ``worker``, that
    worker's running trials: it is known to be dead); returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    sid = study_id(storage, name)
    lost = []
    for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.RUNNING,)):
        last = t.user_attrs.get("heartbeat") or (t.datetime_start.timestamp() if t.datetime_start else now)
        if worker is not None:
            if t.user_attrs.get("worker") != worker:
                continue
            error = f"its worker {worker} {why or 'died'}"
        elif now - last <= STALE_S:
            continue
        else:
            error = f"its worker stopped (no heartbeat for {now - last:.0f} s): killed, or its machine went down"
        tid = storage.get_trial_id_from_study_id_trial_number(sid, t.number)
        try:
            storage.set_trial_user_attr(tid, "error", error)
            storage.set_trial_state_values(tid, TrialState.FAIL)
            lost.append(t.number)
        except (UpdateFinishedTrialError, RuntimeError):
            pass  # another worker got there first, or the trial finished meanwhile
    return lost


def rows(trials: list[Any], objectives: list[str]) -> list[dict[str, Any]]:
    """One flat record per trial: what it tried, what it measured, how it ended."""
    out = []
    for t in trials:
        u = t.user_attrs
        row = {"number": t.number, "state": t.state.name.lower(), "method": u.get("method", ""),
               "pipeline": u.get("pipeline") or "", "schedule": u.get("schedule", ""),
               "train": u.get("train", {}), "schedule_options": u.get("schedule_options", {}),
               "params": dict(t.params)}
        for key in ("acc", "mem", "mem_total", "throughput", "epochs_run", "pruned", "error", "same_as",
                    "command", "worker", "curve"):
            row[key] = u.get(key)
        row["seconds"] = ((t.datetime_complete - t.datetime_start).total_seconds()
                          if t.datetime_complete and t.datetime_start else None)
        row["values"] = list(t.values) if t.values is not None else None
        out.append(row)
    return out
