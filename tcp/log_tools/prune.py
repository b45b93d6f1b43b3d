"""`tcp-log prune`: drop entries by policy (select.py). A dry run by default; `apply=True`
rewrites the log in place with the same store options (replace.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tcp.config import ZarrStoreConfig
from tcp.log_tools.replace import Outcome, now, rewrite_in_place
from tcp.log_tools.rewrite import OutShard, config_from_codec, part_of
from tcp.log_tools.select import PrunePolicy, ShardPlan, keep_masks, plan, report
from tcp.log_tools.tables import LogTables, load_tables


def shards_to_keep(tables: LogTables, masks: list[np.ndarray]) -> list[OutShard]:
    """One new shard per original shard, holding its kept entries."""
    return [OutShard(s.rank, (part_of(tables, s, m),), s.manifest.dropped_entries)
            for s, m in zip(tables.shards, masks, strict=True)]


def dry_run(path: Path | str, policy: PrunePolicy) -> tuple[list[ShardPlan], list[str]]:
    """What a prune would keep and drop (reads committed entries only: safe on a live log)."""
    tables = load_tables(path, mistakes=policy.only_mistakes)
    plans = plan(tables, keep_masks(tables, policy))
    head = f"prune {tables.root} (dry run, nothing changed; add --apply to rewrite the log)"
    return plans, [head, f"  policy: {_policy_text(policy)}", *report(plans)]


def apply(path: Path | str, policy: PrunePolicy, *, say: Callable[[str], None],
          show: Callable[[str], None] = print) -> Outcome | None:
    """Rewrite the log keeping only what `policy` keeps; None when it would drop nothing.
    `show` gets the plan's lines (report), `say` the notes (leftovers cleaned up, ...)."""
    dropped: list[int] = []

    def build(tables: LogTables) -> tuple[list[OutShard], ZarrStoreConfig, dict[str, Any]]:
        masks = keep_masks(tables, policy)
        plans = plan(tables, masks)
        for line in report(plans):
            show(line)
        dropped.append(sum(p.dropped for p in plans))
        if not dropped[0]:
            raise _NothingToDo
        record = {"op": "prune", "time": now(), "policy": policy.describe(),
                  "entries_before": tables.entries,
                  "entries_after": sum(p.kept for p in plans),
                  "stored_bytes_before": sum(s.manifest.stored_bytes for s in tables.shards)}
        return (shards_to_keep(tables, masks),
                config_from_codec(tables.shards[0].manifest.codec), record)

    try:
        return rewrite_in_place(path, build, say=say, mistakes=policy.only_mistakes)
    except _NothingToDo:
        return None


class _NothingToDo(Exception):
    """Raised from `build` when every entry is kept (the log is left as it is)."""


def _policy_text(p: PrunePolicy) -> str:
    return ", ".join(f"{k.replace('_', '-')}={v}" for k, v in p.describe().items())
