"""Where tcp caches what it builds once per machine (the base models of the embedded default):
`$TCP_CACHE_DIR`, else `$XDG_CACHE_HOME/tcp`, else `~/.cache/tcp`, as Hugging Face places its
own cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """tcp's cache folder (not created here)."""
    env = os.environ if env is None else env
    if env.get("TCP_CACHE_DIR"):
        return Path(env["TCP_CACHE_DIR"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "tcp"
