"""Errors an operator fixes: reported as one line, exit code 2, nothing lost.

Every module raises its own subclass (a resume that does not fit, a folder in use, a disk that
filled up); the entry points (`tcp.cli.tcp_train`, `tcp.cli.tcp_eval`) print
`<kind> error: <message>` and exit 2 for any of them. Anything else is a bug and keeps its
traceback. `one_line` puts a cause (an OSError, say) into such a message.
"""

from __future__ import annotations

import errno


class RunError(RuntimeError):
    """A problem with the run's input or environment, not with tcp; the message says the fix."""

    kind = "run"
    """The word before "error:" on the printed line."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception in one short line: an OSError as `strerror [ENAME]`, anything else as
    `Type: text` with whitespace collapsed, cut at `limit` characters."""
    if isinstance(error, OSError) and error.strerror:
        name = errno.errorcode.get(error.errno or 0, str(error.errno))
        return f"{error.strerror} [{name}]"
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
