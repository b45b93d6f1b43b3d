"""CPU and fsyncs of the Mistake Log writer per step, replaying a recorded log.

Rewrites the first `--steps` steps of rank 0 of LOG into a fresh store, appending one step at a
time and committing every k steps (`--commit-every`, a list: each k is an arm, the arms
alternate), synchronously, and prints per step: wall time, the process's CPU time (user +
system, every thread: chunk encoders and fsyncs included), and the number of fsync calls. Runs
each arm `--runs` times and prints each run and the medians.

    .venv/bin/python tools/bench_commit_cpu.py runs/bench-mistake-log/mistake_log [--steps 120]
        [--commit-every 1,8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.shard_writer import RankStoreWriter


def one_run(batches: list[MistakeBatch], reader: RankStoreReader, out: Path,
            every: int) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    calls = [0]
    lock = threading.Lock()  # fsyncs run on the encoder and fsync pools' threads
    real = os.fsync

    def counted(fd: int) -> None:
        with lock:
            calls[0] += 1
        real(fd)

    w = RankStoreWriter(out, 0, reader.schema, ZarrStoreConfig())
    os.fsync = counted
    try:
        c0, t0 = os.times(), time.perf_counter()
        for i, b in enumerate(batches):
            w.append(b)
            if (i + 1) % every == 0:
                w.commit()
        w.commit()
        dt, c1 = time.perf_counter() - t0, os.times()
    finally:
        os.fsync = real
    n = len(batches)
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    return {"wall_ms": 1e3 * dt / n, "cpu_ms": 1e3 * cpu / n, "fsyncs": calls[0] / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("log", help="a recorded Mistake Log (rank 0 is replayed)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--commit-every", default="1",
                    help="comma-separated k: commit every k steps, one arm each (default 1)")
    args = ap.parse_args()
    arms = [int(k) for k in args.commit_every.split(",")]
    reader = RankStoreReader(args.log, 0)
    recorded = reader.read_range(0, reader.num_entries).by_step()[: args.steps]
    batches = [b.at_step(i) for i, b in enumerate(recorded)]
    runs: dict[int, list[dict[str, float]]] = {k: [] for k in arms}
    with tempfile.TemporaryDirectory(dir=Path(args.log).parent) as tmp:
        for r in range(args.runs):
            for k in arms if r % 2 == 0 else arms[::-1]:
                runs[k].append(one_run(batches, reader, Path(tmp) / "log", k))
    for k, rs in runs.items():
        for r in rs:
            print(f"commit every {k}: per step: wall {r['wall_ms']:.2f} ms, CPU "
                  f"{r['cpu_ms']:.2f} ms, fsyncs {r['fsyncs']:.1f}")
        med = {m: statistics.median(r[m] for r in rs) for m in rs[0]}
        print(f"commit every {k}: median of {len(rs)} runs ({len(batches)} steps each): wall "
              f"{med['wall_ms']:.2f} ms, CPU {med['cpu_ms']:.2f} ms, fsyncs "
              f"{med['fsyncs']:.1f} per step")


if __name__ == "__main__":
    main()
