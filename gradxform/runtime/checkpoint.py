"""Checkpoints that are whole or ignored, and run folders that are never silently reused.

A checkpoint is an epoch-level unit: ``checkpoints/epoch-0003/stage0.pt, stage1.pt, ...`` and, written
last, ``COMMITTED.json`` (the epoch, the number of stages, the metrics history). Every file is written
to a temporary name, flushed to disk and renamed, and the folder is synced after each rename, so a
kill or a full disk at any moment leaves either a committed epoch or one without ``COMMITTED.json``,
which loading ignores (and says so). Under ``--nproc`` every rank writes its own stage file (with
``--replicas`` R > 1, ``stage{j}-replica{r}.pt``: AB-training's replicas hold different factors); rank 0
commits once all of them have (a barrier between). The previous committed epoch is removed only after
the new one is committed.

A run folder (``--out``) holds one run: ``run.json`` (its id, seed, command and configuration),
``metrics.jsonl`` (rebuilt from the committed history on resume, so a replayed epoch never appears
twice), ``training.png`` and ``checkpoints/``. Training into a folder that holds a run needs
``--resume`` or ``--overwrite``; a lock file held for the run's lifetime turns a second job on the same
folder into a message (the lock dies with its process: a killed run leaves no stale lock).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import GradxformError

COMMITTED = "COMMITTED.json"


class CheckpointError(GradxformError):
    """A checkpoint or run folder cannot be written or read."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(path: Path, e: OSError) -> CheckpointError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return CheckpointError(f"cannot write {path}: {e.strerror or e}",
                           hint="free some disk space, or choose another --out; the last committed checkpoint "
                                "is intact" if full else "check the permissions of --out, or choose another")


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then flush and rename to ``path``: a reader sees the old file or the new one.
    On failure (a full disk) the temporary file is removed and the error says what to do."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


class Checkpoints:
    """The committed epochs under ``folder`` (``DIR/checkpoints``) of a model with ``stages`` stages."""

    def __init__(self, folder: Path, stages: int | None, replicas: int | None = 1, replica: int = 0):
        self.folder, self.stages = Path(folder), stages  # None: as many as the commit says
        self.replicas, self.replica = replicas, replica  # the replica whose files this process writes and reads

    @staticmethod
    def file(stage: int, replica: int = 0, replicas: int = 1) -> str:
        """A stage's file; with data-parallel replicas, one per replica (AB-training's replicas differ)."""
        return f"stage{stage}.pt" if replicas == 1 else f"stage{stage}-replica{replica}.pt"

    def files(self, stages: int, replicas: int) -> list[str]:
        return [self.file(j, r, replicas) for j in range(stages) for r in range(replicas)]

    def epoch_dir(self, epoch: int) -> Path:
        return self.folder / f"epoch-{epoch:04d}"

    def write_stage(self, epoch: int, stage: int, state: dict[str, Any]) -> None:
        folder = self.epoch_dir(epoch)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _disk_error(folder, e) from None
        write_atomic(folder / self.file(stage, self.replica, self.replicas or 1), lambda tmp: torch.save(state, tmp))

    def commit(self, epoch: int, history: list[dict[str, Any]]) -> None:
        """Mark epoch ``epoch`` whole (every stage file written), then drop the older epochs."""
        folder = self.epoch_dir(epoch)
        replicas = self.replicas or 1
        missing = [f for f in self.files(self.stages, replicas) if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"cannot commit the checkpoint of epoch {epoch}: stage file(s) "
                                  f"{', '.join(missing)} were not written")
        write_json(folder / COMMITTED, {"epoch": epoch, "stages": self.stages, "replicas": replicas, "history": history,
                                        "time": time.time()})
        for old in self.folder.glob("epoch-*"):
            if old != folder and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> tuple[int | None, list[str]]:
        """The newest committed epoch (None: there is none) and a note for every newer one skipped."""
        skipped = []
        for folder in sorted(self.folder.glob("epoch-*"), reverse=True):
            why = self._incomplete(folder)
            if why is None:
                return int(folder.name.split("-")[1]), skipped
            skipped.append(f"{folder.name}: {why}")
        return None, skipped

    def _incomplete(self, folder: Path) -> str | None:
        marker = folder / COMMITTED
        if not marker.exists():
            return "never committed (the run stopped while writing it)"
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"unreadable {COMMITTED}: {e}"
        stages = self.stages if self.stages is not None else info.get("stages")
        replicas = self.replicas if self.replicas is not None else info.get("replicas", 1)
        if info.get("stages") != stages or info.get("epoch") != int(folder.name.split("-")[1]):
            return f"written for {info.get('stages')} stage(s) at epoch {info.get('epoch')}"
        if info.get("replicas", 1) != replicas:
            return f"written for {info.get('replicas', 1)} replica(s), not {replicas}"
        missing = [f for f in self.files(int(stages), int(replicas)) if not (folder / f).exists()]
        return f"missing {', '.join(missing)}" if missing else None

    def history(self, epoch: int) -> list[dict[str, Any]]:
        return json.loads((self.epoch_dir(epoch) / COMMITTED).read_text())["history"]

    def read_stage(self, epoch: int, stage: int) -> dict[str, Any]:
        path = self.epoch_dir(epoch) / self.file(stage, self.replica, self.replicas or 1)
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read it is damage (struct.error, EOFError, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot read checkpoint {path}: {first}",
                                  hint="it is damaged or not a gradxform checkpoint (only plain tensors are "
                                       "loaded, never pickled code); train afresh with --overwrite") from None
        if not isinstance(state, dict) or state.get("epoch") != epoch or "module" not in state:
            raise CheckpointError(f"{path} is not the checkpoint of stage {stage} at epoch {epoch}",
                                  hint="train afresh with --overwrite")
        return state


