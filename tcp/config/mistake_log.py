"""`mistake_log` and `mistake_log.store`: the Mistake Log (docs/method.md §3) and its on-disk
Zarr v3 store, writer and replay sampler (docs/mistake_log.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tcp.config.schema import _check


@dataclass
class ZarrStoreConfig:
    """The on-disk Zarr v3 store of the Mistake Log (docs/mistake_log.md)."""

    path: str | None = None
    """Store directory; None = `<output_dir>/mistake_log`. One sub-group per rank."""
    compressor: Literal["zstd", "blosc", "none"] = "zstd"
    """Chunk compressor: zstd, blosc (zstd inside, byte-shuffle per `shuffle`) or none."""
    level: int = 3
    """Compression level (zstd: 1-22, blosc: 0-9)."""
    shuffle: bool = True
    """Blosc byte-shuffle (groups the bytes of each float; better ratios). Blosc only."""
    lossy_keepbits: int | None = None
    """If set, round the mantissa of the float32/float16 states (X~, h) to this many bits
    before compressing (numcodecs BitRound; relative error <= 2^-(keepbits+1)). None = lossless.
    Not available for bfloat16 storage."""
    chunk_mib: float = 1.0
    """Target uncompressed size of one chunk of the per-token/per-prompt-row arrays (at least
    64 rows). Small chunks make replay reads cheap (a sampled entry decodes its chunk) and the
    per-commit rewrite of the open chunk small; large ones compress slightly better."""
    shard_chunks: int = 0
    """If > 0, pack this many chunks into one shard file (Zarr sharding codec) to bound the file
    count. Each commit rewrites the open shard, so keep it small (e.g. 8-32)."""
    checksum: bool = True
    """Append a CRC32C to every chunk (Zarr's crc32c codec): corruption fails the read."""
    fsync: bool = True
    """fsync chunks and the manifest at every commit (durable across power loss, not only across
    a killed process)."""
    commit_every_steps: int = 8
    """The writer commits (writes the open chunks, fsyncs, publishes the manifest) once this
    many steps are appended, at every checkpoint and at the end of the run. Steps not yet
    committed are replayed from the writer's memory, exactly as they will read back, so
    replay never waits on a commit. A commit rewrites each array's open chunk, so committing
    every step costs ~4x the writer CPU of every 8 (docs/benchmarks.md). A crash loses at most
    this many steps of log beyond the last commit; a resume rolls back to its checkpoint's
    commit anyway."""
    queue_depth: int = 8
    """Steps of entries the asynchronous writer may hold before `on_full` applies."""
    on_full: Literal["block", "drop"] = "block"
    """When the writer's queue is full: block the trainer (default), or drop the step's entries
    (counted, warned and reported; breaks exact replay)."""
    replay_lag_steps: int = 0
    """The sampler at step t replays steps [t - lag - window, t - lag). 0 (default) is the
    method's window [t - window, t): the previous step is eligible, as in the memory backend.
    A lag of L > 0 leaves out the newest L steps. Steps not committed yet are read from the
    writer's memory (`commit_every_steps`), so no lag is needed for a slow filesystem."""
    read_cache_mib: float = 256.0
    """Decoded chunks the sampler keeps (LRU, sealed chunks only): replaying a window then
    re-reads little. Bounds the reader's memory whatever the log's size."""
    prefetch: int = 2
    """Replay batches the sampler reads ahead in a background thread (bounds its memory)."""
    recency_half_life: float | None = None
    """If set, replayed steps are drawn with weight 2^(-age / half_life) instead of uniformly."""
    wait_timeout_s: float = 600.0
    """Fail (naming the step) if a step the sampler needs is not submitted within this many
    seconds."""

    def __post_init__(self) -> None:
        _check(self.chunk_mib > 0, "chunk_mib", "must be > 0")
        _check(self.shard_chunks >= 0, "shard_chunks", "must be >= 0 (0 = no sharding)")
        _check(self.queue_depth >= 1, "queue_depth", "must be >= 1")
        _check(self.commit_every_steps >= 1, "commit_every_steps", "must be >= 1")
        _check(self.replay_lag_steps >= 0, "replay_lag_steps", "must be >= 0")
        _check(self.prefetch >= 0, "prefetch", "must be >= 0")
        _check(self.read_cache_mib >= 0, "read_cache_mib", "must be >= 0")
        _check(self.wait_timeout_s > 0, "wait_timeout_s", "must be > 0")
        _check(self.recency_half_life is None or self.recency_half_life > 0,
               "recency_half_life", "must be > 0 or null")
        _check(self.lossy_keepbits is None or 0 <= self.lossy_keepbits <= 23, "lossy_keepbits",
               "must be between 0 and 23 (float32 mantissa bits) or null")
        levels = {"zstd": range(-7, 23), "blosc": range(0, 10), "none": range(-100, 100)}
        _check(self.level in levels[self.compressor], "level",
               f"{self.level} is not a valid {self.compressor} level")


@dataclass
class MistakeLogConfig:
    """The Mistake Log (docs/method.md §3)."""

    backend: Literal["zarr", "memory"] = "zarr"
    """'zarr': every entry is written asynchronously to a durable Zarr v3 store and replayed by
    a streaming sampler (`store` options). 'memory': the paper's RAM buffer of the recent window
    only (tests, tiny runs; nothing is kept)."""
    topk: int = 16
    """k of the sparse error ell_i ~ onehot(y_i) - topk(p_hat_i); k = V makes it exact."""
    window_steps: int | Literal["all"] = 128
    """Replay window: entries from the most recent N Pilot steps are eligible (paper: 128);
    'all' replays the whole log (zarr backend only)."""
    replay_size: int = 32
    """Entries replayed from the window per Copilot step (besides the current step's)."""
    include_current: bool = True
    """Also train the Copilot on the current step's entries, straight from memory."""
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of X~ and pooled h in the log."""
    store: ZarrStoreConfig = field(default_factory=ZarrStoreConfig)
    """On-disk store, writer and sampler options (backend 'zarr')."""

    def __post_init__(self) -> None:
        _check(self.topk >= 1, "topk", f"must be >= 1 (got {self.topk})")
        _check(self.window_steps == "all" or self.window_steps >= 1, "window_steps",
               "must be >= 1 or 'all'")
        _check(self.window_steps != "all" or self.backend == "zarr", "window_steps",
               "'all' needs backend: zarr (the memory backend keeps only a window)")
        _check(self.replay_size >= 0, "replay_size", "must be >= 0")
        _check(
            self.include_current or self.replay_size > 0,
            "replay_size",
            "must be > 0 when include_current is false, or the Copilot never trains",
        )
        _check(self.store.lossy_keepbits is None or self.storage_dtype != "bfloat16",
               "store.lossy_keepbits", "bit rounding has no bfloat16 variant; store float16 or "
               "float32 states, or set it to null")
        _check(self.store.lossy_keepbits is None or self.storage_dtype != "float16"
               or self.store.lossy_keepbits <= 10, "store.lossy_keepbits",
               "float16 has 10 mantissa bits; use <= 10")
