"""`LogView`: one rank's Mistake Log as the replay sampler sees it at one draw: the committed
entries, read from the store, followed by the writer's uncommitted ones, read from memory in
exactly the form the store will return them (`rows.stored_form`). Entry indices and step
ranges run across both, so a draw does not depend on what happened to be committed."""

from __future__ import annotations

import numpy as np

from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.staging import Uncommitted


class LogView:
    """`reader`'s committed entries, then `tail`'s (None: a log read offline, committed
    entries only), for a draw that needs steps up to `through_step`."""

    def __init__(self, reader: RankStoreReader, tail: Uncommitted | None,
                 through_step: int) -> None:
        self.reader, self.tail = reader, tail
        m = reader.manifest
        # Offline: refresh if the steps are not there yet. With a snapshot: its commits were
        # on disk before it was taken, so refresh only to see them.
        behind = (m.last_step is None or m.last_step < through_step) if tail is None else \
            m.entries < tail.entries
        if behind:
            reader.refresh()
        self.committed = reader.manifest.entries if tail is None else tail.entries

    def first_entry_at_or_after(self, step: int) -> int:
        """Index of the first entry with entry.step >= step."""
        t = self.tail
        if t is None or (t.last_step is not None and step <= t.last_step):
            return min(self.reader.first_entry_at_or_after(step), self.committed)
        return self.committed + t.count_before(step)

    def entry_range(self, lo_step: int, hi_step: int) -> tuple[int, int]:
        """Entries with lo_step <= step < hi_step, as [first, last)."""
        return self.first_entry_at_or_after(lo_step), self.first_entry_at_or_after(hi_step)

    def read(self, idx: np.ndarray) -> MistakeBatch:
        """The entries with these sorted indices, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        on_disk, in_ram = idx[idx < self.committed], idx[idx >= self.committed]
        parts = []
        if on_disk.size or not in_ram.size:
            parts.append(self.reader.read(on_disk))
        if in_ram.size:
            assert self.tail is not None, "index past the committed entries"
            parts.append(self.tail.read((in_ram - self.committed).tolist()))
        return parts[0] if len(parts) == 1 else MistakeBatch.cat(parts, device="cpu")
