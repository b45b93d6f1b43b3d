"""`ZarrMistakeLog`: the durable backend — an asynchronous writer and a streaming sampler over
one rank's shard of a Zarr v3 store, behind the `MistakeLog` interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.async_writer import AsyncWriter
from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.format import Schema
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.sampler import replay_sampler
from tcp.mistake_log.shard_writer import RankStoreWriter


class ZarrMistakeLog(MistakeLog):
    """Every entry goes to disk; replay batches are read back from it, and from the writer's
    memory, in stored form, for the few steps not committed yet (`view.py`)."""

    def __init__(self, root: Path | str, *, rank: int, schema: Schema, cfg: ZarrStoreConfig,
                 window_steps: int | None, replay_size: int, seed: int) -> None:
        self.root, self.rank, self.cfg = Path(root), rank, cfg
        self.writer = AsyncWriter(RankStoreWriter(root, rank, schema, cfg),
                                  queue_depth=cfg.queue_depth, on_full=cfg.on_full,
                                  commit_every=cfg.commit_every_steps)
        self.reader = RankStoreReader(root, rank, cache_mib=cfg.read_cache_mib)
        self.sampler = replay_sampler(
            self.reader, cfg, window_steps=window_steps, replay_size=replay_size, seed=seed,
            rank=rank, tail=lambda s: self.writer.uncommitted(s, timeout=cfg.wait_timeout_s),
            submitted=self.writer.submitted_through)
        self.truncated_entries = 0
        """Entries past the resumed checkpoint's cursor that `load_state_dict` forgot."""

    def append(self, batch: MistakeBatch) -> None:
        self.writer.submit(batch)

    def sample(self, *, step: int, num: int) -> MistakeBatch | None:
        if num != self.sampler.num:
            raise ValueError(f"this log replays {self.sampler.num} entries per step "
                             f"(mistake_log.replay_size), asked for {num}")
        return self.sampler.sample(step)

    def __len__(self) -> int:
        return self.writer.metrics.committed_entries

    def metrics(self) -> dict[str, float]:
        """Writer counters plus the sampler's wait time (for MLflow and results.json)."""
        m = self.writer.metrics.as_dict()
        m["sampler_wait_s"] = self.sampler.wait_s
        return m

    def state_dict(self) -> dict[str, Any]:
        """Flushes first: the recorded commit cursor covers every entry appended so far."""
        self.writer.flush()
        man = self.writer.store.manifest
        return {"backend": "zarr", "root": str(self.root), "sampler": self.sampler.state_dict(),
                "committed": man.to_json()}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Everything `load_state_dict` checks (backend, sampler configuration, the cursor
        against this shard), with no write."""
        if state.get("backend") != "zarr":
            raise ValueError("trainer state holds a non-zarr Mistake Log; resume with the "
                             "run's original mistake_log.backend")
        self.sampler.check_state(state["sampler"])
        self.writer.store.check_cursor(state["committed"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: truncate the shard to the saved commit cursor, then restore the sampler.
        Checks first (`check_state_dict`), so a state that does not fit changes nothing."""
        self.check_state_dict(state)
        self.truncated_entries = self.writer.rollback(state["committed"])
        self.reader.reset()
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        self.sampler.close()
        self.writer.close()
