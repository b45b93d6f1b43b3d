"""Is a folder shared by every rank? Probes and waits for files another rank wrote (NFS clients
may cache a directory listing for a few seconds). Used by tcp.training.checkpoint."""

from __future__ import annotations

import os
import secrets
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tcp.errors import RunError, one_line
from tcp.runtime.atomic import atomic_write
from tcp.runtime.collective import distributed

PROBE = ".tcp-shared-probe"
"""File `check_shared` writes into the checkpoint directory (and removes)."""
VISIBILITY_WAIT_S = 10.0
"""How long a rank keeps looking for a file another rank wrote before it concludes that the
folder is not shared (NFS clients may cache a directory listing for a few seconds)."""


def visible(path: Path) -> bool:
    """Whether `path` exists, listing its folder first (an NFS client then revalidates a
    cached listing instead of trusting it)."""
    try:
        os.listdir(path.parent)
    except OSError:
        return False
    return path.exists()


def wait_visible(files: list[Path], wait_s: float) -> list[Path]:
    """Those of `files` still missing after looking for up to `wait_s` seconds."""
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        missing = [f for f in files if not visible(f)]
        left = deadline - time.monotonic()
        if not missing or left <= 0:
            return missing
        time.sleep(min(delay, left))
        delay = min(2 * delay, 1.0)


def probe_seen(path: Path, nonce: str, wait_s: float) -> str | None:
    """None when `path` holds `nonce` within `wait_s` seconds, else what is there instead."""
    deadline, delay = time.monotonic() + wait_s, 0.05
    while True:
        if not path.parent.is_dir():
            why = "the folder does not exist there"
        elif not visible(path):
            why = "the probe file is not there"
        else:
            try:
                why = None if path.read_text().strip() == nonce else \
                    "it holds another probe: a different folder at the same path"
            except OSError as e:
                why = one_line(e)
        left = deadline - time.monotonic()
        if why is None or left <= 0:
            return why
        time.sleep(min(delay, left))
        delay = min(2 * delay, 1.0)


def write_probe(path: Path, nonce: str) -> None:
    atomic_write(path, nonce + "\n")


def ranks_by_host(rows: list[tuple[int, str, str]], limit: int = 4) -> str:
    """`rank 1 on b (why); ranks 2, 3 on c (why)` from (rank, host, why) rows, grouped by host
    and reason, at most `limit` groups named."""
    groups: dict[tuple[str, str], list[int]] = {}
    for rank, host, why in rows:
        groups.setdefault((host, why), []).append(rank)
    parts = [f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))} on {host} ({why})"
             for (host, why), r in groups.items()]
    more = f"; and {len(parts) - limit} more hosts" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def check_shared(root: Path, *, rank: int, where: str, wait_s: float,
                 raises: type[RunError]) -> list[str]:
    """Check that every rank sees the same folder `root`. Collective. Rank 0 creates it and
    writes a probe file holding a random nonce; every rank looks for it for up to `wait_s`
    seconds; the ranks agree; rank 0 removes the probe. Returns each rank's host name. Raises
    `raises` on every rank, naming the ranks and hosts that could not see the probe, or saying
    why rank 0 could not create the folder; `where` names the setting that places it."""
    host = socket.gethostname()
    nonce: str | None = secrets.token_hex(16)
    problem: str | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            write_probe(root / PROBE, str(nonce))
        except OSError as e:
            nonce, problem = None, (f"cannot create {root} on rank 0 ({host}: {one_line(e)}); "
                                    f"{where} must be a writable folder on a filesystem every "
                                    "node mounts")
    box = [nonce, problem]  # rank 0's, on every rank; the probe is on disk from here on
    if distributed():
        dist.broadcast_object_list(box, src=0)
    nonce, problem = box
    if problem is not None:
        raise raises(problem)
    seen = probe_seen(root / PROBE, str(nonce), wait_s)
    every: list[Any] = [(host, seen)]
    if distributed():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (host, seen))
    hosts = [h for h, _ in every]
    if rank == 0:  # every rank has looked
        with suppress(OSError):
            (root / PROBE).unlink()
    blind = [(r, h, why) for r, (h, why) in enumerate(every) if why is not None]
    if blind:
        raise raises(f"{root} is not shared by every rank: rank 0 on {hosts[0]} wrote a probe "
                     f"file there; {ranks_by_host(blind)} could not see it within {wait_s:g}s; "
                     f"{where} must be on a filesystem every node mounts at the same path")
    return hosts
