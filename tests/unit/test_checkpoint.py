"""Composite checkpoints without DeepSpeed: completeness, rotation, resolution, signals, faults.
(The real engines are exercised by tests/distributed/test_resume.py.)"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tcp.config import CheckpointConfig
from tcp.errors import one_line
from tcp.runtime.faults import _plan
from tcp.runtime.tracking import parse_tags
from tcp.runtime.write_guard import WriteFailure
from tcp.training.checkpoint import CheckpointManager
from tcp.training.checkpoint_layout import (
    CheckpointError,
    CheckpointWriteError,
    list_checkpoints,
    read_complete,
)
from tcp.training.rng_state import rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[2]


class FakeEngine:
    """The two DeepSpeed engine methods the manager calls, writing files the same way, and the
    wrapped module (one trainable parameter)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.module = torch.nn.Linear(1, 1)

    def save_checkpoint(self, save_dir: str, tag: str, **_: bool) -> None:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"value": self.value}, d / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir: str, tag: str, **_: bool):
        p = Path(load_dir) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        self.value = torch.load(p)["value"]
        return str(p), {}


def save(m: CheckpointManager, step: int, value: float = 0.0):
    return m.save(step, pilot=FakeEngine(value), copilot=FakeEngine(-value),
                  trainer_state={"rank": 0, "step": step}, meta={"mlflow_run_id": "abc"})


def test_save_load_rotation_and_latest(tmp_path):
    m = CheckpointManager(CheckpointConfig(keep_last=2), tmp_path, rank=0, world=1)
    for step in (2, 4, 6):
        save(m, step, value=float(step))
    done, partial = list_checkpoints(m.root)
    assert [i.step for i in done] == [4, 6] and not partial  # keep_last=2
    assert (m.root / "latest").read_text().strip() == "step_00000006"
    info = m.resolve("auto")
    assert info.step == 6 and info.manifest["mlflow_run_id"] == "abc"
    p, c = FakeEngine(), FakeEngine()
    state = m.load(info, pilot=p, copilot=c)
    assert state == {"rank": 0, "step": 6} and (p.value, c.value) == (6.0, -6.0)
    assert m.resolve(str(m.root / "step_00000004")).step == 4  # an explicit folder
    assert m.resolve(str(m.root)).step == 6  # a checkpoint directory: its newest


def test_checkpoint_without_manifest_is_never_resumed(tmp_path, monkeypatch):
    m = CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world=1)
    save(m, 4)
    # Die after the parts are written but before the manifest (what kill@checkpoint does).
    monkeypatch.setenv("TCP_FAULT_INJECT", "term@checkpoint=8")
    got = []
    old = signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    try:
        monkeypatch.setattr("tcp.training.checkpoint.atomic_write_json",
                            lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            save(m, 8)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [1]  # the fault point fired between the parts and the manifest
    assert (m.root / "step_00000008" / "trainer_rank0.pt").exists()
    assert read_complete(m.root / "step_00000008") is None
    assert m.resolve("auto").step == 4
    assert (m.root / "latest").read_text().strip() == "step_00000004"
    monkeypatch.undo()
    save(m, 12)  # the next save removes the incomplete folder
    assert not (m.root / "step_00000008").exists()


def test_prepare_fresh_and_resumed(tmp_path):
    m = CheckpointManager(CheckpointConfig(keep_last=5), tmp_path, rank=0, world=1)
    for step in (2, 4, 6):
        save(m, step)
    (m.root / "step_00000008").mkdir()  # incomplete
    m.prepare(m.resolve(str(m.root / "step_00000004")))
    done, partial = list_checkpoints(m.root)
    assert [i.step for i in done] == [2, 4] and not partial  # the abandoned future is gone
    assert (m.root / "latest").read_text().strip() == "step_00000004"
    m.prepare(None)  # a fresh run replaces the previous run's checkpoints
    assert list_checkpoints(m.root) == ([], []) and not (m.root / "latest").exists()
    assert m.resolve("auto") is None  # auto with nothing to resume: start fresh


def test_resolve_refuses_what_does_not_fit(tmp_path):
    m = CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world=2)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        m.resolve(str(tmp_path / "nowhere"))
    m1 = CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world=1)
    save(m1, 3)
    with pytest.raises(CheckpointError, match=r"written by 1 ranks, this launch has 2.*"
                                              r"zero_to_fp32"):
        m.resolve("auto")
    man = json.loads((m.root / "step_00000003" / "manifest.json").read_text())
    man["version"] = 99
    (m.root / "step_00000003" / "manifest.json").write_text(json.dumps(man))
    assert m1.resolve("auto") is None


