"""`tcp-log compact`: rewrite a log into a fresh store (reclaiming space left by rewritten tail
chunks and capacity, rechunking, changing codecs, or merging all ranks into one shard), verify,
swap it in (replace.py). With the log's own options each shard is copied file by file
(`RankStoreWriter.copy_from`, via rewrite.write_log). Compacting a compacted log gives the same
entries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tcp.config import ZarrStoreConfig
from tcp.log_tools.replace import Outcome, now, rewrite_in_place
from tcp.log_tools.rewrite import OutShard, config_from_codec, part_of
from tcp.log_tools.tables import LogTables


@dataclass(frozen=True)
class CompactOptions:
    """Store options to change (None = keep the log's own)."""

    chunk_mib: float | None = None
    compressor: str | None = None
    level: int | None = None
    shard_chunks: int | None = None
    merge_ranks: bool = False
    """Put every rank's entries into one shard (rank 0), ordered by step (a stable merge:
    within a step, rank order then original order). The entries' origin rank is not kept."""

    def store_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "merge_ranks"}


def compact(path: Path | str, opts: CompactOptions, *, say: Callable[[str], None]) -> Outcome:
    """Rewrite the log at `path` with `opts`; see replace.rewrite_in_place."""

    def build(tables: LogTables) -> tuple[list[OutShard], ZarrStoreConfig, dict[str, Any]]:
        cfg = config_from_codec(tables.shards[0].manifest.codec, **opts.store_overrides())
        if opts.merge_ranks:
            shards = [OutShard(0, tuple(part_of(tables, s) for s in tables.shards),
                               sum(s.manifest.dropped_entries for s in tables.shards))]
        else:
            shards = [OutShard(s.rank, (part_of(tables, s),), s.manifest.dropped_entries)
                      for s in tables.shards]
        record = {"op": "compact", "time": now(),
                  "options": {k: v for k, v in asdict(opts).items()
                              if v is not None and v is not False},
                  "entries_before": tables.entries, "entries_after": tables.entries,
                  "stored_bytes_before": sum(s.manifest.stored_bytes for s in tables.shards)}
        if opts.merge_ranks:
            record["merged_ranks"] = [s.rank for s in tables.shards]
        return shards, cfg, record

    return rewrite_in_place(path, build, say=say, same_digests=not opts.merge_ranks)
