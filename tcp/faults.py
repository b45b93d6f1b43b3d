"""Fault injection for the fault-tolerance tests: deterministic kills at named points.

Set `TCP_FAULT_INJECT` to a comma-separated list of `action@point=step[:rank=r]`, e.g.

    TCP_FAULT_INJECT="kill@step=6"              every rank SIGKILLs itself after step 6's
                                                Mistake Log append (before its backward)
    TCP_FAULT_INJECT="kill@checkpoint=8"        SIGKILL while the step-8 checkpoint is being
                                                written (parts on disk, manifest not yet)
    TCP_FAULT_INJECT="term@step=5:rank=1"       rank 1 sends itself SIGTERM at step 5

Actions: kill (SIGKILL), term (SIGTERM). Unset in normal runs, where `fault_point` is a dict
lookup. Real signals are sent, so the code under test is the code that runs in production.
"""

from __future__ import annotations

import os
import signal
from functools import cache

_ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}


@cache
def _plan(spec: str) -> dict[tuple[str, int], list[tuple[signal.Signals, int | None]]]:
    plan: dict[tuple[str, int], list[tuple[signal.Signals, int | None]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            action, rest = item.split("@", 1)
            where, *opts = rest.split(":")
            point, step = where.split("=")
            rank = None
            for o in opts:
                k, v = o.split("=")
                if k != "rank":
                    raise ValueError(k)
                rank = int(v)
            plan.setdefault((point, int(step)), []).append((_ACTIONS[action], rank))
        except (ValueError, KeyError):
            raise ValueError(f"TCP_FAULT_INJECT: cannot parse {item!r}; expected "
                             "action@point=step[:rank=r], action kill|term") from None
    return plan


def fault_point(point: str, *, step: int, rank: int) -> None:
    """Send the planned signal to this process if `TCP_FAULT_INJECT` names (point, step)."""
    spec = os.environ.get("TCP_FAULT_INJECT")
    if not spec:
        return
    for sig, only in _plan(spec).get((point, step), []):
        if only is None or only == rank:
            os.kill(os.getpid(), sig)
