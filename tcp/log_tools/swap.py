"""Exchange a verified new store with the original, and recover when that was interrupted.

On Linux `renameat2(RENAME_EXCHANGE)` swaps the two folders in one atomic step: at every
instant `<PATH>` is either the whole original or the whole new store. Elsewhere (or with
`TCP_LOG_SWAP=rename`, which the tests use) it falls back to two renames, `<PATH>` ->
`<PATH>.tcp-old` and `<PATH>.tcp-compact` -> `<PATH>`, after writing a recovery marker; between
them `<PATH>` does not exist, and the next `tcp-log compact|prune --apply` finishes the swap
(the new store was verified before the marker was written). The old store is removed only
after the swap. Fault points (`TCP_FAULT_INJECT=kill@compact=N`): 3 between the two renames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tcp.log_tools.checks import is_log
from tcp.log_tools.errors import LogToolError
from tcp.log_tools.paths import TEMP_TAG, marker_path, old_path, temp_path
from tcp.runtime.atomic import atomic_write_json, fsync_path
from tcp.runtime.faults import fault_point
from tcp.runtime.run_lock import RunLock

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def exchange(a: Path, b: Path) -> bool:
    """Atomically exchange folders `a` and `b`; False when this system or filesystem cannot
    (nothing was changed then)."""
    if os.environ.get("TCP_LOG_SWAP", "auto") == "rename" or not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl < 1.2.?)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(path: Path, new: Path) -> Path:
    """Put the store `new` at `path`; returns where the old store is now (to be removed)."""
    if exchange(path, new):
        fsync_path(path.parent)
        return new
    old, marker = old_path(path), marker_path(path)
    atomic_write_json(marker, {"path": str(path), "new": str(new), "old": str(old),
                               "time": time.time(), "note": "written by tcp-log before "
                               "swapping a verified new store in; rerun `tcp-log compact` "
                               "to finish"}, fsync=True)
    os.rename(path, old)
    fault_point("compact", step=3, rank=0)
    os.rename(new, path)
    fsync_path(path.parent)
    return old


def finish(path: Path, old: Path) -> None:
    """Remove the replaced store, then the recovery marker."""
    shutil.rmtree(old)
    marker_path(path).unlink(missing_ok=True)
    fsync_path(path.parent)


def recover_missing(path: Path, say: Callable[[str], None]) -> RunLock | None:
    """`path` is gone and a marker says a swap was interrupted between its renames: finish it
    (or put the original back if the new store is gone too). Returns the lock now held on
    `path`, or None when there was nothing to recover."""
    marker, new, old = marker_path(path), temp_path(path), old_path(path)
    if path.exists() or not marker.exists():
        return None
    if is_log(new):
        src, what = new, "finished the interrupted swap: the verified new store is in place"
    elif is_log(old):
        src, what = old, "undid the interrupted swap: the original store is back in place"
    else:
        raise LogToolError(f"{marker} records an interrupted swap of {path}, but neither {new} "
                           f"nor {old} holds a Mistake Log; nothing was changed")
    lock = RunLock(src, what="log tool").acquire()  # takes over the killed tool's stale lock
    if lock.took_over is not None:
        say(f"took over the stale lock on {src} ({lock.took_over.describe()})")
    os.rename(src, path)
    held = RunLock(path, what="log tool")
    held.owner = lock.owner  # the lock file moved with its folder
    fsync_path(path.parent)
    if old.exists() and src is new:
        shutil.rmtree(old)
    marker.unlink()
    say(f"{path}: {what}")
    return held


def cleanup(path: Path, say: Callable[[str], None]) -> None:
    """Remove what an interrupted run left beside `path` (a complete log, locked by us)."""
    marker, new, old = marker_path(path), temp_path(path), old_path(path)
    if marker.exists():
        if new.exists() and old.exists():
            raise LogToolError(
                f"{marker} records an interrupted swap, and {path}, {new} and {old} all exist "
                f"(was {path} recreated in between?); decide which store to keep, remove the "
                "others and the marker; nothing was changed")
        if old.exists():
            shutil.rmtree(old)
            say(f"{path}: finished the interrupted swap (removed the replaced store {old})")
        marker.unlink()
    for left in (new, old):
        if not left.exists():
            continue
        if not _ours(left):
            raise LogToolError(f"{left} exists and is not a tcp-log temporary store; move it "
                               f"away (tcp-log writes there while rewriting {path})")
        shutil.rmtree(left)
        say(f"removed {left}, left by an interrupted tcp-log compact/prune/merge")


def _ours(folder: Path) -> bool:
    """A partial copy (tagged), a replaced Mistake Log, or an empty folder."""
    return folder.is_dir() and ((folder / TEMP_TAG).exists() or is_log(folder)
                                or not any(folder.iterdir()))
