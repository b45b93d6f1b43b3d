"""Parsers of tcp-log's flag values (light: no torch or zarr, so `--help` is fast)."""

from __future__ import annotations

from tcp.log_tools.errors import UsageError

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


def parse_steps(text: str) -> tuple[int | None, int | None]:
    """'A:B' -> (A, B); 'A:' and ':B' leave an end open."""
    try:
        a, b = text.split(":")
        lo, hi = (int(a) if a.strip() else None), (int(b) if b.strip() else None)
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected A:B (A <= step < B; A: or :B leave an "
                         "end open)") from None
    if lo is not None and hi is not None and hi <= lo:
        raise UsageError(f"--steps {text!r}: B must be greater than A")
    return lo, hi


def parse_ids(text: str) -> frozenset[int]:
    """'1,2,3' -> {1, 2, 3}."""
    try:
        return frozenset(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--sample-ids {text!r}: expected comma-separated integers") from None
