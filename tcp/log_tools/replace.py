"""Rewrite a log in place (prune --apply, compact): nothing is deleted before the new store is
complete and verified.

1. Finish or clean up what an interrupted run left (`swap.recover_missing`, `swap.cleanup`).
2. Lock the log (`RunLock(path, what="log tool")`): a live training run's lock refuses it; so
   does a live reader's mark (an offline Copilot job reading it, tcp.runtime.read_marks).
3. Read the per-entry facts, let the caller choose the entries and options, check free space.
4. Write the new store beside the log (`<PATH>.tcp-compact/`), verify it (every
   chunk decoded, digests, counts; for a plain compact the manifests' digests must equal the
   original's; a shard copied file by file is checked byte by byte instead: each file's
   CRC32C as read, its copy read back equal, and the re-encoded open chunk), give it the lock
   file (a hard link), fsync all of it, then swap it in and remove the old one.

Any failure before the swap removes the partial copy and leaves the original untouched; a full
disk says so. Fault points (`TCP_FAULT_INJECT=kill@compact=N`): 1 after the first block is
committed to the copy, 2 after verification before the swap, 3 between the fallback's two
renames (swap.py), 4 after the swap before the old store is removed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr

from tcp.config import ZarrStoreConfig
from tcp.log_tools import swap
from tcp.log_tools.checks import damaged, require_log
from tcp.log_tools.errors import LogToolError, disk_full, human_bytes
from tcp.log_tools.paths import TEMP_TAG, temp_path
from tcp.log_tools.rewrite import OutShard, write_log
from tcp.log_tools.tables import READ_ERRORS, LogTables, load_tables
from tcp.mistake_log.format import Manifest, fsync_all
from tcp.mistake_log.maintenance import verify
from tcp.runtime.faults import fault_point
from tcp.runtime.read_marks import READERS, refuse_if_read
from tcp.runtime.run_lock import LOCK_NAME, RunLock

Build = Callable[[LogTables], tuple[list[OutShard], ZarrStoreConfig, dict[str, Any]]]
"""tables -> (new shards, store options, the history record of the operation)."""


@dataclass
class Outcome:
    """What a rewrite did."""

    path: Path
    entries_before: int
    entries_after: int
    stored_before: int
    stored_after: int
    record: dict[str, Any]


def now() -> str:
    """UTC time for history records."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def rewrite_in_place(path: Path | str, build: Build, *, say: Callable[[str], None],
                     mistakes: bool = False, same_digests: bool = False) -> Outcome:
    """Replace the log at `path` by the store `build` describes (see the module docstring).
    `same_digests`: every new shard must hold exactly its original's rows (plain compact)."""
    path = Path(os.path.realpath(path))  # a symlinked log: swap its target, not the link
    lock = swap.recover_missing(path, say)
    if lock is None:
        require_log(path)
        lock = RunLock(path, what="log tool").acquire()
        if lock.took_over is not None:
            say(f"took over the stale lock on {path} ({lock.took_over.describe()})")
    lock.start_heartbeat()  # a run on another host must not judge a long rewrite's lock stale
    try:
        refuse_if_read(path, what_to_do="wait until it finishes (a swapped-in log would change "
                                        "its entries under it); nothing was changed")
        swap.cleanup(path, say)
        tables = load_tables(path, mistakes=mistakes)
        shards, cfg, record = build(tables)
        before = sum(s.manifest.stored_bytes for s in tables.shards)
        need = _estimate(tables, shards)
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise LogToolError(f"{path.parent} has {human_bytes(free)} free; the new store "
                               f"needs about {human_bytes(need)} beside the original until the "
                               "swap; free some space (nothing was changed)")
        tmp = temp_path(path)
        manifests = _build_verified(path, tmp, tables, shards, cfg, record, lock,
                                    same_digests=same_digests)
        fault_point("compact", step=2, rank=0)
        try:
            old = swap.swap_in(path, tmp)
            fault_point("compact", step=4, rank=0)
            swap.finish(path, old)
        except OSError as e:  # the verified copy is kept; a rerun finishes or cleans up
            raise LogToolError(f"swapping {tmp} in for {path} failed ({e}); rerun "
                               f"`tcp-log compact {path}` to finish or clean up") from e
    finally:
        lock.release()
    return Outcome(path, tables.entries, sum(m.entries for m in manifests), before,
                   sum(m.stored_bytes for m in manifests), record)


