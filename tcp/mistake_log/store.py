"""The on-disk Mistake Log's public names in one place: a Zarr v3 group per run, one shard per
rank. The layout and the commit protocol are described in `format.py`.

Where the code is: `format.py` (layout names, schema, codecs, manifest, durable writes),
`rows.py` (entries <-> stored rows), `shard_writer.py` (`RankStoreWriter`), `reader.py`
(`RankStoreReader`); rewriting a whole log (prune, compact, merge, export) is
`tcp/log_tools/`. This module re-exports them, so `from tcp.mistake_log.store import ...`
keeps working.
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
    chunk_rows,
    codec_description,
    codecs,
    create_root,
    fsync_path,
    gather_jobs,
    rank_group,
    ranks_in,
    write_unit,
)
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.rows import batch_to_rows, rows_to_batch, state_tensor, stored_form
from tcp.mistake_log.shard_writer import RankStoreWriter

__all__ = [
    "ALL_ARRAYS", "ENTRY_ARRAYS", "ENTRY_CHUNK_ROWS", "FORMAT", "FORMAT_VERSION", "MANIFEST",
    "PROMPT_ARRAYS", "STATE_ARRAYS", "TOKEN_ARRAYS", "Manifest", "MistakeLogCorrupt",
    "RankStoreReader", "RankStoreWriter", "Schema", "TrackingStore", "atomic_write_json",
    "batch_to_rows", "chunk_rows", "codec_description", "codecs", "create_root", "fsync_path",
    "gather_jobs", "rank_group", "ranks_in", "rows_to_batch", "state_tensor", "stored_form",
    "write_unit",
]
