"""What the asynchronous writer holds between `submit()` and a commit: device -> host staging
(`Stager`), the queued steps (`QueuedStep`), the consistent snapshot of the steps not committed
yet that the replay sampler reads (`Uncommitted`), and the writer's counters (`WriterMetrics`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from tcp.mistake_log.record import MistakeBatch


@dataclass
class WriterMetrics:
    """Counters of one writer (this rank)."""

    submitted_entries: int = 0
    committed_entries: int = 0
    dropped_entries: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    queue_depth: int = 0
    max_queue_depth: int = 0
    blocked_s: float = 0.0
    """Time `submit()` spent waiting for room in the queue (backpressure on the trainer)."""
    stage_s: float = 0.0
    """Time `submit()` spent staging (device-to-host copies are only enqueued on CUDA)."""
    write_s: float = 0.0
    """Worker time spent appending, compressing, writing and committing."""
    commits: int = 0
    latencies_s: list[float] = field(default_factory=list)
    """Submit-to-commit latency of recent steps (bounded)."""

    def as_dict(self) -> dict[str, float]:
        out = {f.name: float(getattr(self, f.name)) for f in fields(self)
               if f.name != "latencies_s"}
        lat = sorted(self.latencies_s)
        if lat:
            out["latency_p50_s"] = lat[len(lat) // 2]
            out["latency_p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return out


@dataclass(eq=False)  # compared by identity
class QueuedStep:
    batch: MistakeBatch
    event: Any  # torch.cuda.Event or None
    t_submit: float
    first_step: int
    last_step: int
    entries: int
    stored: MistakeBatch | None = None
    """`batch` as a reader reads it back (made on first use by `Uncommitted.read`)."""

    def host_batch(self) -> MistakeBatch:
        """The staged batch, once its device-to-host copy has finished."""
        if self.event is not None:
            self.event.synchronize()
        return self.batch


@dataclass
class Uncommitted:
    """A consistent snapshot of one writer: `entries` committed entries (through step
    `last_step`) and, after them in log order, the `items` submitted but not committed yet."""

    entries: int
    last_step: int | None
    items: list[QueuedStep]
    to_stored: Callable[[MistakeBatch], MistakeBatch]
    """MistakeBatch -> the same entries as a reader reads them back (`stored_form`)."""

    def count_before(self, step: int) -> int:
        """Uncommitted entries with entry.step < `step` (steps never decrease)."""
        n = 0
        for it in self.items:
            if it.last_step < step:
                n += it.entries
            elif it.first_step >= step:
                break
            else:  # an item spanning several steps
                n += int((self.stored(it).step < step).sum())
                break
        return n

    def stored(self, it: QueuedStep) -> MistakeBatch:
        if it.stored is None:
            it.stored = self.to_stored(it.host_batch())
        return it.stored

    def read(self, idx: Any) -> MistakeBatch:
        """Uncommitted entries by index counted from the first uncommitted one (sorted)."""
        parts, base = [], 0
        for it in self.items:
            sel = [int(i) - base for i in idx if base <= i < base + it.entries]
            if sel:
                parts.append(self.stored(it).select(sel))
            base += it.entries
        return MistakeBatch.cat(parts, device="cpu")


class Stager:
    """Device -> host copies of a batch. CUDA: pinned buffers filled on a side stream, which
    first waits for the compute stream; the worker synchronises on the recorded event. CPU: a
    plain copy (the trainer may reuse its tensors)."""

    def __init__(self) -> None:
        self._stream = None

    def stage(self, batch: MistakeBatch) -> tuple[MistakeBatch, Any]:
        tensors = {f.name: getattr(batch, f.name) for f in fields(batch)}
        if not any(t.is_cuda for t in tensors.values()):
            return MistakeBatch(**{k: t.clone() for k, t in tensors.items()}), None
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        out = {}
        with torch.cuda.stream(self._stream):
            for k, t in tensors.items():
                if t.is_cuda:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host.copy_(t, non_blocking=True)
                    t.record_stream(self._stream)  # keep the source alive until copied
                    out[k] = host
                else:
                    out[k] = t.clone()
            ev = torch.cuda.Event()
            ev.record(self._stream)
        return MistakeBatch(**out), ev
