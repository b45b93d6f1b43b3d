"""Inspect and verify Mistake Log stores.

    .venv/bin/python tools/mistake_log.py info   runs/default/mistake_log
    .venv/bin/python tools/mistake_log.py verify runs/default/mistake_log [--quick]

`info` reads only the manifests. `verify` also decodes every committed chunk (each carries a
CRC32C), recomputes each array's digest against the manifest, and checks steps and offsets;
it exits 1 if anything is corrupt. Both report entries written after the last commit (an
interrupted writer), which readers ignore.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tcp.mistake_log.maintenance import info, verify


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="manifest-level summary (cheap)")
    p_info.add_argument("path")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_ver = sub.add_parser("verify", help="decode and check every committed entry")
    p_ver.add_argument("path")
    p_ver.add_argument("--quick", action="store_true", help="manifests and metadata only")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "info":
            if args.json:
                print(json.dumps(info(args.path), indent=2, default=str))
            else:
                print(verify(args.path, full=False).summary())
            return 0
        rep = verify(args.path, full=not args.quick)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep.summary())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
