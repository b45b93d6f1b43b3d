"""Composite checkpoints: both DeepSpeed engines and every rank's trainer state, complete only
when the manifest exists.

The layout on disk, and what makes a checkpoint complete, is checkpoint_layout.py.

Protocol of `save` (collective): write engines and trainer files -> each rank fsyncs what it
wrote -> barrier -> rank 0 writes manifest.json (temp, fsync, rename) -> moves `latest` ->
deletes checkpoints beyond `keep_last` and any incomplete ones -> barrier. A process killed at
any point leaves the previous complete checkpoint untouched; a folder without a manifest is
never resumed from and is removed by the next save.

A write that fails (disk full, quota, file size limit, I/O error) does not end the rank on the
spot: it is recorded, the rank still takes part in every collective of the save (DeepSpeed's
own barriers included), and the barriers above are flag all_reduces through which the ranks
agree. Then rank 0 removes the incomplete folder and every rank raises the same
`CheckpointWriteError` (exit 2, one line, naming the rank, the cause and the free space); the
previous checkpoint stays the latest. `check_shared` (once, at start) and the manifest step
refuse a checkpoint directory that some rank does not see (`CheckpointStorageError`).
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tcp.config import CheckpointConfig
from tcp.runtime.atomic import atomic_write, atomic_write_json, fsync_path
from tcp.runtime.collective import agree, distributed
from tcp.runtime.console import logger
from tcp.runtime.faults import fault_point
from tcp.runtime.shared_storage import VISIBILITY_WAIT_S, check_shared, wait_visible
from tcp.runtime.write_guard import (
    GiB,
    WriteFailure,
    WriteGuard,
    writes_guarded,
)
from tcp.training.checkpoint_layout import (
    ENGINES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    CheckpointInfo,
    CheckpointStorageError,
    CheckpointWriteError,
    list_checkpoints,
    read_complete,
    step_name,
    trainer_file,
)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def has_frozen(engine: Any) -> bool:
    """Whether the engine's module has parameters that do not train (a LoRA Pilot's base)."""
    return any(not p.requires_grad for p in engine.module.parameters())


class CheckpointManager:
    """Saves, finds and loads composite checkpoints. `check_shared`, `save`, `load` and
    `prepare` are collective: every rank calls them."""

    def __init__(self, cfg: CheckpointConfig, output_dir: Path, *, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.root = Path(cfg.dir) if cfg.dir else Path(output_dir) / "checkpoints"
        self.hosts: list[str] | None = None
        """Host name of each rank, once `check_shared` gathered them (for messages)."""

    # -------------------------------------------------------------- storage
    def check_shared(self, wait_s: float | None = None) -> None:
        """Check that every rank sees the same checkpoint directory, so that the parts every
        rank writes end up in one checkpoint.

        Call contract: collective, every rank calls it once per job, after the process group
        exists and before `resolve` (a rank that sees another folder would resume from another
        checkpoint, or from none). Rank 0 creates the directory and writes a probe file holding
        a random nonce there; every rank looks for it (up to `wait_s` seconds, default
        VISIBILITY_WAIT_S, for slow NFS listings); the ranks agree; rank 0 removes the probe.
        Raises CheckpointStorageError on every rank, naming the ranks and hosts that could not
        see it, or saying why rank 0 could not create the directory."""
        self.hosts = check_shared(self.root, rank=self.rank, where=self._where(),
                                  wait_s=VISIBILITY_WAIT_S if wait_s is None else wait_s,
                                  raises=CheckpointStorageError)

    def latest_name(self) -> str | None:
        """The folder `latest` names (the newest complete checkpoint); None when there is none."""
        try:
            return (self.root / "latest").read_text().strip() or None
        except OSError:
            return None

    def _where(self) -> str:
        """The setting that places the checkpoint directory, for messages."""
        if self.cfg.dir:
            return f"checkpoint.dir ({self.root})"
        return f"output_dir (checkpoints go to {self.root}, or set checkpoint.dir)"

    def _host(self, rank: int) -> str:
        """` on <host>` of `rank` when known (this rank's always), else nothing."""
        if rank == self.rank:
            return f" on {socket.gethostname()}"
        return f" on {self.hosts[rank]}" if self.hosts and rank < len(self.hosts) else ""

    # -------------------------------------------------------------- finding
    def resolve(self, resume: str | None) -> CheckpointInfo | None:
        """The checkpoint `resume` names (None: none). Checks that it fits this launch.
        Cheap and model-free: called before anything is loaded."""
        if resume is None:
            return None
        if resume == "auto":
            info = self.newest()
            if info is None:
                return None
        else:
            p = Path(resume)
            info = read_complete(p)
            if info is None and p.is_dir():
                done, _ = list_checkpoints(p)
                info = done[-1] if done else None
            if info is None:
                raise CheckpointError(
                    f"resume={resume!r}: no complete checkpoint there (a `step_*` folder with "
                    f"{MANIFEST}, or a folder holding them); use resume=auto to continue from "
                    f"{self.root}, or leave resume unset for a fresh run")
        if info.world_size != self.world:
            raise CheckpointError(
                f"checkpoint {info.path} was written by {info.world_size} ranks, this launch has "
                f"{self.world}. Relaunch with {info.world_size} ranks (the data order, the "
                "optimizer shards and the per-rank Mistake Log all depend on it). To change the "
                "world size, start a new run from the consolidated weights instead: the run's "
                "`final/pilot` (or `python <ckpt>/pilot/zero_to_fp32.py`) as "
                "model.name_or_path, with a fresh Mistake Log")
        return info

    def newest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint under this run's checkpoint directory."""
        done, _ = list_checkpoints(self.root)
        return done[-1] if done else None

    # -------------------------------------------------------------- lifecycle
    def prepare(self, resumed: CheckpointInfo | None) -> None:
        """Before training. Fresh run: remove a previous run's checkpoints here (announced).
        Resumed run: remove checkpoints newer than the one resumed from (an abandoned future)
        so the timeline is linear. Collective."""
        if self.rank == 0 and self.root.is_dir():
            done, partial = list_checkpoints(self.root)
            doomed = [i.path for i in done if resumed is None or i.step > resumed.step]
            doomed += partial
            if doomed:
                what = "a previous run's" if resumed is None else "newer or incomplete"
                names = ", ".join(p.name for p in doomed)
                logger.info(f"[tcp] removing {what} checkpoints: {names}")
            for p in doomed:
                shutil.rmtree(p, ignore_errors=True)
            if resumed is None:
                (self.root / "latest").unlink(missing_ok=True)
            else:
                self._point_latest(resumed.path.name)
        _barrier()

    def save(self, step: int, *, pilot: Any, copilot: Any, trainer_state: dict[str, Any],
             meta: dict[str, Any]) -> Path:
        """Write the composite checkpoint of `step`. Returns its folder once it is complete on
        every rank. `meta` (JSON) goes into the manifest.

        A write that fails on any rank (disk full, quota, file size limit, I/O error) raises
        CheckpointWriteError on every rank, with the failed rank's cause, once rank 0 has
        removed the incomplete folder; a folder where rank 0 does not see every rank's part
        raises CheckpointStorageError. Either way the previous checkpoint stays the latest."""
        name = step_name(step)
        path = self.root / name
        previous = self.latest_name()
        guard = WriteGuard()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)  # an incomplete attempt at this step
            guard.run(path, path.mkdir, parents=True)
        self._raise_if_failed(guard, path, previous)  # the folder exists
        for engine_name, engine in zip(ENGINES, (pilot, copilot), strict=True):
            self._save_engine(engine, path / engine_name, name, guard, previous)
        mine = path / trainer_file(self.rank)
        guard.run(mine, _atomic_torch_save, trainer_state, mine)
        guard.run(path, self._fsync_mine, path)
        fault_point("checkpoint", step=step, rank=self.rank)
        self._raise_if_failed(guard, path, previous)  # every rank's part is durable
        problem = self._commit(path, step, meta, previous) if self.rank == 0 else None
        error = agree(problem)  # the manifest is written (or the folder is gone)
        if error is not None:
            raise error
        return path

    def _save_engine(self, engine: Any, save_dir: Path, tag: str, guard: WriteGuard,
                     previous: str | None) -> None:
        """One DeepSpeed engine's checkpoint, its writes through `guard` (collective, also
        after a failed write: DeepSpeed's save has barriers). `latest` is written here, by rank
        0, instead of by DeepSpeed, so that its failure is guarded too."""
        with writes_guarded(engine, guard):
            try:
                # A LoRA Pilot's frozen base never changes and is rebuilt from its source on
                # resume: only the adapters (and their optimizer state) are written.
                engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False,
                                       exclude_frozen_parameters=has_frozen(engine))
            except OSError as e:
                # A write DeepSpeed made outside the guard: this rank left the save half way,
                # past collectives the others are in, so there is no agreeing. It reports
                # alone; the launcher (or the collective timeout) ends the other ranks.
                failure = WriteFailure.capture(save_dir, e)
                if distributed():
                    raise self._write_error(save_dir.parent, failure, previous) from e
                guard.failure = guard.failure or failure
        if self.rank == 0:
            guard.run(save_dir / "latest", atomic_write, save_dir / "latest", tag)

    def _raise_if_failed(self, guard: WriteGuard, path: Path, previous: str | None) -> None:
        """Collective, in place of a barrier: when a write failed on any rank, rank 0 removes
        the incomplete `path` (never another checkpoint, never `latest`) and every rank raises
        the failed rank's CheckpointWriteError once it is gone."""
        mine = None if guard.failure is None else self._write_error(path, guard.failure,
                                                                    previous)
        error = agree(mine)
        if error is None:
            return
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        _barrier()  # no rank exits (and has the launcher end rank 0) before the folder is gone
        raise error

    def _commit(self, path: Path, step: int, meta: dict[str, Any],
                previous: str | None) -> CheckpointError | None:
        """Rank 0, once every rank's part is durable: check that every rank's trainer file is
        visible here, write the manifest, move `latest`, rotate. Returns the error every rank
        then raises (the folder already removed); None when the checkpoint is complete."""
        kept = self._kept(previous)
        parts = [path / trainer_file(r) for r in range(self.world)]
        missing = wait_visible(parts, VISIBILITY_WAIT_S)
        if missing:
            shutil.rmtree(path, ignore_errors=True)
            ranks = [parts.index(f) for f in missing]
            who = ", ".join(f"{f.name} (rank {r}{self._host(r)})"
                            for f, r in zip(missing, ranks, strict=True))
            return CheckpointStorageError(
                f"checkpoint {path}: rank 0{self._host(0)} does not see {who} within "
                f"{VISIBILITY_WAIT_S:g}s after those ranks wrote it; {self._where()} must be on "
                f"a filesystem every node mounts at the same path. {kept[0].upper()}{kept[1:]}")
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                    "tag": path.name, "world_size": self.world, "engines": list(ENGINES),
                    "created": time.time(), **meta}
        target = path / MANIFEST
        try:
            atomic_write_json(target, manifest, fsync=True)
            target = self.root / "latest"
            self._point_latest(path.name)
        except OSError as e:
            failure = WriteFailure.capture(target, e)
            shutil.rmtree(path, ignore_errors=True)
            self._restore_latest(path.name, previous)
            return self._write_error(path, failure, previous)
        self._rotate(keep=path)
        return None

    def _restore_latest(self, name: str, previous: str | None) -> None:
        """Best effort, after a failed commit of `name`: `latest` names `previous` again."""
        if self.latest_name() != name:
            return
        with suppress(OSError):
            if previous:
                self._point_latest(previous)
            else:
                (self.root / "latest").unlink()

    def _kept(self, previous: str | None) -> str:
        if previous:
            return f"the previous checkpoint {previous} stays the latest"
        return "there is no earlier checkpoint (resume=auto starts afresh)"

    def _write_error(self, path: Path, failure: WriteFailure,
                     previous: str | None) -> CheckpointWriteError:
        """The one-line error of this rank's failed write of checkpoint `path`."""
        cause, fix = failure.cause()
        f = failure.file
        where = f", writing {f.relative_to(path)}" if f != path and f.is_relative_to(path) \
            else ""
        free = "free space unknown" if failure.free_bytes is None else \
            f"{failure.free_bytes / GiB:.1f} GiB free on {self.root}"
        return CheckpointWriteError(
            f"writing checkpoint {path} failed on rank {self.rank}{self._host(self.rank)} "
            f"({cause}{where}; {free}): {self._kept(previous)}; {fix} and continue with "
            "resume=auto")

    def load(self, info: CheckpointInfo, *, pilot: Any, copilot: Any) -> dict[str, Any]:
        """Load both engines (weights, optimizer, LR schedule) and return this rank's trainer
        state. Collective."""
        for engine_name, engine in zip(ENGINES, (pilot, copilot), strict=True):
            loaded, _ = engine.load_checkpoint(
                str(info.path / engine_name), tag=info.manifest["tag"],
                load_optimizer_states=True, load_lr_scheduler_states=True,
                load_module_strict=not has_frozen(engine))
            if loaded is None:
                raise CheckpointError(f"{info.path / engine_name}: DeepSpeed could not load the "
                                      f"{engine_name} engine's checkpoint")
        state = torch.load(info.path / trainer_file(self.rank), map_location="cpu",
                           weights_only=False)
        if state.get("rank") != self.rank:
            raise CheckpointError(f"{info.path / trainer_file(self.rank)} belongs to rank "
                                  f"{state.get('rank')}, not {self.rank}")
        return state

    # -------------------------------------------------------------- helpers
    def _point_latest(self, name: str) -> None:
        atomic_write(self.root / "latest", name + "\n")

    def _rotate(self, *, keep: Path) -> None:
        """Delete complete checkpoints beyond `keep_last` (never `keep`) and incomplete ones."""
        done, partial = list_checkpoints(self.root)
        old = [i.path for i in done[:-self.cfg.keep_last]]
        for p in old + partial:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def _fsync_mine(self, path: Path) -> None:
        """fsync the files this rank wrote (DeepSpeed names per-rank files zero_pp_rank_{r}_*;
        rank 0 also takes the shared ones), then their folders. Another rank's trainer file and
        any temp file are never touched: a rank's atomic save renames its temp file away at
        any moment (rank 0 once failed here with ENOENT under load)."""
        mine = re.compile(rf"(^|_)rank_{self.rank}_")
        other = re.compile(r"(^|_)rank_\d+_|^trainer_rank\d+\.pt$")
        dirs = set()
        for f in path.rglob("*"):
            if f.name.endswith(".tmp") or not f.is_file():
                continue
            if mine.search(f.name) or (self.rank == 0 and not other.search(f.name)) or \
                    f.name == trainer_file(self.rank):
                fsync_path(f)
                dirs.add(f.parent)
        for d in dirs:
            fsync_path(d)
