"""One live job per folder: a lock file in the run's `output_dir` (and in its Mistake Log).

A second job started on a live folder (a script run twice, a sweep with a typo) would delete the
first run's checkpoints and Mistake Log under its feet. The lock stops it at once:

- `RunLock.acquire()` creates `<dir>/.tcp.lock` exclusively (O_CREAT|O_EXCL, atomic on local
  filesystems and on the shared ones checkpoints already require: NFSv3+, Lustre, GPFS, CephFS)
  holding who owns it: host, pid, the process's start time, the boot id, start time, command.
- A lock whose owner is gone is stale and is taken over with a message: same host and boot, and
  the pid is dead or now belongs to another process (start time differs); same host name but
  another boot (the machine rebooted, or a pod came back elsewhere under its name).
- A lock held on another host cannot be probed from here. Its holder touches it every
  `HEARTBEAT_S` (`start_heartbeat`); one untouched for `STALE_AFTER_S` (a node lost, a job
  requeued elsewhere) is stale. Ages are measured against the file server's clock (a probe
  file's mtime), so clock skew between nodes does not matter. A fresher one is refused, naming
  the host, and the message says which file to delete once that job is known to be gone.
- Taking over is a rename of the stale file followed by an exclusive create, so two jobs that
  find the same stale lock cannot both win.
- `release()` removes the file only if it is still ours. A job killed with SIGKILL leaves it
  behind; the next start on the same host takes it over.

The lock is advisory. The trainer takes it on `output_dir` and on the Mistake Log's folder; a
tool that changes a log must take `RunLock(log_folder, what="log tool")` first.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tcp.errors import RunError

LOCK_NAME = ".tcp.lock"
HEARTBEAT_S = 30.0
"""How often a holder touches its lock."""
STALE_AFTER_S = 900.0
"""A lock held on another host and not touched for this long is stale (30 missed heartbeats:
a live job paused longer than this, e.g. by SLURM suspend, would lose its folder)."""


class LockError(RunError):
    """The folder is in use by a live job (or cannot be locked); the message names it."""

    kind = "lock"


@dataclass
class Owner:
    """Who holds a lock."""

    host: str
    pid: int
    proc_start: str
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    boot_id: str
    started: float
    """Wall-clock time the lock was taken."""
    command: str
    what: str = "run"

    @classmethod
    def me(cls, what: str) -> Owner:
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   proc_start=_proc_start(os.getpid()), boot_id=_boot_id(),
                   started=time.time(), command=" ".join(sys.argv)[:300], what=what)

    stale_why = ""
    """Why `acquire` judged it stale, when it did (not stored in the file)."""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        why = f"; {self.stale_why}" if self.stale_why else ""
        return f"host {self.host}, pid {self.pid}, started {when}{why}"

    def alive(self) -> bool | None:
        """True/False when this host can tell, None when the owner runs on another host."""
        if self.host != socket.gethostname():
            return None
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False  # this machine (or this host name) has rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        start = _proc_start(self.pid)
        return not (self.proc_start and start and start != self.proc_start)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time since boot); '' where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def touch_every(path: Path, interval_s: float, *, until: threading.Event, name: str) -> None:
    """Touch `path` every `interval_s` from a daemon thread until `until` is set: the heartbeat
    that tells other hosts the holder of a lock (or a read mark) is alive."""
    def beat() -> None:
        while not until.wait(interval_s):
            try:
                os.utime(path)
            except OSError:
                pass  # a hiccup of the file server (or the file is gone): try again later

    threading.Thread(target=beat, name=name, daemon=True).start()


def server_now(folder: Path) -> float | None:
    """The file server's current time (the mtime of a probe file written in `folder`), so that
    ages of files written by other hosts do not depend on clock skew; None if it cannot write."""
    probe = folder / f".tcp.lock.clock.{socket.gethostname()}.{os.getpid()}"
    try:
        probe.write_text("")
        return probe.stat().st_mtime
    except OSError:
        return None
    finally:
        probe.unlink(missing_ok=True)


def read_owner(path: Path) -> Owner | None:
    """The owner recorded in a lock file; None if it is missing or unreadable (half-written)."""
    try:
        return Owner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def check_not_in_use(folder: Path | str, *, why: str) -> None:
    """Raise LockError if a live tcp job holds `folder`'s lock, without taking it: for readers
    (several may read one folder at once). A lock held on another host counts as live until
    it is `STALE_AFTER_S` without a heartbeat. `why` ends the message: what to do instead."""
    lock = RunLock(folder)
    held = read_owner(lock.path)
    if held is None:
        return
    alive = held.alive()
    if alive is None:
        age = lock.heartbeat_age()
        alive = age is None or age < STALE_AFTER_S
    if alive:
        raise LockError(f"{lock.folder} is in use by a running tcp {held.what} "
                        f"({held.describe()}); {why}")


class RunLock:
    """The lock on one folder. `what` names the holder's kind in messages ("run", "log tool")."""

    def __init__(self, folder: Path | str, *, what: str = "run") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.owner: Owner | None = None
        self.took_over: Owner | None = None
        """The stale owner replaced by `acquire`, for the caller to announce."""
        self._beating = threading.Event()

    def acquire(self) -> RunLock:
        """Take the lock or raise LockError naming the live owner. Creates the folder."""
        if self.folder.exists() and not self.folder.is_dir():
            raise LockError(f"{self.folder} is not a directory; output_dir (and "
                            "mistake_log.store.path) must name a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LockError(f"cannot create {self.folder} ({e.strerror}); choose a writable "
                            "output_dir") from None
        for _ in range(3):
            if self._create():
                return self
            held = read_owner(self.path)
            if held is None:  # being written this instant, or garbage: look again
                time.sleep(0.2)
                held = read_owner(self.path)
                if held is None:
                    raise LockError(f"{self.path} exists but cannot be read; if no tcp job "
                                    "uses this folder, delete that file and start again")
            alive = held.alive()
            if alive is None:
                age = self.heartbeat_age()
                if age is None or age < STALE_AFTER_S:
                    beat = "" if age is None else f", last heartbeat {age:.0f}s ago"
                    raise LockError(
                        f"{self.folder} is in use by a tcp {held.what} on another host "
                        f"({held.describe()}{beat}); use another output_dir, or if that job is "
                        f"gone (node lost), delete {self.path} and start again")
                held.stale_why = f"no heartbeat for {age:.0f}s"
            if alive:
                raise LockError(
                    f"{self.folder} is in use by a running tcp {held.what} ({held.describe()}); "
                    "wait for it, stop it, or use another output_dir")
            if self._take_over(held):
                self.took_over = held
        raise LockError(f"could not lock {self.folder}: another job keeps taking it")

    def heartbeat_age(self) -> float | None:
        """Seconds since the lock file was last touched, on the file server's clock; None when
        it cannot be measured."""
        now = server_now(self.folder)
        try:
            return None if now is None else now - self.path.stat().st_mtime
        except OSError:
            return None

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> RunLock:
        """Touch the lock every `interval_s` while it is ours (a daemon thread), so another
        host can tell a live holder from a lost one. Stopped by `release`."""
        self._beating.clear()
        touch_every(self.path, interval_s, until=self._beating, name="tcp-lock-heartbeat")
        return self

    def release(self) -> None:
        """Remove the lock if it is still ours. Idempotent."""
        self._beating.set()
        if self.owner is None:
            return
        held = read_owner(self.path)
        if held is not None and (held.host, held.pid, held.started) == (
                self.owner.host, self.owner.pid, self.owner.started):
            self.path.unlink(missing_ok=True)
        self.owner = None

    def _create(self) -> bool:
        me = Owner.me(self.what)
        text = json.dumps(asdict(me))
        tmp = self.folder / f".tcp.lock.{me.host}.{me.pid}.tmp"
        try:
            tmp.write_text(text)
            try:
                # link() is atomic and exclusive even on NFS; the lock appears with its content.
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                # A filesystem without hard links: an exclusive create (readers that catch it
                # half-written look again).
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
        except FileExistsError:
            return False
        except OSError as e:
            raise LockError(f"cannot write {self.path} ({e.strerror}); output_dir must be "
                            "a writable directory") from None
        finally:
            tmp.unlink(missing_ok=True)
        self.owner = me
        return True

    def _take_over(self, stale: Owner) -> bool:
        """Move the stale lock aside; False if another job moved or replaced it first."""
        aside = self.folder / f".tcp.lock.stale.{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_owner(aside)
        if moved is None or asdict(moved) != asdict(stale):
            # Someone else's fresh lock: put it back (only if the place is still free).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
