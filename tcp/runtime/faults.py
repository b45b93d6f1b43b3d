"""Fault injection for the fault-tolerance tests: deterministic kills at named points.

Set `TCP_FAULT_INJECT` to a comma-separated list of `action@point=step[:rank=r]`, e.g.

    TCP_FAULT_INJECT="kill@step=6"              every rank SIGKILLs itself after step 6's
                                                Mistake Log append (before its backward)
    TCP_FAULT_INJECT="kill@checkpoint=8"        SIGKILL while the step-8 checkpoint is being
                                                written (parts on disk, manifest not yet)
    TCP_FAULT_INJECT="term@step=5:rank=1"       rank 1 sends itself SIGTERM at step 5

    TCP_FAULT_INJECT="hold@step=3"              every rank waits at step 3 until the file named
                                                by TCP_FAULT_RELEASE exists (a test acting on a
                                                run that must still be live, on a slow machine)

Actions: kill (SIGKILL), term (SIGTERM), hold (wait for the release file, at most 600 s). Unset
in normal runs, where `fault_point` is a dict lookup. Real signals are sent, so the code under
test is the code that runs in production.
"""

from __future__ import annotations

import os
import signal
import time
from functools import cache

HOLD = -1
"""The `hold` action's marker in a plan (not a signal)."""
_ACTIONS = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "hold": HOLD}
HOLD_LIMIT_S = 600.0


@cache
def _plan(spec: str) -> dict[tuple[str, int], list[tuple[int, int | None]]]:
    plan: dict[tuple[str, int], list[tuple[int, int | None]]] = {}
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
                             "action@point=step[:rank=r], action kill|term|hold") from None
    return plan


def fault_point(point: str, *, step: int, rank: int) -> None:
    """Send the planned signal to this process (or hold it) if `TCP_FAULT_INJECT` names
    (point, step)."""
    spec = os.environ.get("TCP_FAULT_INJECT")
    if not spec:
        return
    for sig, only in _plan(spec).get((point, step), []):
        if only is not None and only != rank:
            continue
        if sig == HOLD:
            _hold(os.environ.get("TCP_FAULT_RELEASE", ""))
        else:
            os.kill(os.getpid(), sig)


def _hold(release: str) -> None:
    if not release:
        raise ValueError("TCP_FAULT_INJECT hold@...: set TCP_FAULT_RELEASE to the file that "
                         "releases the hold")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.1)