def _estimate(tables: LogTables, shards: list[OutShard]) -> float:
    """Stored bytes of the new store, at the original's stored/raw ratio."""
    ratio = {s.rank: s.ratio for s in tables.shards}
    return sum(float(p.raw.sum()) * ratio.get(p.rank, 1.0) for s in shards for p in s.parts)


def _build_verified(path: Path, tmp: Path, tables: LogTables, shards: list[OutShard],
                    cfg: ZarrStoreConfig, record: dict[str, Any], lock: RunLock, *,
                    same_digests: bool) -> list[Manifest]:
    """Write, fsync and verify the new store at `tmp`, ready to swap; removes it on failure."""
    tmp.mkdir()
    (tmp / TEMP_TAG).touch()
    try:
        history = [*tables.attrs.get("history", []), record]
        written = write_log(tmp, shards, schema=tables.schema, cfg=unsynced(cfg),
                            attrs={**tables.attrs, "history": history}, desc=record["op"])
        manifests = written.manifests
        record["stored_bytes_after"] = sum(m.stored_bytes for m in manifests)
        zarr.open_group(tmp, mode="r+", zarr_format=3).attrs.update({"history": history})
        _check(tmp, tables, shards, manifests, same_digests,
               decode=len(written.byte_checked) < len(shards))
        _carry_other_files(path, tmp)
        try:  # the new store arrives locked by us (the same lock file, so release finds it)
            os.link(lock.path, tmp / LOCK_NAME)
        except OSError:  # a filesystem without hard links: the same owner record
            shutil.copy2(lock.path, tmp / LOCK_NAME)
        (tmp / TEMP_TAG).unlink()
        fsync_tree(tmp)
        return manifests
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise LogToolError(f"disk full while writing {tmp}; removed that partial copy, "
                               f"{path} is unchanged (the copy needs about "
                               f"{human_bytes(_estimate(tables, shards))} free beside it)") \
                from e
        if isinstance(e, READ_ERRORS):
            raise damaged(path, e) from e
        raise


def _check(tmp: Path, tables: LogTables, shards: list[OutShard], manifests: list[Manifest],
           same_digests: bool, decode: bool) -> None:
    """Verify the new store: manifests, counts and metadata always; every chunk decoded and
    the digests recomputed unless every shard was copied with each byte checked (`decode`
    False), whose digests are then the original's."""
    rep = verify(tmp, full=decode)
    problems = [f"rank {r.rank}: {e}" for r in rep.ranks for e in r.errors]
    found = {r.rank: r.entries for r in rep.ranks}
    for shard in shards:
        if found.get(shard.rank) != shard.entries:
            problems.append(f"rank {shard.rank}: {found.get(shard.rank)} entries written, "
                            f"{shard.entries} planned")
    if same_digests:
        for old, new in zip(tables.shards, manifests, strict=True):
            if old.manifest.digests != new.digests:
                problems.append(f"rank {old.rank}: the copy's digests differ from the "
                                "original's")
    if problems:
        raise LogToolError(f"the new store {tmp} failed verification ({'; '.join(problems)}); "
                           "it was removed and the original is unchanged")


_STORE_ENTRY = re.compile(rf"^(zarr\.json|rank\d+|\.tcp\.lock.*|{re.escape(READERS)})$")


def _carry_other_files(path: Path, tmp: Path) -> None:
    """Copy anything besides the store itself (notes a user left in the folder)."""
    for p in path.iterdir():
        if _STORE_ENTRY.match(p.name):
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name, symlinks=True)
        else:
            shutil.copy2(p, tmp / p.name, follow_symlinks=False)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder (concurrently): the copy is written
    without per-commit fsyncs and made durable here, once, before it can replace anything."""
    files, dirs = [], []
    for dirpath, _, names in os.walk(root):
        dirs.append(Path(dirpath))
        files += [Path(dirpath) / f for f in names]
    fsync_all(files, dirs)  # concurrently (798 files: 0.1 s, 2.3 s one at a time)


def unsynced(cfg: ZarrStoreConfig) -> ZarrStoreConfig:
    """`cfg` without per-commit fsyncs (`fsync_tree` seals the whole copy instead)."""
    return dataclasses.replace(cfg, fsync=False)
