"""Entry point: `python launcher/evaluate.py <run> [--pilot <run>] [k=v ...]` (= `tcp-eval`).

Thin on purpose: everything lives in `tcp.cli.tcp_eval`.
"""

import sys

from tcp.cli.tcp_eval import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
