"""What is a Mistake Log, and the errors for a path that is not one or a log that is damaged."""

from __future__ import annotations

import json
from pathlib import Path

from tcp.log_tools.errors import LogToolError
from tcp.log_tools.paths import marker_path
from tcp.mistake_log.format import FORMAT, ranks_in


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
