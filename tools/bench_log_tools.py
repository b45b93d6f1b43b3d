"""Benchmark of the Mistake Log tools (`tcp-log prune` and `tcp-log compact`) on a real log.

Every measurement runs on a fresh copy of the source log (the source itself is never changed):
  1. prune: for each policy (`--keep-last-steps 100`, `--before-step 150`, `--min-loss 1.0`,
     `--only-mistakes`, `--max-bytes 20M`, and `--keep-last-steps 200 --only-mistakes
     --max-bytes 15M`), the dry run's estimate (entries and estimated stored bytes kept and
     dropped), then after `--apply`: entries kept, stored bytes before/after (manifests), bytes
     on disk after, bytes reclaimed (absolute and %), and the apply's wall time. The policies go
     through the CLI's own parser and the library functions the CLI calls
     (`tcp.log_tools.prune.dry_run` / `apply`).
  2. compact throughput vs a plain copy of the same store: `--reps` interleaved repetitions
     (alternating which goes first) of `shutil.copytree` + an fsync of every file and folder
     (the same concurrent fsync compact seals its copy with) and of `compact` (default options)
     on a fresh untimed copy. Reports the median seconds, MiB/s of stored bytes and
     copy_time / compact_time ("compact throughput vs plain copy", goal >= 0.5x), plus a phase
     breakdown of each compact taken by timing the library functions it calls: tables (per-entry
     facts), copy (shards copied file by file: `RankStoreWriter.copy_from`), read (decode the
     source blocks) and encode+write (the new store's commits) where entries are re-encoded,
     verify, fsync, swap, delete (the replaced store).

    .venv/bin/python tools/bench_log_tools.py [--log runs/seed0/mistake_log]
        [--out runs/bench-log-tools] [--reps 3]

Prints a Markdown report (for docs/benchmarks.md) and writes <out>/bench.json. <out> is
removed and recreated at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import zarr

from tcp.cli.tcp_log import build_parser
from tcp.log_tools import prune, replace, rewrite, swap
from tcp.log_tools.compact import CompactOptions, compact
from tcp.log_tools.select import PrunePolicy

POLICIES = (["--keep-last-steps", "100"], ["--before-step", "150"], ["--min-loss", "1.0"],
            ["--only-mistakes"], ["--max-bytes", "20M"],
            ["--keep-last-steps", "200", "--only-mistakes", "--max-bytes", "15M"])
MIB = 2**20


def disk_bytes(root: Path) -> int:
    """Sum of the sizes of every file under `root`."""
    return sum((Path(d) / f).stat().st_size for d, _, fs in os.walk(root) for f in fs)


def policy_of(flags: list[str]) -> PrunePolicy:
    """The PrunePolicy the CLI builds from `tcp-log prune PATH <flags>`."""
    a = build_parser().parse_args(["prune", "PATH", *flags])
    return PrunePolicy(keep_last_steps=a.keep_last_steps, before_step=a.before_step,
                       min_loss=a.min_loss, only_mistakes=a.only_mistakes,
                       max_bytes=a.max_bytes)


def bench_prune(src: Path, work: Path, notes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, flags in enumerate(POLICIES):
        d = work / f"prune{i}"
        shutil.copytree(src, d)
        pol = policy_of(flags)
        t0 = time.perf_counter()
        plans, _ = prune.dry_run(d, pol)
        t_dry = time.perf_counter() - t0
        disk_before = disk_bytes(d)
        t0 = time.perf_counter()
        out = prune.apply(d, pol, say=notes.append, show=lambda _line: None)
        t_apply = time.perf_counter() - t0
        entries = sum(p.kept + p.dropped for p in plans)
        row = {"flags": " ".join(flags), "dry_run_s": t_dry,
               "estimate": {"kept": sum(p.kept for p in plans),
                            "dropped": sum(p.dropped for p in plans),
                            "kept_bytes": sum(p.kept_bytes for p in plans),
                            "dropped_bytes": sum(p.dropped_bytes for p in plans)},
               "entries_before": entries, "disk_before": disk_before, "apply_s": t_apply,
               "disk_after": disk_bytes(d), "unchanged": out is None}
        if out is None:  # every entry kept: the log is left as it is
            before = sum(json.loads(m.read_text())["stored_bytes"]
                         for m in d.glob("rank*/manifest.json"))
            row.update(entries_after=entries, stored_before=before, stored_after=before)
        else:
            row.update(entries_after=out.entries_after, stored_before=out.stored_before,
                       stored_after=out.stored_after)
        row["reclaimed"] = row["stored_before"] - row["stored_after"]
        row["reclaimed_pct"] = 100 * row["reclaimed"] / max(row["stored_before"], 1)
        rows.append(row)
        shutil.rmtree(d)
    return rows


@contextmanager
def phase_timers(acc: dict[str, float]) -> Iterator[None]:
    """Time the functions compact calls by wrapping them where they are looked up."""
    targets = [(replace, "load_tables", "tables"), (rewrite, "_read_block", "read"),
               (rewrite.RankStoreWriter, "copy_from", "copy"),
               (replace, "write_log", "_write_total"), (replace, "_check", "verify"),
               (replace, "fsync_tree", "fsync"), (swap, "swap_in", "swap"),
               (swap, "finish", "delete")]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - t0
        return wrapper

    for (mod, name, key), (_, _, fn) in zip(targets, saved, strict=True):
        setattr(mod, name, timed(fn, key))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def bench_compact(src: Path, work: Path, reps: int, notes: list[str]) -> dict[str, Any]:
    copy_s: list[float] = []
    compact_s: list[float] = []
    phases: list[dict[str, float]] = []
    for rep in range(reps):
        for kind in ("copy", "compact") if rep % 2 == 0 else ("compact", "copy"):
            d = work / kind
            if kind == "copy":
                t0 = time.perf_counter()
                shutil.copytree(src, d)
                replace.fsync_tree(d)
                copy_s.append(time.perf_counter() - t0)
            else:
                shutil.copytree(src, d)
                acc: dict[str, float] = defaultdict(float)
                with phase_timers(acc):
                    t0 = time.perf_counter()
                    compact(d, CompactOptions(), say=notes.append)
                    total = time.perf_counter() - t0
                compact_s.append(total)
                acc["encode+write"] = acc.pop("_write_total", 0.0) - acc["read"] - acc["copy"]
                acc["other"] = total - sum(acc.values())
                phases.append(dict(acc))
            shutil.rmtree(d)
    stored = disk_bytes(src)
    med_copy, med_compact = statistics.median(copy_s), statistics.median(compact_s)
    keys = ("tables", "copy", "read", "encode+write", "verify", "fsync", "swap", "delete",
            "other")
    return {"copy_s": copy_s, "compact_s": compact_s, "median_copy_s": med_copy,
            "median_compact_s": med_compact, "bytes": stored,
            "copy_mib_s": stored / MIB / med_copy, "compact_mib_s": stored / MIB / med_compact,
            "ratio": med_copy / med_compact,
            "phases_median_s": {k: statistics.median(p.get(k, 0.0) for p in phases)
                                for k in keys}}


def report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, "
             f"torch {res['torch']}, zarr {res['zarr']}.",
             f"Log: `{res['log']}`, {res['entries']} entries, "
             f"{res['prune'][0]['stored_before'] / MIB:.1f} MiB stored.", "",
             "Command:", "", f"    {res['command']}", "",
             "| prune policy | dry run: keep (est. stored) | kept entries | stored before → after"
             " | reclaimed | on disk after | apply |", "|---|---|---|---|---|---|---|"]
    for r in res["prune"]:
        e = r["estimate"]
        lines.append(
            f"| `{r['flags']}` | {e['kept']} (~{e['kept_bytes'] / MIB:.1f} MiB) | "
            f"{r['entries_after']} / {r['entries_before']} | {r['stored_before'] / MIB:.1f} → "
            f"{r['stored_after'] / MIB:.1f} MiB | {r['reclaimed'] / MIB:.1f} MiB "
            f"({r['reclaimed_pct']:.1f} %) | {r['disk_after'] / MIB:.1f} MiB | "
            f"{r['apply_s']:.2f} s{' (unchanged)' if r['unchanged'] else ''} |")
    c = res["compact"]
    verdict = "met" if c["ratio"] >= 0.5 else "missed"
    lines += ["", f"Compact vs plain copy ({len(c['copy_s'])} interleaved repetitions each, "
              f"{c['bytes'] / MIB:.1f} MiB of files):", "",
              "| | median | per run | MiB/s |", "|---|---|---|---|",
              f"| copytree + fsync | {c['median_copy_s']:.2f} s | "
              f"{', '.join(f'{t:.2f}' for t in c['copy_s'])} | {c['copy_mib_s']:.1f} |",
              f"| compact | {c['median_compact_s']:.2f} s | "
              f"{', '.join(f'{t:.2f}' for t in c['compact_s'])} | {c['compact_mib_s']:.1f} |",
              "", f"Compact throughput vs plain copy: **{c['ratio']:.2f}×** (goal ≥ 0.5×: "
              f"{verdict}).", "", "| compact phase | median s | share |", "|---|---|---|"]
    for k, v in c["phases_median_s"].items():
        lines.append(f"| {k} | {v:.2f} | {100 * v / c['median_compact_s']:.0f} % |")
    if res["notes"]:
        lines += ["", "Notes from the tools: " + "; ".join(res["notes"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default="runs/seed0/mistake_log", help="source Mistake Log")
    ap.add_argument("--out", default="runs/bench-log-tools",
                    help="work folder (removed and recreated)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of copy and of compact")
    a = ap.parse_args(argv)
    src, work = Path(a.log), Path(a.out)
    if not (src / "zarr.json").is_file():
        ap.error(f"{src}: not a Mistake Log")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    notes: list[str] = []
    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "torch": torch.__version__, "zarr": zarr.__version__,
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)) if argv is None
        else shlex.join(["tools/bench_log_tools.py", *argv]),
        "log": str(src)}
    res["prune"] = bench_prune(src, work, notes)
    res["entries"] = res["prune"][0]["entries_before"]
    res["compact"] = bench_compact(src, work, a.reps, notes)
    res["notes"] = notes
    (work / "bench.json").write_text(json.dumps(res, indent=2))
    print(report(res))
    return res


if __name__ == "__main__":
    main()
