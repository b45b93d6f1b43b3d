"""`tcp-launch`: run a launch command (`deepspeed ...`) so that a stop signal always ends in a
checkpoint and the command's processes are waited for.

    tcp-launch deepspeed --num_gpus 8 launcher/train.py --config configs/llama3.2-3b+1b.yaml

Why: Kubernetes sends SIGTERM to the container's first process only, and a first process with
no handler ignores it (the kernel's rule for PID 1), so a bare `deepspeed` as the container
command is SIGKILLed at the end of the grace period with no checkpoint. And when the runner
does exit, the container ends and its remaining processes are killed at once.

What it does: it becomes a child subreaper (Linux), starts the command, forwards SIGTERM/SIGINT
to it, and waits until every process it started, orphans included, has exited. The ranks treat
the runner's exit like SIGTERM (tcp.runtime.preemption.LauncherWatch), write one checkpoint and exit
143. Exit code: 128 + the signal when one was received, else the command's own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux >= 3.4); False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def supervise(cmd: list[str]) -> int:
    """Run `cmd`, forward stop signals to it, wait for every descendant. Returns the exit
    code."""
    become_subreaper()
    child = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not received:
            print(f"[tcp-launch] signal {signum}: forwarded to {cmd[0]} (pid {child.pid}); "
                  "waiting for the ranks' checkpoint", file=sys.stderr, flush=True)
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    status = None
    while True:  # every child, the command and any orphan re-parented to us
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            status = st
            child.returncode = os.waitstatus_to_exitcode(st)
    if received:
        return 128 + received[0]
    code = os.waitstatus_to_exitcode(status) if status is not None else 1
    return 128 - code if code < 0 else code


USAGE = """usage: tcp-launch [--] <command ...>

Runs the command (e.g. `deepspeed --num_gpus 8 launcher/train.py --config C.yaml`), forwards
SIGTERM/SIGINT to it and waits until all of its processes have exited, so a stop signal ends in
one checkpoint. Use it as a container's command under Kubernetes (docs/cluster.md). Exit code:
128 + the signal when one was received, else the command's."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of `tcp-launch`."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
