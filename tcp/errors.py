"""Errors an operator fixes: reported as one line, exit code 2, nothing lost.

Every module raises its own subclass (a resume that does not fit, a folder in use, a disk that
filled up); the entry points (`tcp.cli.tcp_train`, `tcp.cli.tcp_eval`) print `<kind> error:
<message>` and exit
2 for any of them. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A problem with the run's input or environment, not with tcp; the message says the fix."""

    kind = "run"
    """The word before "error:" on the printed line."""
