"""Regenerate docs/config.md, the configuration reference, from the config dataclasses.

    python tools/gen_config_doc.py           # write docs/config.md
    python tools/gen_config_doc.py --check   # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tcp.config.reference import render_reference

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gen_config_doc.py", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only check that the file is current")
    args = p.parse_args(argv)
    text = render_reference(ROOT / "configs" / "default.yaml")
    out = ROOT / "docs" / "config.md"
    if args.check:
        current = out.is_file() and out.read_text() == text
        fix = "out of date; run python tools/gen_config_doc.py"
        print(f"{out}: {'current' if current else fix}")
        return 0 if current else 1
    out.write_text(text)
    print(f"wrote {out} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
