"""`tcp-log info` and `verify`: maintenance.py's reports plus the sparse errors' k, the mean
residual mass (the Pilot's probability outside the stored top-k, per target token), the store
options and the log's history (prunes, compactions, merges)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tcp.log_tools.checks import damaged, require_log
from tcp.log_tools.errors import human_bytes
from tcp.log_tools.tables import READ_ERRORS, residual_sum, root_attrs
from tcp.mistake_log.format import Schema
from tcp.mistake_log.maintenance import VerifyReport, info, verify
from tcp.mistake_log.reader import RankStoreReader


def residual_means(root: Path, ranks: list[int]) -> dict[int, tuple[float, int]]:
    """(sum, tokens) of the residual mass per rank (streams the small residual array)."""
    return {r: residual_sum(RankStoreReader(root, r, cache_mib=0)) for r in ranks}


def describe(path: Path | str) -> dict[str, Any]:
    """Everything `info` shows, as JSON-ready data (decodes only the residual array)."""
    root = require_log(Path(path))
    try:
        d = info(root)
        attrs = root_attrs(root)
        schema = Schema.from_attrs(attrs, root)
        res = residual_means(root, [r["rank"] for r in d["ranks"]])
        codecs = {r: RankStoreReader(root, r, cache_mib=0).manifest.codec for r in res}
    except READ_ERRORS as e:
        raise damaged(root, e) from e
    for r in d["ranks"]:
        s, n = res[r["rank"]]
        r["mean_residual"] = s / n if n else None
        r["codec"] = codecs[r["rank"]]
    total, tokens = sum(s for s, _ in res.values()), sum(n for _, n in res.values())
    d.update(d_model=schema.d_model, topk=schema.topk, state_dtype=schema.state_dtype,
             mean_residual=total / tokens if tokens else None,
             history=attrs.get("history", []),
             **{k: attrs[k] for k in ("merged_from",) if k in attrs})
    return d


def info_text(d: dict[str, Any]) -> str:
    """The human-readable `info`."""
    lines = [f"{d['root']}: {len(d['ranks'])} rank shard(s), {d['entries']} committed entries, "
             f"d_model {d['d_model']}, state {d['state_dtype']}"]
    for r in d["ranks"]:
        ratio = r["stored_bytes"] / r["raw_bytes"] if r["raw_bytes"] else float("nan")
        c = r["codec"]
        lines.append(f"  rank {r['rank']}: {r['entries']} entries, {r['tokens']} tokens, steps "
                     f"{r['steps'][0]}..{r['steps'][1]}, {human_bytes(r['raw_bytes'])} raw -> "
                     f"{human_bytes(r['stored_bytes'])} stored ({ratio:.3f}), "
                     f"{c.get('compressor')} level {c.get('level')}, chunk {c.get('chunk_mib')}"
                     f" MiB" + (f", {r['uncommitted_entries']} uncommitted entries ignored"
                                if r["uncommitted_entries"] else "")
                     + (f", {r['dropped_entries']} entries dropped by the writer"
                        if r["dropped_entries"] else ""))
        for e in r["errors"]:
            lines.append(f"    ERROR: {e}")
    lines.append(sparse_line(d["topk"], d["mean_residual"]))
    for m in d.get("merged_from", []):
        lines.append(f"  shard {m['shard']} <- {m['source']} rank {m['rank']}")
    for h in d["history"]:
        extra = h.get("policy") or h.get("options") or h.get("sources") or {}
        lines.append(f"  history: {h.get('time')} {h.get('op')} {extra} entries "
                     f"{h.get('entries_before')} -> {h.get('entries_after')}")
    return "\n".join(lines)


def sparse_line(topk: int, mean_residual: float | None) -> str:
    """The sparse errors' k and the mean residual mass, in words."""
    res = "n/a (no tokens)" if mean_residual is None else f"{mean_residual:.4f}"
    return (f"  sparse errors: top-{topk} ids and probabilities per target token; mean residual "
            f"mass (probability outside the top-{topk}) {res}")


def verify_text(path: Path | str, *, full: bool) -> tuple[str, bool]:
    """The `verify` report and whether the log is sound."""
    root = require_log(Path(path))
    rep: VerifyReport = verify(root, full=full)
    text = rep.summary()
    try:
        schema = Schema.from_attrs(root_attrs(root), root)
    except READ_ERRORS as e:
        return f"{text}\n  ERROR: root group: {e}", False
    mean = None
    if full and rep.ok:
        res = residual_means(root, [r.rank for r in rep.ranks])
        tokens = sum(n for _, n in res.values())
        mean = sum(s for s, _ in res.values()) / tokens if tokens else None
    extra = sparse_line(schema.topk, mean) if full else \
        f"  sparse errors: top-{schema.topk} (--quick: residual mass not read)"
    head, _, last = text.rpartition("\n")
    return f"{head}\n{extra}\n{last}", rep.ok
