"""Claiming the run's folders on 2 real gloo ranks: a folder in use fails on every rank, and a
folder that is not shared (each rank sees its own copy of the path) is detected."""

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tcp.config import load_config
from tcp.errors import RunError
from tcp.runtime.run_lock import LOCK_NAME, RunLock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, outs: list[str], results) -> None:
    from tcp.runtime.run_folder import claim_folders

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(None, [f"output_dir={outs[rank]}"])
        held = claim_folders(cfg, rank=rank)
        results.put((rank, "ok", len(held.locks)))
        dist.barrier()
        held.release()
    except Exception as e:
        # an operator error (exit 2) on every rank, whatever its subclass
        results.put((rank, "RunError" if isinstance(e, RunError) else type(e).__name__, str(e)))
    finally:
        dist.destroy_process_group()


def claim_on_two_ranks(outs: list[str]) -> dict[int, tuple[str, object]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(_rank, args=(_free_port(), outs, results), nprocs=2, join=True,
                       start_method="spawn")
    got = {}
    for _ in range(2):
        r, kind, what = results.get(timeout=60)
        got[r] = (kind, what)
    return got


@pytest.mark.slow
def test_a_shared_folder_is_claimed_and_a_non_shared_one_refused_on_every_rank(tmp_path):
    shared = str(tmp_path / "shared")
    got = claim_on_two_ranks([shared, shared])
    assert got == {0: ("ok", 2), 1: ("ok", 0)}  # rank 0 holds output_dir and the log folder
    assert not (tmp_path / "shared" / LOCK_NAME).exists()  # released
    # The same path, but rank 1's node sees another filesystem.
    got = claim_on_two_ranks([str(tmp_path / "node0"), str(tmp_path / "node1")])
    for rank in (0, 1):
        kind, msg = got[rank]
        assert kind == "RunError" and msg.startswith("rank 1: ")
        assert "does not show the files rank 0 writes there" in msg
    assert not (tmp_path / "node0" / LOCK_NAME).exists()  # rank 0 gave its locks back


@pytest.mark.slow
def test_a_folder_in_use_fails_on_every_rank(tmp_path):
    live = RunLock(tmp_path / "run").acquire()
    try:
        got = claim_on_two_ranks([str(tmp_path / "run")] * 2)
    finally:
        live.release()
    assert {r: k for r, (k, _) in got.items()} == {0: "RunError", 1: "RunError"}
    assert all("in use by a running tcp run" in str(m) for _, m in got.values())
