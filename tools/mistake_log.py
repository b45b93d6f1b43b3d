"""Inspect, prune, compact, export and merge Mistake Logs: the same command as `tcp-log`.

    .venv/bin/python tools/mistake_log.py info   runs/default/mistake_log
    .venv/bin/python tools/mistake_log.py verify runs/default/mistake_log [--quick]
    .venv/bin/python tools/mistake_log.py --help

See tcp/cli/tcp_log.py and docs/mistake_log.md ("Tools: tcp-log").
"""

from __future__ import annotations

from tcp.cli.tcp_log import main

if __name__ == "__main__":
    raise SystemExit(main())
