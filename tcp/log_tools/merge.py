"""`tcp-log merge OUT SRC...`: combine the logs of several runs of one Pilot family (same
d_model, topk and state dtype) into a new store, one shard per (source, rank), in the order
given. The root attrs record the mapping (`merged_from`) and the operation (`history`).

`OUT` must not exist or be empty (or hold only a partial merge an interrupted run left, which
is removed). The sources are locked too, so no training run can start on them meanwhile, and
are only read. A failure removes what was written to `OUT`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tcp.log_tools.checks import require_log
from tcp.log_tools.compact import CompactOptions
from tcp.log_tools.errors import LogToolError, UsageError, disk_full, human_bytes
from tcp.log_tools.paths import TEMP_TAG
from tcp.log_tools.replace import fsync_tree, now, unsynced
from tcp.log_tools.rewrite import OutShard, config_from_codec, part_of, write_log
from tcp.log_tools.tables import READ_ERRORS, LogTables, load_tables
from tcp.mistake_log.maintenance import verify
from tcp.runtime.run_lock import LOCK_NAME, RunLock


@dataclass
class MergeResult:
    out: Path
    entries: int
    shards: int
    stored_bytes: int


def check_family(tables: list[LogTables]) -> None:
    """Every source holds the same schema as the first; else one error naming the mismatch."""
    ref = tables[0]
    for t in tables[1:]:
        diff = [f"{k} {getattr(t.schema, k)} (vs {getattr(ref.schema, k)})"
                for k in ("d_model", "topk", "state_dtype")
                if getattr(t.schema, k) != getattr(ref.schema, k)]
        if diff:
            raise LogToolError(f"cannot merge {t.root} with {ref.root}: it has "
                               f"{', '.join(diff)}; merge only logs of one Pilot family")


def _check_out(out: Path, sources: list[Path]) -> None:
    if len(set(sources)) != len(sources):
        raise UsageError("a source log is given twice")
    for s in sources:
        if out == s or s in out.parents or out in s.parents:
            raise UsageError(f"OUT {out} overlaps the source {s}; choose a new folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT {out} is a file; merge writes a new store (a folder)")
    if out.exists() and not (out / TEMP_TAG).exists() and any(
            p.name != LOCK_NAME for p in out.iterdir()):
        raise UsageError(f"OUT {out} exists and is not empty; merge writes a new store")


def merge(out: Path | str, sources: list[Path | str], opts: CompactOptions, *,
          say: Callable[[str], None]) -> MergeResult:
    """Merge `sources` into the new store `out`, verify it; see the module docstring."""
    out = Path(os.path.realpath(out))  # a symlinked folder: act on its target
    srcs = [require_log(Path(os.path.realpath(s))) for s in sources]
    _check_out(out, srcs)
    locks: list[RunLock] = []
    created = not out.exists()
    try:
        for folder in [*srcs, out]:  # heartbeats: another host must not judge them stale
            locks.append(RunLock(folder, what="log tool").acquire().start_heartbeat())
        return _merge_locked(out, srcs, opts, say)
    finally:
        for lock in reversed(locks):
            lock.release()
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()  # a failed merge leaves no empty OUT behind


def _merge_locked(out: Path, srcs: list[Path], opts: CompactOptions,
                  say: Callable[[str], None]) -> MergeResult:
    if (out / TEMP_TAG).exists():
        _clear(out)
        say(f"removed a partial merge an interrupted run left in {out}")
    tables = [load_tables(s) for s in srcs]
    check_family(tables)
    shards: list[OutShard] = []
    mapping: list[dict[str, object]] = []
    for t in tables:
        for s in t.shards:
            j = len(shards)
            shards.append(OutShard(j, (part_of(t, s),), s.manifest.dropped_entries))
            mapping.append({"shard": j, "source": str(t.root), "rank": s.rank,
                            "entries": int(s.step.size)})
    cfg = config_from_codec(tables[0].shards[0].manifest.codec, **opts.store_overrides())
    entries = sum(t.entries for t in tables)
    need = sum(s.estimated() for t in tables for s in t.shards)
    free = shutil.disk_usage(out).free
    if need > free:
        raise LogToolError(f"{out} has {human_bytes(free)} free; the merged store needs "
                           f"about {human_bytes(need)}; nothing was written")
    attrs = {**tables[0].schema.attrs(), "merged_from": mapping,
             "history": [{"op": "merge", "time": now(), "sources": [str(s) for s in srcs],
                          "entries_before": entries, "entries_after": entries}]}
    (out / TEMP_TAG).touch()
    try:
        written = write_log(out, shards, schema=tables[0].schema, cfg=unsynced(cfg), attrs=attrs,
                            desc="merge")
        manifests = written.manifests
        rep = verify(out, full=len(written.byte_checked) < len(shards))
        bad = [f"shard {r.rank}: {e}" for r in rep.ranks for e in r.errors]
        bad += [f"shard {s.rank}: {m.entries} entries, {s.entries} expected"
                for s, m in zip(shards, manifests, strict=True) if m.entries != s.entries]
        if bad:
            raise LogToolError(f"the merged store failed verification ({'; '.join(bad)}); "
                               "removed it")
        (out / TEMP_TAG).unlink()
        fsync_tree(out)
    except BaseException as e:
        _clear(out)
        if disk_full(e):
            raise LogToolError(f"disk full while writing {out}; removed the partial merge "
                               f"(it needs about {human_bytes(need)})") from e
        if isinstance(e, READ_ERRORS):
            raise LogToolError(f"a source failed to read ({type(e).__name__}: {e}); removed "
                               f"the partial merge; run `tcp-log verify` on each source") from e
        raise
    return MergeResult(out, entries, len(shards), sum(m.stored_bytes for m in manifests))


def _clear(out: Path) -> None:
    """Remove everything in `out` but our lock file."""
    for p in out.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
