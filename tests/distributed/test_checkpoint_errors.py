"""Checkpoint storage failures end as one line and exit 2 on every rank, with nothing lost.

- A write that really fails (a per-file size limit, RLIMIT_FSIZE: Python ignores SIGXFSZ, so
  the write fails with EFBIG the way a full disk fails with ENOSPC) in a real 2-rank DeepSpeed
  run: on both ranks, or on one rank only (the other waits in DeepSpeed's barriers and must
  not hang). No mocking and no fault injection.
- A checkpoint directory that is not one folder for every rank (each rank given its own),
  with 2 real gloo processes: `check_shared` and `save` refuse it on every rank.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tcp.training.checkpoint_layout import read_complete
from tests.distributed.test_resume import NO_MLFLOW, TINY
from tests.helpers import JOINT_ONLY, ROOT, launch

MiB = 2**20
FILE_LIMIT = 3 * MiB
"""Per-file size limit of the failing runs. A TINY run (measured): the MLflow db ~1.0 MB, the
Mistake Log chunks < 0.1 MB, config/tokenizer/trainer/model-states files < 0.1 MB; the ZeRO
optimizer partitions ~4.9 MB per rank and engine. So the step-8 checkpoint is the first write
over the limit (final/ models, ~3.3 MB, come after it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _limit_file_size(limit: int) -> None:
    """preexec_fn: writes past `limit` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _run_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def launch_limited(run_dir: Path, *overrides: str, limit: int,
                   timeout: int = 400) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 launcher/train.py` like tests.helpers.launch, with every process
    (launcher and ranks) under a per-file size limit of `limit` bytes."""
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "launcher/train.py"), "--config", str(ROOT / "configs/default.yaml"),
           JOINT_ONLY, f"output_dir={run_dir}", f"tracking.uri=sqlite:///{run_dir}.db", *overrides]
    return subprocess.run(cmd, cwd=run_dir.parent, env=_run_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=lambda: _limit_file_size(limit))


