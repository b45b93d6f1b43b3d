"""Readers of a folder leave a mark; jobs that would change the folder refuse while one reads.

An offline Copilot job (`tcp-train --offline-from RUN`) reads a finished run's folder and its
Mistake Log for minutes to hours. If `tcp-log prune --apply` swapped a pruned log in under it,
entry i would silently become another entry. So every process that reads marks the folders:

- `ReadMark(folder).acquire(why=...)` writes `<folder>/.tcp.readers/<host>.<pid>.<id>.json`
  (the owner record of `run_lock.Owner`), then checks the folder's run lock: a live run refuses
  the reader (and the mark is removed). Several readers may read one folder at once.
- `refuse_if_read(folder, ...)`, called by whatever changes a folder after it took the folder's
  `RunLock` (training runs, `tcp-log prune --apply` and `compact`), raises LockError naming a
  live reader. Marking before checking the lock on one side, and locking before checking the
  marks on the other, means one of two racing jobs always sees the other.
- A mark whose process is gone (same host: dead or reused pid, or a reboot) is ignored and
  removed. A mark from another host counts until `run_lock.STALE_AFTER_S` without its
  heartbeat (the holder touches it every `HEARTBEAT_S`), measured on the file server's clock.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from dataclasses import asdict
from pathlib import Path

from tcp.runtime.atomic import atomic_write
from tcp.runtime.run_lock import (
    HEARTBEAT_S,
    STALE_AFTER_S,
    LockError,
    Owner,
    check_not_in_use,
    server_now,
    touch_every,
)

READERS = ".tcp.readers"
"""The folder, inside a marked folder, that holds one file per reading process."""


class ReadMark:
    """This process's mark on one folder it reads. `what` names the reader in messages."""

    def __init__(self, folder: Path | str, *, what: str = "offline training") -> None:
        self.folder = Path(folder)
        self.what = what
        self.path: Path | None = None
        self._stop = threading.Event()

    def acquire(self, *, why: str) -> ReadMark:
        """Mark the folder, then refuse (LockError, the mark removed) if a live run holds it;
        `why` ends that message. Starts the heartbeat."""
        me = Owner.me(self.what)
        d = self.folder / READERS
        path = d / f"{me.host}.{me.pid}.{uuid.uuid4().hex[:8]}.json"
        try:
            d.mkdir(exist_ok=True)
            atomic_write(path, json.dumps(asdict(me)))
        except OSError as e:
            raise LockError(f"cannot mark {self.folder} as being read ({e.strerror}); the "
                            "folder must be writable so that tools do not change it meanwhile") \
                from None
        self.path = path
        try:
            check_not_in_use(self.folder, why=why)
        except BaseException:
            self.release()
            raise
        touch_every(path, HEARTBEAT_S, until=self._stop, name="tcp-read-mark")
        return self

    def release(self) -> None:
        """Remove the mark. Idempotent."""
        self._stop.set()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def live_readers(folder: Path | str) -> list[Owner]:
    """The live readers of `folder`; marks of processes known to be gone are removed."""
    d = Path(folder) / READERS
    try:
        marks = sorted(d.glob("*.json"))
    except OSError:
        return []
    if not marks:
        return []
    now = server_now(d)
    live = []
    for mark in marks:
        try:
            owner = Owner(**json.loads(mark.read_text()))
            age = None if now is None else now - mark.stat().st_mtime
        except (OSError, ValueError, TypeError):
            continue  # being written this instant, or just removed
        alive = owner.alive()
        if alive is None:  # another host: its heartbeat decides
            alive = age is None or age < STALE_AFTER_S
        if alive:
            live.append(owner)
        elif owner.host == socket.gethostname():
            mark.unlink(missing_ok=True)
    return live


def refuse_if_read(folder: Path | str, *, what_to_do: str) -> None:
    """Raise LockError if a live process reads `folder` (call it holding the folder's lock)."""
    readers = live_readers(folder)
    if readers:
        r = readers[0]
        more = f" and {len(readers) - 1} more" if len(readers) > 1 else ""
        raise LockError(f"{folder} is being read by a tcp {r.what} ({r.describe()}){more}; "
                        f"{what_to_do}")
