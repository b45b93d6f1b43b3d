"""The `tcp-log` command line (also `tools/mistake_log.py`): one subcommand per library function.

Exit codes: 0 done; 1 `verify` found corruption; 2 an error printed as one line
(`log error: ...`, `lock error: ...`, `usage error: ...`), with nothing changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from tcp.errors import RunError
from tcp.log_tools.args import parse_bytes, parse_ids, parse_steps
from tcp.log_tools.errors import human_bytes

# The commands (torch, zarr, pyarrow) are imported when one runs, so `--help` and a bad flag
# answer at once.

PROG = "tcp-log"
EXAMPLES = {
    "info": "tcp-log info runs/default/mistake_log\n"
            "tcp-log info runs/default/mistake_log --json | jq .entries",
    "verify": "tcp-log verify runs/default/mistake_log          # decode and check everything\n"
              "tcp-log verify runs/default/mistake_log --quick  # manifests and metadata only",
    "prune": "tcp-log prune runs/old/mistake_log --keep-last-steps 500          # dry run\n"
             "tcp-log prune runs/old/mistake_log --before-step 1000 --apply\n"
             "tcp-log prune runs/old/mistake_log --only-mistakes --max-bytes 10G --apply",
    "compact": "tcp-log compact runs/old/mistake_log\n"
               "tcp-log compact runs/old/mistake_log --compressor zstd --level 9 --chunk-mib 4\n"
               "tcp-log compact runs/old/mistake_log --merge-ranks",
    "export": "tcp-log export runs/old/mistake_log --out errs.parquet --steps 100:200\n"
              "tcp-log export runs/old/mistake_log --out few.npz --rank 0 --sample-ids 3,17",
    "merge": "tcp-log merge runs/all/mistake_log runs/seed0/mistake_log runs/seed1/mistake_log",
}


class _Parser(argparse.ArgumentParser):
    """Bad flags are one line on stderr and exit 2, like every other tcp error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"usage error: {self.prog}: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _sub(sub: argparse._SubParsersAction, name: str, help: str,
         desc: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=desc, epilog="examples:\n" + "\n".join(
        "  " + line for line in EXAMPLES[name].splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)


def _codec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-mib", type=float, metavar="X",
                   help="uncompressed size of one chunk of the token arrays (default: the log's)")
    p.add_argument("--compressor", choices=("zstd", "blosc", "none"),
                   help="chunk compressor (default: the log's)")
    p.add_argument("--level", type=int, metavar="N",
                   help="compression level (zstd 1-22, blosc 0-9; default: the log's, or 3 "
                   "when --compressor changes)")
    p.add_argument("--shard-chunks", type=int, metavar="N",
                   help="chunks per shard file, 0 = no sharding (default: the log's)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Inspect, prune, compact, export and merge Mistake Logs "
                 "(docs/mistake_log.md, 'Tools: tcp-log'). prune --apply, compact and merge "
                 "lock the logs they touch and refuse one a live training run holds; the other "
                 "commands read committed entries only and work on a live log.",
                 epilog="examples:\n" + "\n".join("  " + e.splitlines()[0]
                                                  for e in EXAMPLES.values()),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    p = _sub(sub, "info", "summary: entries, steps, sizes, codecs, residual mass, history",
             "Per rank: committed entries, tokens, steps, raw and stored bytes, store options; "
             "the sparse errors' k and mean residual mass; the log's history.")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON (top-level `entries`)")
    p = _sub(sub, "verify", "decode and check every committed entry (exit 1 if corrupt)",
             "Decodes every committed chunk (each carries a CRC32C), recomputes each array's "
             "digest against the manifest, checks sorted steps and offsets. Exit 1 if corrupt.")
    p.add_argument("path")
    p.add_argument("--quick", action="store_true", help="manifests and metadata only")
    p = _sub(sub, "prune", "drop entries by policy (dry run unless --apply)",
             "Keep an entry only if every given policy keeps it. Without --apply, print what "
             "would go and what would remain and change nothing. With --apply, rewrite the kept "
             "entries beside the log, verify, swap in atomically. Prune an archived run's log: "
             "a resumed run refuses a pruned log (its checkpoints' log cursor no longer fits).")
    p.add_argument("path")
    p.add_argument("--keep-last-steps", type=int, metavar="N",
                   help="keep steps > last_step - N (last step over all ranks)")
    p.add_argument("--before-step", type=int, metavar="S", help="drop entries with step < S")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--min-loss", type=float, metavar="X",
                   help="keep entries whose Pilot loss is > X")
    g.add_argument("--only-mistakes", action="store_true",
                   help="keep entries with a target token whose stored top-1 is not the label")
    p.add_argument("--max-bytes", type=parse_bytes, metavar="B",
                   help="drop the oldest steps until the estimated stored size is <= B "
                   "(e.g. 500M, 10G; counted over what the other policies keep)")
    p.add_argument("--apply", action="store_true", help="rewrite the log (default: dry run)")
    p = _sub(sub, "compact", "rewrite into a fresh store (reclaim space, rechunk, recode)",
             "Rewrites the log into <PATH>.tcp-compact, verifies it, swaps it in atomically and "
             "only then removes the original. A rerun cleans up after an interrupted one. With "
             "the log's own options, sealed chunks are copied as bytes (each CRC32C-checked); "
             "new options re-encode everything and decode the copy to verify it.")
    p.add_argument("path")
    _codec_flags(p)
    p.add_argument("--merge-ranks", action="store_true",
                   help="one shard for all ranks, entries ordered by step (stable merge)")
    p = _sub(sub, "export", "selected entries to Parquet or .npz",
             "One Parquet row per entry (list columns for token and prompt rows) or one .npz of "
             "flat arrays; layouts in tcp/log_tools/export.py. Selections combine.")
    p.add_argument("path")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.parquet or FILE.npz")
    p.add_argument("--steps", type=parse_steps, metavar="A:B",
                   help="steps A <= step < B (A: or :B leave an end open)")
    p.add_argument("--rank", type=int, metavar="R", help="only rank R's shard")
    p.add_argument("--sample-ids", type=parse_ids, metavar="I,J,...",
                   help="only these dataset indices")
    p.add_argument("--force", action="store_true", help="overwrite FILE")
    p = _sub(sub, "merge", "combine logs of several runs into a new store",
             "Logs of one Pilot family (same d_model, topk, state dtype) into a new store OUT "
             "(must not exist or be empty), one shard per (source, rank); the mapping is in "
             "OUT's root attrs. Verified at the end.")
    p.add_argument("out", metavar="OUT")
    p.add_argument("sources", nargs="+", metavar="SRC")
    _codec_flags(p)
    return ap


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _codec_opts(a: argparse.Namespace, merge_ranks: bool = False) -> Any:
    from tcp.log_tools.compact import CompactOptions  # zarr and torch: not for --help

    return CompactOptions(chunk_mib=a.chunk_mib, compressor=a.compressor, level=a.level,
                          shard_chunks=a.shard_chunks, merge_ranks=merge_ranks)


