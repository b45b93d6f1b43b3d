"""Durable file writes: the one way tcp publishes a file (results, configs, manifests, markers,
checkpoint pieces, predictions).

Durability, stated once: `atomic_write` writes a temp file `.<name>.<pid>.tmp` beside `path`,
fsyncs it, renames it over `path` and fsyncs the folder. After a crash or a power cut `path` is
the old file or the new one, never a mix; once the call returns, the new one survives a power
cut. `publish` gives a file a library wrote to a temp path the same guarantee. `fsync=False`
keeps the all-or-nothing rename and skips both fsyncs (a Mistake Log with
`mistake_log.store.fsync: false`). Temp files end in `.tmp`, which readers skip.

The Mistake Log's chunk files are the one exception: they are written in parts and published
by the store's commit protocol (`tcp.mistake_log.format.replace_file`: each fsynced before its
rename, the folders once per commit, then the manifest through `atomic_write_json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_path(path: Path) -> None:
    """fsync a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str | Callable[[IO[bytes]], None], *,
                 fsync: bool = True) -> None:
    """Publish `data` at `path` all at once (module docstring). `data` is the content, or a
    function that writes it to a binary file (e.g. `lambda f: torch.save(obj, f)`)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:  # through the open file: no second open, as publish() needs
                os.fsync(f.fileno())
        _rename(tmp, path, fsync=fsync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_path(path: Path) -> Path:
    """Where `path`'s new content is written before `publish` renames it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def publish(tmp: Path, path: Path, *, fsync: bool = True) -> None:
    """Rename the complete file `tmp` (written by a library that wants a path, e.g. a Parquet
    writer) over `path`, with the same durability as `atomic_write`."""
    if fsync:
        fsync_path(tmp)
    _rename(tmp, path, fsync=fsync)


def _rename(tmp: Path, path: Path, *, fsync: bool) -> None:
    """The last step of both: `tmp` (already on disk) over `path`, then the folder's entry."""
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any, *, indent: int = 1, fsync: bool = True) -> None:
    """`obj` as JSON at `path` through `atomic_write`; numbers numpy or torch may hand over
    (anything float() takes) are written as floats."""
    atomic_write(path, json.dumps(obj, indent=indent, default=float), fsync=fsync)
