"""Asynchronous Mistake Log writer: the trainer hands over a step's entries and moves on.

`submit()` stages the entries off the device (pinned buffers on a side CUDA stream on GPUs; a
plain copy on CPU) and puts them on a bounded queue. A background thread drains the queue,
appends, and commits (compresses, writes, fsyncs, publishes the manifest) once
`commit_every` steps are appended, when `flush()` or `wait_committed()` asks, and at
`close()`. Zarr's codecs and ours run in native code that releases the GIL (measured in
tools/bench_mistake_log.py). When the queue is full the trainer blocks (default) or the step
is dropped, counted and reported. An exception in the worker is re-raised by the next call.

Entries submitted but not committed yet stay readable: `uncommitted()` hands the replay
sampler exactly the rows a reader will read back once they are committed (`stored_form`), so
replaying the previous step never waits for a commit, and the cost of a commit (rewriting each
array's open chunk, fsyncs) is paid once per `commit_every` steps.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from tcp.mistake_log.format import Manifest
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.rows import stored_form
from tcp.mistake_log.shard_writer import RankStoreWriter
from tcp.mistake_log.staging import QueuedStep, Stager, Uncommitted, WriterMetrics


class MistakeLogWriteError(RuntimeError):
    """The background writer failed; the log is intact up to its last commit."""


_COMMIT = object()
"""Queued by `flush()`/`wait_committed()`: commit whatever is appended now."""


class AsyncWriter:
    """Background writer of one rank's shard. Usable as a context manager."""

    def __init__(self, store: RankStoreWriter, *, queue_depth: int = 8,
                 on_full: str = "block", commit_every: int = 1,
                 max_latencies: int = 10_000) -> None:
        """`commit_every`: commit once this many submitted batches (steps) are appended, and
        on `flush`, `wait_committed` and `close`; 1 commits whatever the worker drains."""
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.store, self.on_full, self.commit_every = store, on_full, commit_every
        self.metrics = WriterMetrics()
        self.metrics.committed_entries = store.manifest.entries
        self.metrics.raw_bytes = store.manifest.raw_bytes
        self.metrics.stored_bytes = store.manifest.stored_bytes
        self._max_lat = max_latencies
        self._q: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
        self._stager = Stager()
        self._cond = threading.Condition()
        # Submitted, not yet committed, in order; committed counts as of the last commit.
        self._uncommitted: collections.deque[QueuedStep] = collections.deque()
        self._committed = (store.manifest.entries, store.manifest.last_step)
        self._appended: list[QueuedStep] = []  # worker only: appended since the last commit
        self._commit_asked = False
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
        # Bad input fails here, not later; (first, last) step, read from the device once.
        first, step = self.store.check(batch, after=self._last_submitted)
        t0 = time.perf_counter()
        staged, ev = self._stager.stage(batch)
        t1 = time.perf_counter()
        self.metrics.stage_s += t1 - t0
        item = QueuedStep(staged, ev, t1, first, step, batch.num_entries)
        with self._cond:
            self._last_submitted = step
            self._uncommitted.append(item)
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
                self._uncommitted.remove(item)
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
        trainer has submitted through `step`; asks the worker for the commit. Raises on worker
        failure or timeout."""
        def nudge() -> None:
            if self._uncommitted and self._uncommitted[0].last_step <= step:
                self._ask_commit()
            if self._closed and not self._thread.is_alive():
                raise MistakeLogWriteError(f"writer closed before step {step} was submitted")

        with self._cond:
            self._wait_until(
                lambda: self._done_through(step), timeout, nudge,
                lambda: f"rank {self.store.rank}: step {step} of the Mistake Log not committed "
                        f"after {timeout:.0f}s (last submitted {self._last_submitted}); raise "
                        "mistake_log.store.wait_timeout_s or replay_lag_steps")
        self._raise_if_failed()

    def uncommitted(self, step: int, timeout: float | None = None) -> Uncommitted:
        """What a replay of steps <= `step` reads: waits until the trainer has submitted
        through `step` (never for a commit), then snapshots the committed counts and the
        uncommitted entries after them. Raises on worker failure or timeout."""
        with self._cond:
            self._wait_until(
                lambda: self._submitted(step) or self._closed, timeout, None,
                lambda: f"rank {self.store.rank}: step {step} of the Mistake Log was not "
                        f"submitted after {timeout:.0f}s (last submitted {self._last_submitted})")
            entries, last = self._committed
            items = list(self._uncommitted)
        self._raise_if_failed()
        st = self.store
        return Uncommitted(entries, last, items, lambda b: stored_form(
            b, st.schema, st.rank, keepbits=st.cfg.lossy_keepbits))

    def _wait_until(self, done: Callable[[], bool], timeout: float | None,
                    each: Callable[[], None] | None, timed_out: Callable[[], str]) -> None:
        """With `_cond` held: wait until `done()` or the worker failed, calling `each()` before
        every wait; TimeoutError(timed_out()) after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done() and self._error is None:
            if each is not None:
                each()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(timed_out())
            self._cond.wait(timeout=1.0 if left is None else min(left, 1.0))

    def rollback(self, cursor: dict[str, Any]) -> int:
        """Truncate the shard to a checkpoint's commit cursor (`RankStoreWriter.rollback`).
        Only before the first submit of a resumed run. Returns the entries forgotten."""
        with self._cond:
            if self._uncommitted or not self._q.empty():
                raise RuntimeError("rollback() while entries are queued")
            dropped = self.store.rollback(cursor)
            self._last_submitted = self.store.manifest.last_step
            self._committed = (self.store.manifest.entries, self.store.manifest.last_step)
        m = self.store.manifest
        self.metrics.committed_entries = m.entries
        self.metrics.raw_bytes, self.metrics.stored_bytes = m.raw_bytes, m.stored_bytes
        return dropped

    def submitted_through(self, step: int) -> bool:
        """Whether the trainer has handed over step `step` (or a later one)."""
        with self._cond:
            return self._submitted(step)

    def committed_through(self, step: int) -> bool:
        """Non-blocking form of `wait_committed`."""
        with self._cond:
            return self._done_through(step)

    def _submitted(self, step: int) -> bool:
        return self._last_submitted is not None and self._last_submitted >= step

    def _done_through(self, step: int) -> bool:
        return self._submitted(step) and (not self._uncommitted or
                                          self._uncommitted[0].last_step > step)

    def _ask_commit(self) -> None:
        """Have the worker commit what it has appended (it may be waiting for more steps)."""
        if not self._commit_asked:
            self._commit_asked = True
            try:  # a full queue means a busy worker, which sees the flag after this batch
                self._q.put_nowait(_COMMIT)
            except queue.Full:
                pass

    def flush(self) -> None:
        """Wait until everything submitted is committed."""
        self._raise_if_failed()
        if not self._closed:
            self._q.put(_COMMIT)
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
            items = [self._q.get()]
            while items[-1] is not None:  # take whatever else is waiting, in one go
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            work = [i for i in items if isinstance(i, QueuedStep)]
            try:
                if self._error is None:
                    with self._cond:
                        asked, self._commit_asked = self._commit_asked, False
                    self._write(work, commit=stop or asked or any(i is _COMMIT for i in items))
            except BaseException as e:  # surfaced on the trainer's next call
                self._error = e
            finally:
                with self._cond:
                    self._cond.notify_all()
                for _ in items:
                    self._q.task_done()
            if stop:
                return

    def _write(self, work: list[QueuedStep], *, commit: bool) -> None:
        t0 = time.perf_counter()
        try:
            for it in work:
                self.store.append(it.host_batch())
                self._appended.append(it)
        except BaseException:
            commit = True  # what was appended before a failure still gets committed
            raise
        finally:
            if self._appended and (commit or len(self._appended) >= self.commit_every):
                self._commit()
            self.metrics.write_s += time.perf_counter() - t0

    def _commit(self) -> None:
        m = self.store.commit()
        done, self._appended = self._appended, []
        with self._cond:
            for it in done:
                self._uncommitted.remove(it)
            self._committed = (m.entries, m.last_step)
        now = time.perf_counter()
        mt = self.metrics
        mt.commits += 1
        mt.committed_entries = m.entries
        mt.raw_bytes, mt.stored_bytes = m.raw_bytes, m.stored_bytes
        mt.queue_depth = self._q.qsize()
        lat = mt.latencies_s
        lat.extend(now - it.t_submit for it in done)
        if len(lat) > self._max_lat:
            del lat[: len(lat) - self._max_lat]