def run(a: argparse.Namespace) -> int:
    """Execute a parsed command; returns the exit code."""
    # The verbs load zarr and torch: imported here so that `tcp-log --help` stays instant.
    from tcp.log_tools import export, merge, prune, summary
    from tcp.log_tools.compact import compact
    from tcp.log_tools.select import PrunePolicy

    t0 = time.perf_counter()
    if a.cmd == "info":
        d = summary.describe(a.path)
        print(json.dumps(d, indent=2, default=str) if a.json else summary.info_text(d))
        return 0
    if a.cmd == "verify":
        text, ok = summary.verify_text(a.path, full=not a.quick)
        print(text)
        return 0 if ok else 1
    if a.cmd == "prune":
        policy = PrunePolicy(keep_last_steps=a.keep_last_steps, before_step=a.before_step,
                             min_loss=a.min_loss, only_mistakes=a.only_mistakes,
                             max_bytes=a.max_bytes)
        if not a.apply:
            print("\n".join(prune.dry_run(a.path, policy)[1]))
            return 0
        out = prune.apply(a.path, policy, say=_say)
        if out is None:
            print(f"prune {a.path}: every entry is kept; the log is unchanged")
        else:
            print(f"pruned {out.path}: {out.entries_before} -> {out.entries_after} entries, "
                  f"{human_bytes(out.stored_before)} -> {human_bytes(out.stored_after)} stored "
                  f"({time.perf_counter() - t0:.1f} s)")
        return 0
    if a.cmd == "compact":
        out = compact(a.path, _codec_opts(a, a.merge_ranks), say=_say)
        dt = time.perf_counter() - t0
        print(f"compacted {out.path}: {out.entries_after} entries, "
              f"{human_bytes(out.stored_before)} -> {human_bytes(out.stored_after)} stored "
              f"({dt:.1f} s, {out.stored_before / 2**20 / max(dt, 1e-9):.1f} MiB/s read)")
        return 0
    if a.cmd == "export":
        sel = export.Selection(steps=a.steps, rank=a.rank, sample_ids=a.sample_ids)
        n = export.export(a.path, a.out, sel, force=a.force)
        print(f"exported {n} entries to {a.out}")
        return 0
    res = merge.merge(a.out, a.sources, _codec_opts(a), say=_say)
    print(f"merged {len(a.sources)} logs into {res.out}: {res.shards} shards, {res.entries} "
          f"entries, {human_bytes(res.stored_bytes)} stored (verified)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`tcp-log ...`; returns the exit code."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except RunError as e:
        print(f"{e.kind} error: {e}", file=sys.stderr)
    except Exception as e:
        # only on this failure path (zarr, torch)
        from tcp.log_tools.checks import damaged
        from tcp.mistake_log.format import MistakeLogCorrupt

        if not isinstance(e, MistakeLogCorrupt):
            raise
        # A damaged log that the command did not already explain.
        where = str(getattr(args, "path", None) or getattr(args, "out", "?"))
        print(f"log error: {damaged(Path(where), e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
