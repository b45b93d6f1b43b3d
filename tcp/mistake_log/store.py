"""The on-disk Mistake Log: a Zarr v3 group per run, one sub-group (shard) per rank.

Layout (docs/mistake_log.md is the reader's guide)::

    <root>/zarr.json                 group; attrs: format, version, d_model, topk, state_dtype
    <root>/rank00000/zarr.json       one writer per rank shard (Zarr has no multi-writer chunks)
    <root>/rank00000/manifest.json   the commit record; written last, atomically
    <root>/rank00000/{h,labels,topk_ids,topk_probs,residual}   per target token, token-major
    <root>/rank00000/x_tilde                                   per prompt row
    <root>/rank00000/{step,sample_id,loss,x_start,x_len,y_start,y_len}   per entry

Commit protocol. Arrays only grow; their shapes are capacity (grown in large blocks), not
content. `manifest.json` says how many entries, target tokens and prompt rows are committed,
plus a CRC32 digest of each array's committed rows. A commit writes the new chunks (every chunk
write is an atomic rename; the open tail chunk is rewritten whole, never read-modify-written),
fsyncs them, then replaces the manifest (temp file, fsync, rename, fsync of the directory).
Readers never look past the manifest's counts, so a crash at any point leaves the previous commit
readable; whatever was written after it is an uncommitted tail that readers ignore and report.
Every chunk also carries a CRC32C (Zarr's crc32c codec), so a corrupt chunk fails its read.

Where the code is: `format.py` (layout names, schema, codecs, manifest, durable writes),
`shard_writer.py` (`RankStoreWriter`), `reader.py` (`RankStoreReader`); rewriting a whole log
(prune, compact, merge, export) is `tcp/log_tools/`. This module re-exports them, so
`from tcp.mistake_log.store import ...` keeps working.
"""

from tcp.mistake_log.format import (
    ALL_ARRAYS,
    ENTRY_ARRAYS,
    ENTRY_CHUNK_ROWS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROMPT_ARRAYS,
    STATE_ARRAYS,
    TOKEN_ARRAYS,
    Manifest,
    MistakeLogCorrupt,
    Schema,
    TrackingStore,
    atomic_write_json,
    batch_to_rows,
    chunk_rows,
    codec_description,
    codecs,
    create_root,
    fsync_path,
    gather_jobs,
    rank_group,
    ranks_in,
    state_tensor,
    write_unit,
)
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.shard_writer import RankStoreWriter

__all__ = [
    "ALL_ARRAYS", "ENTRY_ARRAYS", "ENTRY_CHUNK_ROWS", "FORMAT", "FORMAT_VERSION", "MANIFEST",
    "PROMPT_ARRAYS", "STATE_ARRAYS", "TOKEN_ARRAYS", "Manifest", "MistakeLogCorrupt",
    "RankStoreReader", "RankStoreWriter", "Schema", "TrackingStore", "atomic_write_json",
    "batch_to_rows", "chunk_rows", "codec_description", "codecs", "create_root", "fsync_path",
    "gather_jobs", "rank_group", "ranks_in", "state_tensor", "write_unit",
]