def test_rng_state_round_trip():
    s = rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(s)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_fault_plan_parsing():
    plan = _plan("kill@step=6, term@checkpoint=8:rank=1")
    assert plan[("step", 6)] == [(signal.SIGKILL, None)]
    assert plan[("checkpoint", 8)] == [(signal.SIGTERM, 1)]
    with pytest.raises(ValueError, match="TCP_FAULT_INJECT"):
        _plan("explode@step=1")


def test_fault_hold_waits_for_the_release_file(tmp_path, monkeypatch):
    import threading
    import time

    from tcp.runtime.faults import fault_point

    release = tmp_path / "release"
    monkeypatch.setenv("TCP_FAULT_INJECT", "hold@step=3")
    monkeypatch.setenv("TCP_FAULT_RELEASE", str(release))
    fault_point("step", step=2, rank=0)  # not the held step: returns at once
    threading.Timer(0.5, release.touch).start()
    t0 = time.monotonic()
    fault_point("step", step=3, rank=0)
    assert release.exists() and time.monotonic() - t0 >= 0.4


def test_mlflow_tags_from_environment_formats():
    assert parse_tags('{"team": "nlp", "n": 3}') == {"team": "nlp", "n": "3"}
    assert parse_tags("team=nlp, exp = a=b") == {"team": "nlp", "exp": "a=b"}
    assert parse_tags(None) == {}
    with pytest.raises(ValueError, match="MLFLOW_TAGS"):
        parse_tags("novalue")


def test_collective_timeout_fails_instead_of_hanging(tmp_path):
    """A rank that never joins the collective: the other fails after collective_timeout_s."""
    code = textwrap.dedent("""
        import os, sys, time
        import torch.distributed as dist
        from tcp.runtime.process_group import init_distributed
        rank, world, _ = init_distributed(timeout_s=3)
        if rank == 1:
            time.sleep(20)
            sys.exit(0)
        t = time.time()
        try:
            dist.barrier()
        except Exception as e:
            print(f"failed after {time.time() - t:.1f}s: {type(e).__name__}", flush=True)
            os._exit(7)
        print("barrier passed", flush=True)
    """)
    port = str(29700 + os.getpid() % 200)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    out0, _ = procs[0].communicate(timeout=120)
    procs[1].kill()
    assert procs[0].returncode == 7, out0[-2000:]
    secs = float(out0.split("failed after ")[1].split("s:")[0])
    assert 2.5 <= secs < 15


class FailingWrites:
    """A DeepSpeed checkpoint engine (the `save` and `makedirs` DeepSpeed writes through)
    whose `save` fails with `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def save(self, state_dict, path: str) -> None:
        raise self.error

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)


class GuardedEngine(FakeEngine):
    """Writes its model states through its checkpoint engine, as DeepSpeed does."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.checkpoint_engine = FailingWrites(error)

    def save_checkpoint(self, save_dir: str, tag: str, **_: bool) -> None:
        d = Path(save_dir) / tag
        self.checkpoint_engine.makedirs(str(d), exist_ok=True)
        self.checkpoint_engine.save({"value": 1}, str(d / "zero_pp_rank_0_model_states.pt"))
        self.reached_the_end = True  # the write failure did not leave the save half way


