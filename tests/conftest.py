"""Shared helpers: load the bundled examples (optionally in float64) and run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each worker gets its share of the cores (torch would otherwise use all of them in
    # every worker, and the suite slows down instead of speeding up)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
EXAMPLES = ROOT / "examples"


def example(target: str, double: bool = False, input_shapes: list[str] | None = None):
    """A LoadedModel for ``examples/<target>`` (``resnet.py:resnet50``), in eval mode if ``double``."""
    from gradxform.frontend.loader import load

    torch.manual_seed(0)
    loaded = load(str(EXAMPLES / target), input_shapes)
    if double:
        loaded.module.double()
        loaded.args = tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in loaded.args)
        loaded.kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                         for k, v in loaded.kwargs.items()}
    return loaded


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``gradxform ARGS`` in a subprocess, as a user runs it."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "gradxform", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from gradxform.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
