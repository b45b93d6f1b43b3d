"""Benchmark of the on-disk Mistake Log (issue: asynchronous writer + streaming sampler).

Measures, side by side in one run (one process, DeepSpeed world of 1, ZeRO-3 engines):
  (a) joint step time with the Zarr log on vs the RAM-only log (interleaved blocks of steps;
      pooled medians, and the median of per-round ratios with a bootstrap interval);
  (b) writer throughput vs a raw sequential write of the same bytes to the same disk
      (alternating runs, medians), and the
      training thread's pure-Python rate while the writer compresses (GIL check);
  (c) stored/raw bytes per codec on the entries logged in (a) (real Pilot states), with the
      measured error of the lossy options;
  (d) Copilot step time replaying from the store vs the same entries preloaded in RAM, and the
      reader's headroom over the Copilot's consumption rate.

    .venv/bin/python tools/bench_mistake_log.py [--config configs/default.yaml] [--steps 120]
        [--out runs/bench-mistake-log] [key=value overrides...]

Prints a Markdown report (paste into docs/benchmarks.md) and writes <out>/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcp.config import ZarrStoreConfig, load_config
from tcp.data.prepare import model_context, prepare_data
from tcp.mistake_log.async_writer import AsyncWriter
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.format import Schema
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.sampler import StreamingSampler
from tcp.mistake_log.shard_writer import RankStoreWriter
from tcp.runtime.process_group import init_distributed
from tcp.runtime.tracking import Tracker
from tcp.training.build import build_engines, load_tokenizer
from tcp.training.trainer import Trainer


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def single_rank_env() -> None:
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29700 + os.getpid() % 200))):
        os.environ.setdefault(k, v)


# ---------------------------------------------------------------------- (a)
def bench_steps(cfg: Any, out: Path, steps: int, block: int) -> dict[str, Any]:
    _, world, device = init_distributed()
    tok = load_tokenizer(cfg)
    data = prepare_data(cfg, tok, context=model_context(cfg, tok))  # max_length: auto resolved
    cfg, samples = data.cfg, data.samples["train"]
    pilot, copilot, tap = build_engines(cfg, tok, None, world)
    vocab, d = int(pilot.module.config.vocab_size), int(pilot.module.config.hidden_size)
    ml = cfg.mistake_log
    root = out / "mistake_log"
    shutil.rmtree(root, ignore_errors=True)
    schema = Schema(d, min(ml.topk, vocab), ml.storage_dtype)
    on_log = ZarrMistakeLog(root, rank=0, schema=schema, cfg=ml.store,
                            window_steps=ml.window_steps, replay_size=ml.replay_size, seed=cfg.seed)
    off_log = MemoryMistakeLog(window_steps=ml.window_steps, seed=cfg.seed, rank=0)
    wo_root = out / "mistake_log_write_only"
    shutil.rmtree(wo_root, ignore_errors=True)
    write_only = WriteOnly(ZarrMistakeLog(wo_root, rank=0, schema=schema, cfg=ml.store,
                                          window_steps=ml.window_steps,
                                          replay_size=ml.replay_size, seed=cfg.seed),
                           MemoryMistakeLog(window_steps=ml.window_steps, seed=cfg.seed, rank=0))
    tracker = Tracker(cfg, rank=1)  # rank != 0: tracking off
    common = dict(pilot=pilot, copilot=copilot, tap=tap, samples=samples,
                  pad_id=tok.pad_token_id, rank=0, world=1, device=device, tracker=tracker)
    trainers = {"on": Trainer(cfg, log=on_log, **common),
                "off": Trainer(cfg, log=off_log, **common),
                "write_only": Trainer(cfg, log=write_only, **common)}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    rounds: dict[str, list[float]] = {name: [] for name in trainers}  # block medians
    arms = list(trainers)
    for name in arms:  # warm-up (allocator, first replay)
        for _ in range(3):
            trainers[name].train_step()
            trainers[name].step += 1
    for i in range(steps // block):
        for name in (arms if i % 2 == 0 else arms[::-1]):
            t = trainers[name]
            mine = []
            for _ in range(block):
                t0 = time.perf_counter()
                t.train_step()
                mine.append(time.perf_counter() - t0)
                t.step += 1
            times[name] += mine
            rounds[name].append(statistics.median(mine))
    on_log.close()
    write_only.close()
    res = {name: {"median_s": statistics.median(v), "p99_s": pct(v, 0.99), "n": len(v)}
           for name, v in times.items()}
    res["write_only_median_ratio"] = res["write_only"]["median_s"] / res["off"]["median_s"]
    res["median_ratio"] = res["on"]["median_s"] / res["off"]["median_s"]
    res["p99_ratio"] = res["on"]["p99_s"] / res["off"]["p99_s"]
    for arm in ("on", "write_only"):  # drift-free: each round's arms ran back to back
        res[f"{arm}_paired"] = paired_ratio(rounds[arm], rounds["off"])
    res["writer"] = on_log.metrics()
    res["entries_per_step"] = cfg.train.pilot.micro_batch_size
    res["_trainers"] = trainers  # reused by (d)
    return res


def paired_ratio(arm: list[float], off: list[float], resamples: int = 10_000) -> dict[str, Any]:
    """Median over rounds of (arm's block median / off's block median in the same round), with
    a 95% bootstrap interval over rounds. The machine's speed drifts between rounds by more
    than the log costs; within a round the arms run back to back, so the ratio cancels it."""
    r = np.asarray(arm) / np.asarray(off)
    rng = np.random.default_rng(0)
    boot = np.median(r[rng.integers(0, r.size, (resamples, r.size))], axis=1)
    return {"median": float(np.median(r)), "ci95": [float(np.quantile(boot, 0.025)),
                                                    float(np.quantile(boot, 0.975))],
            "rounds": r.tolist()}


class WriteOnly(MemoryMistakeLog):
    """Writes to the store but replays from RAM: separates the writer's cost from the
    reader's in (a)."""

    def __init__(self, disk: ZarrMistakeLog, ram: MemoryMistakeLog) -> None:
        self.disk, self.ram = disk, ram

    def append(self, batch: MistakeBatch) -> None:
        self.disk.append(batch)
        self.ram.append(batch)

    def sample(self, *, step: int, num: int) -> MistakeBatch | None:
        return self.ram.sample(step=step, num=num)

    def close(self) -> None:
        self.disk.close()