def test_a_failed_write_raises_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    m = CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world=1)
    save(m, 4)
    cause = RuntimeError("[enforce fail at inline_container.cc:672] .\n unexpected pos 576")
    pilot = GuardedEngine(OSError(28, "No space left on device"))
    with pytest.raises(CheckpointWriteError) as got:
        m.save(8, pilot=pilot, copilot=GuardedEngine(cause), trainer_state={"rank": 0},
               meta={})
    msg = str(got.value)
    assert got.value.kind == "checkpoint" and "\n" not in msg
    assert msg.startswith(f"writing checkpoint {m.root / 'step_00000008'} failed on rank 0 on ")
    assert ("(disk full, No space left on device [ENOSPC], writing pilot/step_00000008/"
            "zero_pp_rank_0_model_states.pt; ") in msg and " GiB free on " in msg
    assert msg.endswith("the previous checkpoint step_00000004 stays the latest; free space "
                        "(or raise the quota) and continue with resume=auto")
    assert pilot.reached_the_end and "save" not in vars(pilot.checkpoint_engine)  # unpatched
    assert not (m.root / "step_00000008").exists()
    assert (m.root / "latest").read_text().strip() == "step_00000004"
    assert m.resolve("auto").step == 4
    save(m, 12)  # once there is room again, saving goes on
    assert m.resolve("auto").step == 12


def test_a_failed_trainer_file_write_is_caught_too(tmp_path, monkeypatch):
    m = CheckpointManager(CheckpointConfig(), tmp_path, rank=0, world=1)

    def full(*_a, **_k):
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr("tcp.training.checkpoint._atomic_torch_save", full)
    with pytest.raises(CheckpointWriteError, match=r"\(disk full, Disk quota exceeded \[EDQUOT\], "
                       r"writing trainer_rank0.pt; .*there is no earlier checkpoint"):
        save(m, 2)
    assert not (m.root / "step_00000002").exists() and not (m.root / "latest").exists()


def test_write_failure_causes_in_words(tmp_path, monkeypatch):
    f = tmp_path / "x.pt"
    f.write_bytes(b"0" * 4096)
    plenty = 100 * 2**30
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5")
    cause, fix = WriteFailure(f, torch_error, plenty).cause()
    assert cause == "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 5"
    assert "fix the storage" in fix
    cause, fix = WriteFailure(f, torch_error, 2**20).cause()  # no errno, but no room either
    assert (cause, fix) == ("disk full", "free space (or raise the quota)")
    monkeypatch.setattr("tcp.runtime.write_guard.file_size_limit", lambda: 4096)
    cause, fix = WriteFailure(f, torch_error, plenty).cause()
    assert cause == "file size limit reached, ulimit -f allows 0.0 MiB per file"
    assert "ulimit -f" in fix
    cause, _ = WriteFailure(f, OSError(27, "File too large"), plenty).cause()
    assert cause.endswith("per file, File too large [EFBIG]")
    assert len(one_line(RuntimeError("a\n" * 500))) == 200


def test_rank_0_fsyncs_only_its_own_and_shared_files(tmp_path, monkeypatch):
    """Another rank's trainer file (and its temp file, renamed away at any moment: rank 0 once
    failed with ENOENT here) is that rank's to fsync, never rank 0's."""
    names = ["trainer_rank0.pt", "trainer_rank1.pt", ".trainer_rank1.pt.tmp", "latest",
             "pilot/step_1/zero_pp_rank_0_mp_rank_00_model_states.pt",
             "pilot/step_1/zero_pp_rank_1_mp_rank_00_model_states.pt"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text("x")
    synced: dict[int, set[str]] = {}
    for rank in (0, 1):
        seen: set[str] = set()
        monkeypatch.setattr("tcp.training.checkpoint.fsync_path",
                            lambda p, seen=seen: seen.add(str(p.relative_to(tmp_path))))
        CheckpointManager(CheckpointConfig(), tmp_path, rank=rank, world=2)._fsync_mine(tmp_path)
        synced[rank] = {s for s in seen if (tmp_path / s).is_file()}
    assert synced[0] == {"trainer_rank0.pt", "latest",
                         "pilot/step_1/zero_pp_rank_0_mp_rank_00_model_states.pt"}
    assert synced[1] == {"trainer_rank1.pt",
                         "pilot/step_1/zero_pp_rank_1_mp_rank_00_model_states.pt"}
