"""Asynchronous Mistake Log writer: the trainer hands over a step's entries and moves on.

`submit()` stages the entries off the device (pinned buffers on a side CUDA stream on GPUs; a
plain copy on CPU) and puts them on a bounded queue. A background thread drains the queue,
compresses and writes (Zarr's codecs run in native code that releases the GIL; measured in
tools/bench_mistake_log.py) and commits. When the queue is full the trainer blocks (default)
or the step is dropped, counted and reported. An exception in the worker is re-raised by the
next call. `close()` flushes and commits.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.store import Manifest, RankStoreWriter


class MistakeLogWriteError(RuntimeError):
    """The background writer failed; the log is intact up to its last commit."""


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


@dataclass
class _Item:
    batch: MistakeBatch
    event: Any  # torch.cuda.Event or None
    t_submit: float
    last_step: int


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


class AsyncWriter:
    """Background writer of one rank's shard. Usable as a context manager."""

    def __init__(self, store: RankStoreWriter, *, queue_depth: int = 8,
                 on_full: str = "block", max_latencies: int = 10_000) -> None:
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        self.store, self.on_full = store, on_full
        self.metrics = WriterMetrics()
        self.metrics.committed_entries = store.manifest.entries
        self.metrics.raw_bytes = store.manifest.raw_bytes
        self.metrics.stored_bytes = store.manifest.stored_bytes
        self._max_lat = max_latencies
        self._q: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_depth)
        self._stager = Stager()
        self._cond = threading.Condition()
        self._pending: collections.deque[int] = collections.deque()  # steps queued, in order
        self._last_submitted: int | None = store.manifest.last_step
        self._error: BaseException | None = None
        self._closed = False
        self._drop_warned = 0
        self._thread = threading.Thread(target=self._run, name=f"tcp-mlog-writer-r{store.rank}",
                                        daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- trainer side
    def submit(self, batch: MistakeBatch) -> bool:
        """Hand over entries (one step's, steps increasing). Returns False if dropped."""
        self._raise_if_failed()
        if self._closed:
            raise MistakeLogWriteError("submit() after close()")
        if batch.num_entries == 0:
            return True
        self.store.check(batch, after=self._last_submitted)  # bad input fails here, not later
        t0 = time.perf_counter()
        staged, ev = self._stager.stage(batch)
        t1 = time.perf_counter()
        self.metrics.stage_s += t1 - t0
        step = int(batch.step.max())
        item = _Item(staged, ev, t1, step)
        with self._cond:
            self._last_submitted = step
            self._pending.append(step)
        try:
            if self.on_full == "drop":
                self._q.put_nowait(item)
            else:
                while True:  # block, but wake to notice a dead worker
                    try:
                        self._q.put(item, timeout=1.0)
                        break
                    except queue.Full:
                        self._raise_if_failed()
        except queue.Full:
            with self._cond:
                self._pending.remove(step)
                self._cond.notify_all()
            self.metrics.dropped_entries += batch.num_entries
            self.store.note_dropped(batch.num_entries)
            if self.metrics.dropped_entries >= 2 * self._drop_warned:
                warnings.warn(f"Mistake Log writer (rank {self.store.rank}) is behind: "
                              f"{self.metrics.dropped_entries} entries dropped so far "
                              "(mistake_log.store.on_full=drop); raise queue_depth or use "
                              "'block'", RuntimeWarning, stacklevel=2)
                self._drop_warned = max(1, self.metrics.dropped_entries)
            return False
        finally:
            self.metrics.blocked_s += time.perf_counter() - t1
        self.metrics.submitted_entries += batch.num_entries
        depth = self._q.qsize()
        self.metrics.queue_depth = depth
        self.metrics.max_queue_depth = max(self.metrics.max_queue_depth, depth)
        return True

    def wait_committed(self, step: int, timeout: float | None = None) -> None:
        """Block until every entry of steps <= `step` is committed (or was dropped), and the
        trainer has submitted through `step`. Raises on worker failure or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._done_through(step):
                if self._error is not None:
                    break
                if self._closed and not self._thread.is_alive():
                    raise MistakeLogWriteError(f"writer closed before step {step} was submitted")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"rank {self.store.rank}: step {step} of the Mistake Log not committed "
                        f"after {timeout:.0f}s (last submitted {self._last_submitted}); raise "
                        "mistake_log.store.wait_timeout_s or replay_lag_steps")
                self._cond.wait(timeout=1.0 if left is None else min(left, 1.0))
        self._raise_if_failed()

    def rollback(self, cursor: dict[str, Any]) -> int:
        """Truncate the shard to a checkpoint's commit cursor (`RankStoreWriter.rollback`).
        Only before the first submit of a resumed run. Returns the entries forgotten."""
        with self._cond:
            if self._pending or not self._q.empty():
                raise RuntimeError("rollback() while entries are queued")
            dropped = self.store.rollback(cursor)
            self._last_submitted = self.store.manifest.last_step
        m = self.store.manifest
        self.metrics.committed_entries = m.entries
        self.metrics.raw_bytes, self.metrics.stored_bytes = m.raw_bytes, m.stored_bytes
        return dropped

    def submitted_through(self, step: int) -> bool:
        """Whether the trainer has handed over step `step` (or a later one)."""
        with self._cond:
            return self._last_submitted is not None and self._last_submitted >= step

    def committed_through(self, step: int) -> bool:
        """Non-blocking form of `wait_committed`."""
        with self._cond:
            return self._done_through(step)

    def _done_through(self, step: int) -> bool:
        submitted = self._last_submitted is not None and self._last_submitted >= step
        return submitted and (not self._pending or self._pending[0] > step)

    def flush(self) -> None:
        """Wait until everything submitted is committed."""
        self._raise_if_failed()
        if not self._closed:
            self._q.join()
        self._raise_if_failed()

    def close(self) -> Manifest:
        """Flush, commit and stop the worker. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._thread.is_alive():
                self._q.put(None)
                self._thread.join()
            with self._cond:
                self._cond.notify_all()
        self._raise_if_failed()
        return self.store.manifest

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:  # do not mask the original error
            try:
                self.close()
            except MistakeLogWriteError:
                pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise MistakeLogWriteError(
                f"Mistake Log writer (rank {self.store.rank}) failed: {self._error!r}; entries "
                f"up to the last commit ({self.store.manifest.entries}) are intact"
            ) from self._error

    # -------------------------------------------------------------- worker side
    def _run(self) -> None:
        while True:
            item = self._q.get()
            items = [item]
            while item is not None:  # coalesce whatever else is waiting: one commit for all
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
            stop = items[-1] is None
            work = [i for i in items if i is not None]
            try:
                if self._error is None and work:
                    self._write(work)
            except BaseException as e:  # surfaced on the trainer's next call
                self._error = e
            finally:
                with self._cond:
                    for it in work:
                        if self._pending and self._pending[0] == it.last_step:
                            self._pending.popleft()
                    self._cond.notify_all()
                for _ in items:
                    self._q.task_done()
            if stop:
                return

    def _write(self, work: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            for it in work:
                if it.event is not None:
                    it.event.synchronize()
                self.store.append(it.batch)
        finally:  # what was appended before a failure still gets committed
            m = self.store.commit()
        now = time.perf_counter()
        mt = self.metrics
        mt.write_s += now - t0
        mt.commits += 1
        mt.committed_entries = m.entries
        mt.raw_bytes, mt.stored_bytes = m.raw_bytes, m.stored_bytes
        mt.queue_depth = self._q.qsize()
        lat = mt.latencies_s
        lat.extend(now - it.t_submit for it in work)
        if len(lat) > self._max_lat:
            del lat[: len(lat) - self._max_lat]
