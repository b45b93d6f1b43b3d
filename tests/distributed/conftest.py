"""Finished runs that several distributed test files read: a 2-rank joint run costs minutes of
CPU, so it is trained once per session."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import SMALL, launch


@dataclass
class FinishedRun:
    """A run trained by a fixture: its folder, MLflow database and the launcher's output."""

    path: Path
    db: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def joint_run(tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """The 2-rank ZeRO-3 joint run (`tests.helpers.SMALL`: base phase, 24 steps, evaluation),
    finished. Tests read it (test_joint_zero3 checks it, test_offline trains Copilots from its
    Mistake Log); writing beside its files (tcp-eval's eval/) is fine, changing them is not."""
    root = tmp_path_factory.mktemp("joint")
    proc = launch(root / "run", f"tracking.uri=sqlite:///{root / 'mlflow.db'}", *SMALL)
    return FinishedRun(path=root / "run", db=root / "mlflow.db", proc=proc)