# ------------------------------------------------------------------------------------------ run folders

RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints")


class RunFolder:
    """``--out``: checked before any work, locked for the run's lifetime."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self._lock: Any = None

    def holds_run(self) -> bool:
        return any((self.out / name).exists() for name in RUN_FILES)

    def open(self, *, resume: bool, overwrite: bool, record: dict[str, Any], stages: int | None = None
             ) -> dict[str, Any]:
        """Check and lock the folder; returns the run's record (id, seed, command) written to run.json."""
        if self.out.exists() and not self.out.is_dir():
            raise CheckpointError(f"--out {self.out} is a file, not a folder", hint="choose a folder for --out")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write to --out {self.out}: {e.strerror or e}",
                                  hint="choose a folder you can write to") from None
        self._take_lock()
        if resume:
            epoch, _ = Checkpoints(self.out / "checkpoints", stages, replicas=None).latest()
            if epoch is None:
                self.close()
                raise CheckpointError(f"--resume: {self.out} holds no committed checkpoint to resume from",
                                      hint="drop --resume to start a new run (or check --out)")
        elif self.holds_run():
            if not overwrite:
                self.close()
                raise CheckpointError(f"--out {self.out} already holds a run (run.json, metrics.jsonl or "
                                      f"checkpoints/)", hint="continue it with --resume, replace it with "
                                                             "--overwrite, or choose another --out")
            for name in (*RUN_FILES, "training.png"):
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        previous = {}
        if resume and (self.out / "run.json").exists():
            try:
                previous = json.loads((self.out / "run.json").read_text())
            except (OSError, json.JSONDecodeError):
                previous = {}
        run = dict(record, id=previous.get("id") or uuid.uuid4().hex[:12],
                   resumed=previous.get("resumed", 0) + 1 if resume else 0)
        write_json(self.out / "run.json", run)
        return run

    def _take_lock(self) -> None:
        path = self.out / ".lock"
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise CheckpointError(f"another gradxform train is using --out {self.out}"
                                  + (f" (process {holder})" if holder else ""),
                                  hint="wait for it to finish, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock = f

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None
