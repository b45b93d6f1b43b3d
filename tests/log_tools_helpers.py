"""Small Mistake Logs for the tcp-log tests, and content hashes of their entries."""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields
from pathlib import Path

import torch

from tcp.config import ZarrStoreConfig
from tcp.mistake_log.format import Schema, ranks_in
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.record import MistakeBatch
from tcp.mistake_log.shard_writer import RankStoreWriter
from tests.helpers import fake_entries

SMALL = 64 * 16 * 4 / 2**20  # chunk_mib giving 64-row chunks at d=16 float32


def make_log(root: Path, *, steps: int = 24, seed: int = 0, d: int = 16,
             dtype: str = "float32", ranks: int = 2) -> Path:
    """A `ranks`-rank log; rank r logs steps 0..steps-1+2r (so the last step differs per rank).
    A third of the entries have no mistakes (every label is the stored top-1)."""
    for rank in range(ranks):
        w = RankStoreWriter(root, rank, Schema(d, 3, dtype), ZarrStoreConfig(chunk_mib=SMALL))
        for s in range(steps + 2 * rank):
            b = fake_entries(s, rank=rank, seed=seed, d=d)
            for i in range(b.num_entries):
                if (s + i + rank) % 3 == 0:
                    lo, hi = int(b.y_offsets[i]), int(b.y_offsets[i + 1])
                    b.labels[lo:hi] = b.topk_ids[lo:hi, 0]
            w.append(b)
            if s % 4 == 3:
                w.commit()
        w.commit()
    return root


def entry_digest(e: MistakeBatch, *, with_rank: bool = True) -> str:
    """SHA-256 of every field (name, dtype, shape, bytes) of a one-entry batch."""
    h = hashlib.sha256()
    for f in fields(e):
        if f.name == "rank" and not with_rank:
            continue
        t = getattr(e, f.name).contiguous()
        h.update(f"{f.name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def entries(root: Path) -> list[dict]:
    """Every committed entry: rank, step, sample_id, loss, mistakes, raw bytes, digest."""
    out = []
    for rank in ranks_in(root):
        rd = RankStoreReader(root, rank)
        b = rd.read_range(0, rd.num_entries)
        isz = 2 if rd.schema.state_dtype != "float32" else 4
        d, k = rd.schema.d_model, rd.schema.topk
        for i in range(b.num_entries):
            e = b.select([i])
            nx, ny = e.x_tilde.shape[0], e.labels.numel()
            out.append({"rank": rank, "step": int(e.step), "sample_id": int(e.sample_id),
                        "loss": float(e.loss), "digest": entry_digest(e),
                        "digest_no_rank": entry_digest(e, with_rank=False),
                        "mistakes": int((e.topk_ids[:, 0] != e.labels).sum()),
                        "raw": 52 + nx * d * isz + ny * (d * isz + 8 + 8 * k)})
    return out


def digests(root: Path) -> dict[tuple[int, int, int], str]:
    """(rank, step, sample_id) -> entry digest."""
    return {(e["rank"], e["step"], e["sample_id"]): e["digest"] for e in entries(root)}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root`: (bytes, mtime_ns)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def ratio(root: Path) -> dict[int, float]:
    """stored/raw bytes per rank (the estimate prune --max-bytes uses)."""
    out = {}
    for rank in ranks_in(root):
        m = RankStoreReader(root, rank).manifest
        out[rank] = m.stored_bytes / m.raw_bytes
    return out


def newest_steps_within(ents: list[dict], ratios: dict[int, float], budget: float) -> set[int]:
    """The newest steps whose estimated stored bytes add up to <= budget (a plain loop)."""
    per_step: dict[int, float] = {}
    for e in ents:
        per_step[e["step"]] = per_step.get(e["step"], 0.0) + e["raw"] * ratios[e["rank"]]
    kept, total = set(), 0.0
    for s in sorted(per_step, reverse=True):
        total += per_step[s]
        if total > budget:
            break
        kept.add(s)
    return kept

