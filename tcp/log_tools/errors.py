"""Errors the operator fixes, printed as one `log error: ...` line with exit code 2."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from tcp.errors import RunError
from tcp.log_tools.paths import marker_path
from tcp.mistake_log.store import FORMAT, ranks_in


class LogToolError(RunError):
    """A log tool cannot do what was asked; the message says why and what to do."""

    kind = "log"


class UsageError(RunError):
    """A flag value that cannot work (the message names the flag)."""

    kind = "usage"


def is_log(path: Path) -> bool:
    """True if `path` holds a Mistake Log's root group with at least one rank shard."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("format") == FORMAT and bool(ranks_in(path))


def require_log(path: Path) -> Path:
    """`path` if it is a Mistake Log, else LogToolError saying what is there instead."""
    if is_log(path):
        return path
    if marker_path(path).exists():
        raise LogToolError(f"{path}: an interrupted compact or prune left {marker_path(path)}; "
                           f"run `tcp-log compact {path}` to finish it")
    if not path.exists():
        raise LogToolError(f"{path}: no such folder; give the Mistake Log's folder "
                           "(default <output_dir>/mistake_log)")
    raise LogToolError(f"{path}: not a Mistake Log (no rank shards rank00000/... under a "
                       "tcp-mistake-log zarr.json); give the Mistake Log's folder "
                       "(default <output_dir>/mistake_log)")


def damaged(path: Path, e: BaseException) -> LogToolError:
    """The error for a log that fails to read."""
    return LogToolError(f"{path}: damaged Mistake Log ({type(e).__name__}: {e}); run "
                        f"`tcp-log verify {path}` for details")


def disk_full(e: BaseException) -> bool:
    """True if `e` (or what caused it) is ENOSPC / EDQUOT."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_bytes(text: str) -> int:
    """'10G', '500M', '1.5T', '4096' -> bytes (binary units; a trailing B or iB is allowed)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"--max-bytes {text!r}: expected a size such as 500M, 10G or "
                         "1.5T") from None
    if value < 0:
        raise UsageError(f"--max-bytes {text!r}: must be >= 0")
    return int(value * _UNITS[unit])