# ---------------------------------------------------------------------- (b)
def python_rate(seconds: float) -> float:
    """Iterations/s of a pure-Python loop (needs the GIL the whole time)."""
    n, t_end = 0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(1000):
            n += 1
    return n / seconds


def bench_writer(entries: list[MistakeBatch], schema: Schema, cfg: ZarrStoreConfig, out: Path,
                 target_mib: float, reps: int) -> dict[str, Any]:
    """`reps` alternating runs of the writer and of a raw write of the same bytes (this VM's
    raw write swings between page-cache speed and disk speed from one run to the next, so one
    of each is not a comparison); medians and every run are reported."""
    root = out / "throughput"
    raw_per_round = sum(_raw_bytes(b, schema) for b in entries)
    rounds = max(1, int(target_mib * 2**20 // raw_per_round))
    writer_s, raw_s = [], []
    for rep in range(reps):
        for kind in ("writer", "raw") if rep % 2 == 0 else ("raw", "writer"):
            if kind == "writer":
                shutil.rmtree(root, ignore_errors=True)
                w = AsyncWriter(RankStoreWriter(root, 0, schema, cfg), queue_depth=cfg.queue_depth,
                                commit_every=cfg.commit_every_steps)
                batches = [b.at_step(i) for i, b in enumerate(entries * rounds)]
                t0 = time.perf_counter()
                for b in batches:
                    w.submit(b)
                w.close()
                writer_s.append(time.perf_counter() - t0)
                raw = w.metrics.raw_bytes
                commits, stored = w.metrics.commits, w.metrics.stored_bytes
            else:
                root.mkdir(parents=True, exist_ok=True)
                raw_s.append(raw_write(root / "raw.bin", rounds * raw_per_round))
    gil = gil_check(entries, schema, cfg, out)
    mib = raw / 2**20
    writer_mib_s = [mib / t for t in writer_s]
    raw_mib_s = [mib / t for t in raw_s]
    return {"raw_mib": mib, "stored_mib": stored / 2**20, "commits": commits,
            "writer_mib_s": statistics.median(writer_mib_s),
            "sequential_mib_s": statistics.median(raw_mib_s),
            "ratio": statistics.median(writer_mib_s) / statistics.median(raw_mib_s),
            "writer_runs_mib_s": writer_mib_s, "raw_runs_mib_s": raw_mib_s,
            "python_rate_busy_vs_idle": gil}


def raw_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` sequentially (8 MiB writes) and fsync; the file is removed."""
    buf = np.random.default_rng(0).integers(0, 255, 8 * 2**20, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(buf))
            f.write(buf[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def gil_check(entries: list[MistakeBatch], schema: Schema, cfg: ZarrStoreConfig,
              out: Path) -> float:
    """A pure-Python loop's rate on the 'training' thread while the writer writes the entries
    once, relative to its rate alone: 1.0 means the writer never held the GIL against it."""
    root = out / "gil"
    shutil.rmtree(root, ignore_errors=True)
    idle = python_rate(1.0)
    w = AsyncWriter(RankStoreWriter(root, 0, schema, cfg), queue_depth=len(entries) + 1)
    for i, b in enumerate(entries):
        w.submit(b.at_step(i))
    rates = []
    while not w.committed_through(len(entries) - 1):
        rates.append(python_rate(0.1))
    w.close()
    return statistics.median(rates) / idle if rates else float("nan")


def _raw_bytes(b: MistakeBatch, schema: Schema) -> int:
    from tcp.mistake_log.rows import batch_to_rows

    return sum(a.nbytes for a in batch_to_rows(b, schema).values())


# ---------------------------------------------------------------------- (c)
CODECS = {
    "zstd-3": {},
    "zstd-9": {"level": 9},
    "blosc-zstd-5 + shuffle": {"compressor": "blosc", "level": 5},
    "blosc-zstd-5, no shuffle": {"compressor": "blosc", "level": 5, "shuffle": False},
    "zstd-3, sharded x8": {"shard_chunks": 8},
    "none": {"compressor": "none"},
    "zstd-3 + bitround 10 (lossy)": {"lossy_keepbits": 10},
    "zstd-3 + bitround 7 (lossy)": {"lossy_keepbits": 7},
}


def bench_codecs(entries: list[MistakeBatch], schema: Schema, base: ZarrStoreConfig,
                 out: Path) -> list[dict[str, Any]]:
    rows = []
    ref = MistakeBatch.cat(entries, device="cpu")
    for name, kw in CODECS.items():
        root = out / "codecs" / name.replace(" ", "_").replace(",", "").replace("+", "")
        shutil.rmtree(root, ignore_errors=True)
        cfg = ZarrStoreConfig(**{**base.__dict__, **kw, "fsync": False})
        w = RankStoreWriter(root, 0, schema, cfg)
        t0 = time.perf_counter()
        for b in entries:
            w.append(b)
            w.commit()
        dt = time.perf_counter() - t0
        m = w.manifest
        rd = RankStoreReader(root, 0)
        got = rd.read_range(0, rd.num_entries)
        err = max(_rel_err(got.h, ref.h), _rel_err(got.x_tilde, ref.x_tilde))
        by_array = {n: _array_stored(root / "rank00000" / n) for n in ("h", "x_tilde")}
        rows.append({"codec": name, "stored_over_raw": m.stored_bytes / m.raw_bytes,
                     "h_stored_mib": by_array["h"] / 2**20,
                     "x_tilde_stored_mib": by_array["x_tilde"] / 2**20,
                     "raw_mib": m.raw_bytes / 2**20, "max_rel_err_states": err,
                     "stated_bound": m.codec.get("max_relative_error", 0.0),
                     "write_mib_s": m.raw_bytes / 2**20 / dt})
    return rows


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    ok = b.abs() >= torch.finfo(torch.float32).tiny
    return float(((a - b).abs()[ok] / b.abs()[ok]).max()) if ok.any() else 0.0


def _array_stored(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")


# ---------------------------------------------------------------------- (d)
def bench_replay(trainers: dict[str, Trainer], cfg: Any, root: Path, steps: int) -> dict[str, Any]:
    ml = cfg.mistake_log
    rd = RankStoreReader(root, 0)
    last = int(rd.manifest.last_step)
    ram = MemoryMistakeLog(window_steps=ml.window_steps, seed=cfg.seed, rank=0)
    everything = rd.read_range(0, rd.num_entries)
    for b in everything.by_step():
        ram.append(b)
    lag = ml.store.replay_lag_steps
    stream = StreamingSampler(rd, seed=cfg.seed, rank=0, num=ml.replay_size,
                              window_steps=ml.window_steps, lag_steps=lag,
                              prefetch=ml.store.prefetch, )

    class Streamed(MemoryMistakeLog):  # the Trainer's interface over the streaming sampler
        def sample(self, *, step: int, num: int) -> MistakeBatch | None:
            return stream.sample(step + lag)  # same window as the RAM log's [t - W, t)

    t = trainers["off"]
    cur = everything.select(list(range(cfg.train.pilot.micro_batch_size)))
    times: dict[str, list[float]] = {"store": [], "ram": []}
    start = max(1, last + 1 - steps)
    logs = {"store": Streamed(window_steps=1, seed=0, rank=0), "ram": ram}
    for i, s in enumerate(range(start, last + 1)):
        for name in (("store", "ram") if i % 2 == 0 else ("ram", "store")):
            t.log, t.step = logs[name], s
            t0 = time.perf_counter()
            t.copilot_step(cur)
            times[name].append(time.perf_counter() - t0)
    stream.close()
    # Reader alone: draws/s without prefetch, on the same steps.
    plain = StreamingSampler(rd, seed=cfg.seed, rank=0, num=ml.replay_size,
                             window_steps=ml.window_steps, lag_steps=0, prefetch=0)
    t0 = time.perf_counter()
    n = 0
    for s in range(start, last + 1):
        b = plain.draw(s)
        n += b.num_entries if b is not None else 0
    read_s = time.perf_counter() - t0
    med = {k: statistics.median(v) for k, v in times.items()}
    consume = ml.replay_size / med["store"]
    return {"copilot_step_store_s": med["store"], "copilot_step_ram_s": med["ram"],
            "ratio": med["store"] / med["ram"], "reader_entries_s": n / read_s,
            "copilot_entries_s": consume, "headroom": (n / read_s) / consume,
            "read_ms_per_batch": 1e3 * read_s / max(1, last + 1 - start)}


# ---------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    from tcp.runtime.console import setup_logging

    setup_logging()  # tcp's own [tcp] lines, as in the main job
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=120, help="timed joint steps per arm in (a)")
    ap.add_argument("--block", type=int, default=10, help="steps per interleaved block in (a)")
    ap.add_argument("--writer-mib", type=float, default=256.0,
                    help="raw MiB written in the throughput test (b)")
    ap.add_argument("--writer-reps", type=int, default=5,
                    help="alternating writer / raw-write runs in (b)")
    ap.add_argument("--out", default="runs/bench-mistake-log")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    single_rank_env()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, ["base.enabled=false", "copilot.init_from=none",
                                    "eval.enabled=false", f"output_dir={out}", *args.overrides])
    a = bench_steps(cfg, out, args.steps, args.block)
    trainers = a.pop("_trainers")
    root = out / "mistake_log"
    rd = RankStoreReader(root, 0)
    per_step = rd.read_range(0, rd.num_entries).by_step()
    b = bench_writer(per_step, rd.schema, cfg.mistake_log.store, out, args.writer_mib,
                     args.writer_reps)
    c = bench_codecs(per_step, rd.schema, cfg.mistake_log.store, out)
    d = bench_replay(trainers, cfg, root, steps=60)
    res = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, "
                      f"torch {torch.__version__}",
           "command": " ".join([sys.argv[0], *sys.argv[1:]]), "a": a, "b": b, "c": c, "d": d}
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    print(report(res))


def report(r: dict[str, Any]) -> str:
    a, b, d = r["a"], r["b"], r["d"]
    lines = [f"Machine: {r['machine']}", f"Command: `{r['command']}`", "",
             "| measure | value | goal |", "|---|---|---|",
             f"| (a) joint step median, log on / off | {a['on']['median_s']*1e3:.1f} ms / "
             f"{a['off']['median_s']*1e3:.1f} ms = **{a['median_ratio']:.3f}** | <= 1.02 |",
             f"| (a) joint step, log on / off, paired by round (median of "
             f"{len(a['on_paired']['rounds'])} rounds, 95% CI) | **{a['on_paired']['median']:.3f}**"
             f" [{a['on_paired']['ci95'][0]:.3f}, {a['on_paired']['ci95'][1]:.3f}] | <= 1.02 |",
             f"| (a) joint step, write-only / off, paired by round | "
             f"**{a['write_only_paired']['median']:.3f}** [{a['write_only_paired']['ci95'][0]:.3f},"
             f" {a['write_only_paired']['ci95'][1]:.3f}] | (attribution) |",
             f"| (a) joint step p99, log on / off | {a['on']['p99_s']*1e3:.1f} ms / "
             f"{a['off']['p99_s']*1e3:.1f} ms = **{a['p99_ratio']:.3f}** | <= 1.05 |",
             f"| (a) joint step median, write-only (replay from RAM) / off | "
             f"{a['write_only']['median_s']*1e3:.1f} ms = **{a['write_only_median_ratio']:.3f}**"
             " | (attribution) |",
             f"| (a) trainer blocked on the writer / staging | {a['writer']['blocked_s']:.3f} s / "
             f"{a['writer']['stage_s']:.3f} s over {a['on']['n'] + 3} steps | |",
             f"| (b) writer / raw sequential write | {b['writer_mib_s']:.0f} / "
             f"{b['sequential_mib_s']:.0f} MiB/s = **{b['ratio']:.2f}** "
             f"(medians of {len(b['writer_runs_mib_s'])} alternating runs of "
             f"{b['raw_mib']:.0f} MiB raw, {b['commits']} commits each; writer "
             f"{', '.join(f'{x:.0f}' for x in b['writer_runs_mib_s'])}, raw "
             f"{', '.join(f'{x:.0f}' for x in b['raw_runs_mib_s'])} MiB/s) | >= 0.7 |",
             f"| (b) trainer-thread Python rate while writing / idle | "
             f"**{b['python_rate_busy_vs_idle']:.2f}** | (GIL check) |",
             f"| (d) Copilot step, replay from store / RAM | {d['copilot_step_store_s']*1e3:.1f}"
             f" / {d['copilot_step_ram_s']*1e3:.1f} ms = **{d['ratio']:.3f}** | <= 1.05 |",
             f"| (d) reader / Copilot consumption | {d['reader_entries_s']:.0f} / "
             f"{d['copilot_entries_s']:.0f} entries/s = **{d['headroom']:.1f}x** | >= 3x |",
             "", "(c) stored/raw on the entries logged in (a):", "",
             "| codec | stored/raw | h MiB | X~ MiB | max rel. err (states) | stated bound |"
             " write MiB/s |", "|---|---|---|---|---|---|---|"]
    for c in r["c"]:
        lines.append(f"| {c['codec']} | **{c['stored_over_raw']:.3f}** | {c['h_stored_mib']:.2f}"
                     f" | {c['x_tilde_stored_mib']:.2f} | {c['max_rel_err_states']:.2e} | "
                     f"{c['stated_bound']:.2e} | {c['write_mib_s']:.0f} |")
    lines.append(f"\nraw MiB logged in (a): {r['c'][0]['raw_mib']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
