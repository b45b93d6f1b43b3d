"""Errors the operator fixes, printed as one `log error: ...` line with exit code 2.

Kept free of heavy imports: `tcp-log --help` and flag parsing load only this, args.py and
tcp/cli/tcp_log.py.
"""

from __future__ import annotations

import errno

from tcp.errors import RunError


class LogToolError(RunError):
    """A log tool cannot do what was asked; the message says why and what to do."""

    kind = "log"


class UsageError(RunError):
    """A flag value that cannot work (the message names the flag)."""

    kind = "usage"


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