def launch_ranks(run_dir: Path, *overrides: str, limits: dict[int, int],
                 timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """The two ranks started directly (no DeepSpeed launcher that would end the others when one
    exits: each must exit on its own), rank r under a per-file size limit `limits[r]` if
    given. Returns each rank's completed process."""
    port = str(_free_port())
    cmd = [sys.executable, str(ROOT / "launcher/train.py"), "--config",
           str(ROOT / "configs/default.yaml"), JOINT_ONLY, f"output_dir={run_dir}", *overrides]
    procs, logs = [], []
    for rank in (0, 1):
        env = {**_run_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        limit = limits.get(rank)
        # Files, not pipes: a rank blocked on a full pipe would stall the other in a collective.
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(subprocess.Popen(
            cmd, cwd=run_dir.parent, env=env, stdout=out, stderr=err, text=True,
            preexec_fn=None if limit is None else lambda n=limit: _limit_file_size(n)))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    done = []
    for p, (out, err) in zip(procs, logs, strict=True):
        out.seek(0)
        err.seek(0)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return done


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("checkpoint error: ")]


def assert_clean_failure(stderr: str, *, rank: int, previous: str | None) -> str:
    """stderr holds the one-line checkpoint error naming `rank` as the failed one and no
    traceback; returns the line."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = error_lines(stderr)
    assert lines, stderr[-4000:]
    line = lines[0]
    assert f"failed on rank {rank}" in line and "file size limit reached" in line, line
    assert "GiB free on" in line and "continue with resume=auto" in line, line
    if previous:
        assert f"the previous checkpoint {previous} stays the latest" in line, line
    return line


@pytest.mark.distributed
@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path):
    """Steps 1-4 and their checkpoint, then a resume to step 8 under the limit: the step-8
    checkpoint fails on both ranks (DeepSpeed launcher), exit 2, one line, step 4 intact."""
    run = tmp_path / "run"
    launch(run, *TINY, "train.steps=4")
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000004"
    big = [p for p in run.rglob("*") if p.is_file() and p.stat().st_size > FILE_LIMIT]
    assert big and all("optim_states" in p.name or "final" in p.parts for p in big), big
    p = launch_limited(run, *TINY, "train.steps=8", "resume=auto", limit=FILE_LIMIT)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "step_00000004 at step 4" in p.stdout  # it did resume, and trained on
    line = assert_clean_failure(p.stderr, rank=0, previous="step_00000004")
    assert "checkpoint" in line and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in line, line
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert not (ckpts / "step_00000008").exists()
    info = read_complete(ckpts / "step_00000004")
    assert info is not None and info.step == 4


@pytest.mark.distributed
@pytest.mark.slow
def test_one_rank_failing_to_write_ends_both_without_a_hang(tmp_path):
    """Only rank 1 is limited (ranks started directly: no launcher ends rank 0 for it). Rank 0
    writes its parts and waits in DeepSpeed's barriers; both ranks agree and exit 2 with rank
    1's message; no checkpoint is left, none was before."""
    run = tmp_path / "run"
    t0 = time.time()
    procs = launch_ranks(run, *TINY, NO_MLFLOW, "train.steps=4", "train.collective_timeout_s=120",
                         limits={1: FILE_LIMIT})
    took = time.time() - t0
    for rank, p in enumerate(procs):
        assert p.returncode == 2, (rank, p.stdout[-3000:], p.stderr[-3000:])
        line = assert_clean_failure(p.stderr, rank=1, previous=None)
        assert "there is no earlier checkpoint" in line, line
    assert took < 110  # no collective waited for its timeout
    ckpts = run / "checkpoints"
    assert not (ckpts / "step_00000004").exists() and not (ckpts / "latest").exists()


WORKER = textwrap.dedent("""
    import json, os, sys
    from datetime import timedelta
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import tcp.training.checkpoint as ck
    from tcp.runtime.shared_storage import PROBE
    from tcp.config import CheckpointConfig

    class Engine:  # DeepSpeed's save structure: barrier, writes via its checkpoint engine, barrier
        def __init__(self, fail):
            self.module = torch.nn.Linear(1, 1)
            self.checkpoint_engine = self
            self.fail = fail

        def save(self, state_dict, path):
            if self.fail:
                raise OSError(28, "No space left on device")
            torch.save(state_dict, path)

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

        def save_checkpoint(self, save_dir, tag, **_):
            dist.barrier()
            d = Path(save_dir) / tag
            self.checkpoint_engine.makedirs(d, exist_ok=True)
            self.checkpoint_engine.save({"w": 1}, str(d / f"zero_pp_rank_{rank}_model_states.pt"))
            dist.barrier()

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    scenario, roots = sys.argv[1], sys.argv[2:]
    ck.VISIBILITY_WAIT_S = 0.5
    m = ck.CheckpointManager(CheckpointConfig(dir=roots[rank]), Path("."), rank=rank, world=2)
    out = {"rank": rank}
    try:
        if scenario == "shared":
            m.check_shared(wait_s=1.0)
            out["probe_left"] = (m.root / PROBE).exists()
        else:
            def save(step, fail):
                e = Engine(fail)
                return m.save(step, pilot=e, copilot=e, trainer_state={"rank": rank},
                              meta={})
            save(2, False)
            save(4, scenario == "full" and rank == 1)
        out["ok"] = True
    except ck.CheckpointError as e:
        out.update(ok=False, type=type(e).__name__, kind=e.kind, msg=str(e))
    dist.barrier()
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()  # a gloo group torn down at interpreter exit can abort
""")


def run_gloo(scenario: str, roots: list[Path]) -> list[dict]:
    """WORKER on 2 gloo ranks; rank r uses checkpoint.dir roots[r]. Each rank's JSON result."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, scenario, *map(str, roots)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.distributed
def test_check_shared_passes_on_one_folder(tmp_path):
    root = tmp_path / "ckpt"
    results = run_gloo("shared", [root, root])
    assert all(r["ok"] for r in results), results
    assert not results[0]["probe_left"]  # rank 0 removes it once every rank has looked
    assert root.is_dir() and not any(root.iterdir())  # created, probe removed


@pytest.mark.distributed
def test_check_shared_refuses_a_folder_some_rank_does_not_see(tmp_path):
    a, b = tmp_path / "node_a" / "ckpt", tmp_path / "node_b" / "ckpt"
    results = run_gloo("shared", [a, b])
    # Every rank raises the same (each names its own checkpoint.dir: here they differ).
    assert results[0]["msg"] == results[1]["msg"].replace(str(b), str(a))
    for r in results:
        assert not r["ok"] and r["type"] == "CheckpointStorageError" and r["kind"] == "checkpoint"
        assert "not shared by every rank" in r["msg"] and "rank 1 on" in r["msg"]
        assert "the folder does not exist there" in r["msg"]
        assert "rank 0 on" in r["msg"] and "rank 0 on" not in r["msg"].split("; ", 1)[1]
        assert "checkpoint.dir" in r["msg"] and "every node mounts" in r["msg"]
        assert "\n" not in r["msg"]
    assert not (a / ".tcp-shared-probe").exists()


@pytest.mark.distributed
def test_save_on_a_folder_rank_0_does_not_see_fully_writes_no_manifest(tmp_path):
    a, b = tmp_path / "node_a" / "ckpt", tmp_path / "node_b" / "ckpt"
    results = run_gloo("split", [a, b])
    for r in results:
        assert not r["ok"] and r["type"] == "CheckpointStorageError", r
        assert "rank 0 on" in r["msg"] and "does not see trainer_rank1.pt (rank 1)" in r["msg"]
    assert not (a / "step_00000002").exists() and not (a / "latest").exists()


@pytest.mark.distributed
def test_a_write_failing_on_one_rank_raises_on_every_rank(tmp_path):
    """Rank 1's checkpoint engine fails (ENOSPC) between DeepSpeed-like barriers: both ranks
    pass them, agree, and raise rank 1's error; step 2 stays the latest."""
    root = tmp_path / "ckpt"
    results = run_gloo("full", [root, root])
    assert results[0]["msg"] == results[1]["msg"]
    for r in results:
        assert not r["ok"] and r["type"] == "CheckpointWriteError" and r["kind"] == "checkpoint"
        msg = r["msg"]
        assert msg.startswith(f"writing checkpoint {root / 'step_00000004'} failed on rank 1 on ")
        assert "(disk full, No space left on device [ENOSPC], writing pilot/step_00000004/" in msg
        assert "the previous checkpoint step_00000002 stays the latest" in msg
        assert msg.endswith("free space (or raise the quota) and continue with resume=auto")
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert read_complete(root / "step_00000002") is not None
    assert not (root / "step_00000004").exists()
