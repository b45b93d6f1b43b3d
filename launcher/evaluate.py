"""Entry point: `python launcher/evaluate.py <run> [--pilot <run>] [k=v ...]` (= `tcp-eval`).

Thin on purpose: everything lives in `tcp.eval_cli`.
"""

import sys

from tcp.eval_cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
