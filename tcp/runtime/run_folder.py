"""The run's folders, claimed before anything in them changes (collective).

`claim_folders` runs first in every job: rank 0 locks `output_dir` and the Mistake Log's folder
(tcp.runtime.run_lock), every rank then checks that it sees rank 0's lock file (a folder that is
not on a filesystem shared by every node would split checkpoints and logs between machines).
Any failure is raised on every rank alike (`tcp.runtime.collective.agree`), as one `RunError`:
exit 2, nothing touched.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from tcp.config import RunConfig
from tcp.errors import RunError
from tcp.runtime.collective import distributed, raise_if_any
from tcp.runtime.console import logger
from tcp.runtime.read_marks import refuse_if_read
from tcp.runtime.run_lock import LOCK_NAME, LockError, RunLock, read_owner


def log_root(cfg: RunConfig) -> Path | None:
    """The Zarr Mistake Log's folder (None for the in-memory backend)."""
    ml = cfg.mistake_log
    if ml.backend != "zarr":
        return None
    return Path(ml.store.path) if ml.store.path else Path(cfg.output_dir) / "mistake_log"


@dataclass
class RunFolders:
    """The locks this job holds (rank 0 holds them; the other ranks hold none)."""

    locks: list[RunLock] = field(default_factory=list)

    def release(self) -> None:
        """Give the folders back (rank 0). Idempotent; call it however the job ends."""
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


def claim_folders(cfg: RunConfig, *, rank: int) -> RunFolders:
    """Lock `output_dir` and the Mistake Log folder, and check that every rank sees them.
    Collective. Raises RunError (LockError when a live job holds either) on every rank."""
    return claim_paths([Path(cfg.output_dir), *filter(None, [log_root(cfg)])], rank=rank)


def claim_paths(folders: list[Path], *, rank: int, what: str = "run") -> RunFolders:
    """`claim_folders` for any folders: rank 0 locks each (as a tcp `what`), then every rank
    checks that it sees the locks. Collective; raises RunError on every rank alike."""
    held = RunFolders()
    error: BaseException | None = None
    if rank == 0:
        try:
            for folder in folders:
                lock = RunLock(folder, what=what).acquire().start_heartbeat()
                held.locks.append(lock)
                refuse_if_read(folder, what_to_do="wait for it to finish, or use another "
                                                  "output_dir (or mistake_log.store.path)")
                if lock.took_over is not None:
                    logger.info(f"[tcp] took over the stale lock on {folder} "
                                f"({lock.took_over.describe()}): that job is gone")
        except LockError as e:
            held.release()
            error = e
    raise_if_any(error)
    # Every rank must see the locks rank 0 just wrote: checkpoints and the log need folders
    # that all nodes share.
    want = [[lock.owner.started if lock.owner else None for lock in held.locks]]
    if distributed():
        dist.broadcast_object_list(want, src=0)
    error = None
    for folder, started in zip(folders, want[0], strict=True):
        seen = read_owner(folder / LOCK_NAME)
        if seen is None or seen.started != started:
            error = RunError(
                f"{folder} on host {socket.gethostname()} does not show the files rank 0 "
                "writes there: output_dir, checkpoint.dir and mistake_log.store.path must be "
                "on a filesystem every node mounts at the same path")
            break
    try:
        raise_if_any(error)
    except RunError:
        held.release()
        raise
    return held
