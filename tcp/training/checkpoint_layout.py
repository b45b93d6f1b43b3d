"""A composite checkpoint on disk: its layout, and what makes one complete (the manifest exists
and every part it names is there). Read by the checkpoint protocol (checkpoint.py), resume and
`tcp-train --offline-from`.

Layout (under `checkpoint.dir`, default `<output_dir>/checkpoints`):

    step_00000200/
      pilot/{latest, step_00000200/...}      DeepSpeed checkpoint of the Pilot engine
      copilot/{latest, step_00000200/...}    DeepSpeed checkpoint of the Copilot engine
      trainer_rank{r}.pt                     step, RNG states, sampler + Mistake Log cursor, ...
      manifest.json                          written last, atomically, after every rank is done
    latest                                   name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcp.errors import RunError

FORMAT = "tcp-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENGINES = ("pilot", "copilot")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RunError):
    """A checkpoint is missing, incomplete or does not fit this launch; the message says why."""

    kind = "resume"


class CheckpointStorageError(CheckpointError):
    """The checkpoint directory cannot hold checkpoints: some rank does not see what the others
    write there, or it cannot be created. Raised on every rank alike."""

    kind = "checkpoint"


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed on some rank (disk full, quota, file size limit, I/O error).
    Raised on every rank alike, after the incomplete folder is removed; the previous complete
    checkpoint stays the latest."""

    kind = "checkpoint"


def step_name(step: int) -> str:
    """Folder (and DeepSpeed tag) of the checkpoint at `step`."""
    return f"step_{step:08d}"


def trainer_file(rank: int) -> str:
    """Per-rank trainer state file name."""
    return f"trainer_rank{rank}.pt"


@dataclass
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])


def read_complete(path: Path) -> CheckpointInfo | None:
    """The checkpoint at `path` if it is complete (manifest valid, every part present)."""
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        return None
    tag = m.get("tag")
    parts = [path / trainer_file(r) for r in range(int(m.get("world_size", 0)))]
    parts += [path / e / "latest" for e in ENGINES] + [path / e / str(tag) for e in ENGINES]
    if not all(p.exists() for p in parts):
        return None
    return CheckpointInfo(path, m)


def list_checkpoints(root: Path) -> tuple[list[CheckpointInfo], list[Path]]:
    """(complete checkpoints oldest first, incomplete step folders) under `root`."""
    complete, partial = [], []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and _STEP_DIR.match(p.name):
                info = read_complete(p)
                if info is None:
                    partial.append(p)
                else:
                    complete.append(info)
    complete.sort(key=lambda i: i.step)
    return complete, partial
