"""Failed checkpoint writes, agreed by every rank: a write that fails (disk full, quota, file
size limit, I/O error) is recorded instead of raised, the rank still joins every collective of
the save (DeepSpeed's own barriers included), and the ranks agree on the outcome with one
all_reduce where a barrier was. Used by tcp.training.checkpoint."""

from __future__ import annotations

import errno
import resource
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tcp.errors import one_line

GiB = 2**30
DISK_FULL_BYTES = 256 * 2**20
"""A failed write with less free space than this is reported as "disk full" (torch's own write
errors carry no errno)."""

def free_bytes(path: Path) -> int | None:
    """Free space for unprivileged writers on the filesystem of `path` (of its nearest existing
    folder); None when it cannot be read."""
    for p in (path, *path.parents):
        try:
            if p.exists():
                return shutil.disk_usage(p).free
        except OSError:
            return None
    return None


def file_size_limit() -> int | None:
    """This process's file size limit in bytes (`ulimit -f`, RLIMIT_FSIZE); None: unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class WriteFailure:
    """This rank's first failed checkpoint write: the file, the error, and the free space right
    after it failed (torch reports a full disk without an errno, so the space tells)."""

    file: Path
    error: BaseException
    free_bytes: int | None

    @classmethod
    def capture(cls, file: Path, error: BaseException) -> WriteFailure:
        return cls(file, error, free_bytes(file))

    def cause(self) -> tuple[str, str]:
        """(what went wrong, what the operator does about it), in words, one line each."""
        code = self.error.errno if isinstance(self.error, OSError) else None
        text = one_line(self.error)
        # Once the cause is known, torch's own words ("unexpected pos 576 vs 534") are noise.
        os_text = f", {text}" if code is not None else ""
        if code in (errno.ENOSPC, errno.EDQUOT) or (
                self.free_bytes is not None and self.free_bytes < DISK_FULL_BYTES):
            return f"disk full{os_text}", "free space (or raise the quota)"
        limit = file_size_limit()
        if limit is not None and (code == errno.EFBIG or _size(self.file) >= limit):
            return (f"file size limit reached, ulimit -f allows {limit / 2**20:.1f} MiB per file"
                    f"{os_text}", "raise the job's file size limit (ulimit -f)")
        return text, "free space (or raise the quota), or fix the storage error"


class WriteGuard:
    """Runs one rank's checkpoint writes. The first that fails is recorded in `failure` instead
    of raised and every later one is skipped (nothing more goes to a full disk), so the rank
    still reaches every collective of the save and the ranks can agree on the outcome."""

    def __init__(self) -> None:
        self.failure: WriteFailure | None = None

    def run(self, file: Path, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """`write(*args, **kwargs)`, which writes `file`, unless a write already failed."""
        if self.failure is not None:
            return
        try:
            write(*args, **kwargs)
        except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
            self.failure = WriteFailure.capture(file, e)


_UNSET = object()


@contextmanager
def writes_guarded(engine: Any, guard: WriteGuard) -> Iterator[None]:
    """While DeepSpeed saves `engine`, its writes go through `guard`: the checkpoint engine's
    `save` and `makedirs`, and the recovery scripts rank 0 copies. A failed write then does not
    leave `save_checkpoint` half way, so this rank still joins its collectives (a barrier before
    and one after the writes, the tag check) and no other rank waits in one for ever. Instance
    attributes shadow those methods for the duration (an engine without them is left alone)."""
    patches: list[tuple[Any, str, Callable[..., Any]]] = []
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is not None:
        save, makedirs = ce.save, ce.makedirs

        def guarded_save(state_dict: Any, path: str) -> None:
            guard.run(Path(path), save, state_dict, path)

        def guarded_makedirs(path: str, exist_ok: bool = False) -> None:
            guard.run(Path(path), makedirs, path, exist_ok=exist_ok)

        patches += [(ce, "save", guarded_save), (ce, "makedirs", guarded_makedirs)]
    copy = getattr(engine, "_copy_recovery_script", None)
    if copy is not None:
        def guarded_copy(save_path: str) -> None:
            guard.run(Path(save_path), copy, save_path)

        patches.append((engine, "_copy_recovery_script", guarded_copy))
    before = [(obj, name, vars(obj).get(name, _UNSET)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        vars(obj)[name] = fn
    try:
        yield
    finally:
        for obj, name, old in before:
            if old is _UNSET:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = old
