"""Inspect and verify Mistake Log stores (used by tools/mistake_log.py)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tcp.mistake_log.format import ALL_ARRAYS, ENTRY_ARRAYS, MistakeLogCorrupt, ranks_in
from tcp.mistake_log.reader import RankStoreReader

VERIFY_ROWS = 1 << 16
"""Rows decoded at a time while verifying (bounds memory on terabyte logs)."""


@dataclass
class RankReport:
    """What verification found in one rank's shard."""

    rank: int
    entries: int
    tokens: int
    prompt_rows: int
    steps: tuple[int | None, int | None]
    raw_bytes: int
    stored_bytes: int
    dropped_entries: int
    uncommitted_entries: int
    """Entries written after the last commit (a crash or kill mid-write); readers ignore them."""
    leftover_temp_files: int
    errors: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """All ranks of one store."""

    root: str
    ranks: list[RankReport]

    @property
    def ok(self) -> bool:
        return all(not r.errors for r in self.ranks)

    @property
    def entries(self) -> int:
        return sum(r.entries for r in self.ranks)

    def summary(self) -> str:
        lines = [f"{self.root}: {len(self.ranks)} rank shard(s), {self.entries} committed entries"]
        for r in self.ranks:
            ratio = r.stored_bytes / r.raw_bytes if r.raw_bytes else float("nan")
            lines.append(
                f"  rank {r.rank}: {r.entries} entries, {r.tokens} tokens, steps {r.steps[0]}.."
                f"{r.steps[1]}, {r.raw_bytes / 2**20:.1f} MiB raw -> "
                f"{r.stored_bytes / 2**20:.1f} MiB stored ({ratio:.3f})"
                + (f", {r.uncommitted_entries} uncommitted entries ignored"
                   if r.uncommitted_entries else "")
                + (f", {r.dropped_entries} entries dropped by the writer"
                   if r.dropped_entries else "")
                + (f", {r.leftover_temp_files} temp files from an interrupted write"
                   if r.leftover_temp_files else ""))
            lines += [f"    ERROR: {e}" for e in r.errors]
        lines.append("OK" if self.ok else "CORRUPT")
        return "\n".join(lines)


def verify(root: Path | str, *, full: bool = True) -> VerifyReport:
    """Check every rank: manifest, array capacities, per-chunk CRC32C (by decoding every
    committed chunk), the manifest's per-array digests, sorted steps and consistent offsets.
    `full=False` skips decoding (manifests and metadata only)."""
    root = Path(root)
    reports = []
    ranks = ranks_in(root)
    if not ranks:
        raise FileNotFoundError(f"{root}: no rank shards (rank00000/...) found")
    for rank in ranks:
        reports.append(_verify_rank(root, rank, full))
    return VerifyReport(str(root), reports)


def _verify_rank(root: Path, rank: int, full: bool) -> RankReport:
    errors: list[str] = []
    try:
        rd = RankStoreReader(root, rank)
    except (MistakeLogCorrupt, FileNotFoundError, KeyError) as e:
        return RankReport(rank, 0, 0, 0, (None, None), 0, 0, 0, 0, 0, [str(e)])
    m = rd.manifest
    if full:
        for name in ALL_ARRAYS:
            n = m.rows(name)
            crc = 0
            try:
                for lo in range(0, n, VERIFY_ROWS):
                    rows = np.ascontiguousarray(rd.arrays[name][lo:min(n, lo + VERIFY_ROWS)])
                    crc = zlib.crc32(rows.data, crc)
                    if name == "step" and rows.size and bool((np.diff(rows) < 0).any()):
                        errors.append(f"{name}: steps decrease within rows {lo}..")
            except Exception as e:  # a failed CRC32C or a missing/garbled chunk
                errors.append(f"{name}: cannot decode committed rows ({type(e).__name__}: {e})")
                continue
            if crc != m.digests.get(name):
                errors.append(f"{name}: digest of {n} committed rows is {crc:#010x}, manifest "
                              f"says {m.digests.get(name, 0):#010x}")
        if not errors and m.entries:
            errors += _check_offsets(rd)
    return RankReport(
        rank=rank, entries=m.entries, tokens=m.tokens, prompt_rows=m.prompt_rows,
        steps=(m.first_step, m.last_step), raw_bytes=m.raw_bytes, stored_bytes=m.stored_bytes,
        dropped_entries=m.dropped_entries, uncommitted_entries=uncommitted_entries(rd),
        leftover_temp_files=sum(1 for _ in rd.dir.rglob("*.partial")), errors=errors)


def _check_offsets(rd: RankStoreReader) -> list[str]:
    """Entries tile the token and prompt arrays exactly (x_start/y_start are running sums)."""
    m, a = rd.manifest, rd.arrays
    errs = []
    for start, length, total in (("y_start", "y_len", m.tokens),
                                 ("x_start", "x_len", m.prompt_rows)):
        expect = 0
        for lo in range(0, m.entries, VERIFY_ROWS):
            hi = min(m.entries, lo + VERIFY_ROWS)
            s, n = np.asarray(a[start][lo:hi]), np.asarray(a[length][lo:hi])
            run = expect + np.concatenate([[0], np.cumsum(n)[:-1]])
            if not np.array_equal(s, run) or bool((n < 0).any()):
                errs.append(f"{start}/{length}: entries do not tile rows {lo}..{hi}")
                break
            expect = int(run[-1] + n[-1])
        else:
            if expect != total:
                errs.append(f"{length}: entries cover {expect} rows, manifest commits {total}")
    return errs


def uncommitted_entries(rd: RankStoreReader) -> int:
    """Entries written past the commit point (fill value -1 marks never-written rows)."""
    arr = rd.arrays["step"]
    lo = rd.manifest.entries
    hi = arr.shape[0]
    n = 0
    for s in range(lo, hi, VERIFY_ROWS):
        chunk = np.asarray(arr[s:min(hi, s + VERIFY_ROWS)])
        written = int((chunk != -1).sum())
        n += written
        if written == 0:
            break
    return n


def info(root: Path | str) -> dict[str, Any]:
    """Manifest-level facts of every rank (cheap: decodes nothing)."""
    rep = verify(root, full=False)
    return {"root": rep.root, "entries": rep.entries,
            "ranks": [r.__dict__ for r in rep.ranks],
            "entry_arrays": list(ENTRY_ARRAYS)}
