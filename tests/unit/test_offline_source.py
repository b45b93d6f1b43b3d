"""Offline Copilot training's pure parts, on a fabricated finished run (a tiny Pilot, a
tokenizer, a config.yaml and a 2-shard Mistake Log of fake entries): the source checks that
must fail before any model loads, the steps trained on, and the data stream, which must be the
joint run's batch for batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tcp.cli.tcp_train import train_main
from tcp.config import ConfigError, dump_yaml, load_config
from tcp.mistake_log.disk import ZarrMistakeLog
from tcp.mistake_log.format import Schema, create_root
from tcp.mistake_log.shard_writer import RankStoreWriter
from tcp.runtime.run_lock import LockError, RunLock
from tcp.training.copilot_update import copilot_entries
from tcp.training.offline_job import RecordedStream
from tcp.training.offline_source import OfflineError, offline_config, open_source, recorded_steps
from tests.helpers import fake_entries, tiny_pilot
from tests.unit.test_zarr_store import SMALL, assert_same

STEPS = 6
RUN = ("base.enabled=false", "copilot.init_from=none", "model.init_from_base=false",
       "mistake_log.topk=3", f"train.steps={STEPS}", "mistake_log.replay_size=5",
       "mistake_log.window_steps=3", f"mistake_log.store.chunk_mib={SMALL}",
       "mistake_log.store.fsync=false")


def fake_source(tmp_path: Path, *, shards: int = 2, backend: str = "zarr") -> Path:
    """A finished run's folder: final Pilot (d=16), tokenizer, config.yaml, and a log of
    `shards` rank shards holding steps 0..STEPS-1."""
    src = tmp_path / "src"
    pilot, tok = tiny_pilot(d=16)
    pilot.save_pretrained(src / "final" / "pilot")
    tok.save_pretrained(src / "tokenizer")
    cfg = load_config(None, [f"output_dir={src}", *RUN, f"mistake_log.backend={backend}"])
    (src / "config.yaml").write_text(dump_yaml(cfg))
    if backend == "zarr":
        schema = Schema(16, 3, "float32")
        create_root(src / "mistake_log", schema)
        for rank in range(shards):
            w = RankStoreWriter(src / "mistake_log", rank, schema, cfg.mistake_log.store)
            for step in range(STEPS):
                w.append(fake_entries(step, rank=rank))
                w.commit()
    return src


def test_recorded_steps():
    assert recorded_steps(first=0, last=9, start=0, stop=10) == range(10)
    assert recorded_steps(first=0, last=9, start=3, stop=8) == range(3, 8)
    assert recorded_steps(first=4, last=9, start=0, stop=10) == range(4, 10)  # a pruned log
    with pytest.raises(OfflineError, match=r"copilot_tail_steps = 12 needs steps up to 11.*<= 10"):
        recorded_steps(first=0, last=9, start=0, stop=12)
    with pytest.raises(OfflineError, match="no steps to train on"):
        recorded_steps(first=0, last=9, start=10, stop=10)


def test_offline_config_is_the_sources_with_overrides(tmp_path):
    src = fake_source(tmp_path)
    out = tmp_path / "off"
    cfg = offline_config(src, [f"output_dir={out}", "copilot.hidden_size=64",
                               "offline.seed=3"])
    assert cfg.offline.source == str(src.resolve()) and cfg.output_dir == str(out)
    assert cfg.copilot.hidden_size == 64 and cfg.offline.seed == 3
    assert cfg.train.steps == STEPS and cfg.mistake_log.topk == 3  # the source's
    assert cfg.resume is None


@pytest.mark.parametrize("overrides,why", [
    ([], "give the offline run its own folder"),
    (["output_dir={src}"], "is the source run"),
    (["output_dir={out}", "model.arch.hidden_size=32"], "keeps the source run's Pilot"),
    (["output_dir={out}", "seed=1"], "set offline.seed"),
    (["output_dir={out}", "resume=auto"], "does not checkpoint or resume"),
])
def test_offline_config_refuses(tmp_path, overrides, why):
    src = fake_source(tmp_path)
    with pytest.raises(ConfigError, match=why):
        offline_config(src, [o.format(src=src, out=tmp_path / "off") for o in overrides])


def test_command_line_errors_are_one_line_and_exit_2(tmp_path, capsys):
    src = fake_source(tmp_path)
    capsys.readouterr()  # the fake run's saving bars
    out = f"output_dir={tmp_path / 'off'}"
    assert train_main(["--offline-from", str(tmp_path), out]) == 2
    assert train_main(["--config", "configs/default.yaml", "--offline-from", str(src), out]) == 2
    assert train_main([f"offline.source={src}", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("config error: ") for e in err), err
    assert "not a tcp run directory (no config.yaml)" in err[0]
    assert "drop --config" in err[1] and "use --offline-from" in err[2]
    assert not (tmp_path / "off").exists()


def test_open_source_of_a_finished_run(tmp_path):
    src = fake_source(tmp_path)
    run = open_source(offline_config(src, [f"output_dir={tmp_path / 'off'}"]), world=2)
    assert run.log == src.resolve() / "mistake_log" and run.steps == range(STEPS)
    assert run.d_pilot == 16 and run.pilot_dir == src.resolve() / "final" / "pilot"
    assert run.base is None and run.joint_copilot_rmse is None  # no results.json here


def _damage_manifest(src: Path) -> None:
    (src / "mistake_log" / "rank00001" / "manifest.json").write_text("{garbage")


def _unfinish(src: Path) -> None:
    (src / "final" / "pilot" / "config.json").unlink()


@pytest.mark.parametrize("world,override,change,why", [
    (1, None, None, r"has 2 rank shard\(s\) and this job 1 rank\(s\).*--num_gpus 2.*"
                    r"tcp-log compact .*mistake_log --merge-ranks"),
    (2, None, _damage_manifest, r"unreadable.*tcp-log verify"),
    (2, None, _unfinish, "is not a finished tcp run"),
    (2, "mistake_log.topk=5", None, r"top-3 of p_hat; set mistake_log.topk=3"),
    (2, "train.steps=9", None, r"copilot_tail_steps = 9 needs steps up to 8, the log holds 0..5"),
    (2, "offline.log_path={tmp}/nowhere", None, "no Mistake Log there"),
])
def test_open_source_refuses(tmp_path, world, override, change, why):
    src = fake_source(tmp_path)
    if change is not None:
        change(src)
    over = [f"output_dir={tmp_path / 'off'}", *([override.format(tmp=tmp_path)] if override
                                                else [])]
    with pytest.raises(OfflineError, match=why):
        open_source(offline_config(src, over), world=world)


def test_open_source_refuses_a_log_without_a_store_and_one_in_use(tmp_path):
    src = fake_source(tmp_path / "a", backend="memory")
    with pytest.raises(OfflineError, match=r"kept no Mistake Log \(mistake_log.backend=memory"):
        open_source(offline_config(src, [f"output_dir={tmp_path / 'off'}"]), world=2)
    src = fake_source(tmp_path / "b")
    cfg = offline_config(src, [f"output_dir={tmp_path / 'off'}"])
    with RunLock(src / "mistake_log"), pytest.raises(LockError, match="in use by a running"):
        open_source(cfg, world=2)  # a live job (this process) holds the log
    assert open_source(cfg, world=2).steps == range(STEPS)  # released: fine again


@pytest.mark.parametrize("include_current,lag,window", [(True, 0, 3), (False, 1, "all")])
def test_recorded_stream_is_the_joint_runs_batches(tmp_path, include_current, lag, window):
    """At every step the offline batch equals what `copilot_entries` gave the joint run's
    Copilot from the live log: the step's own entries (in memory there, read back here) and
    the same replay draw."""
    cfg = load_config(None, [*RUN, f"mistake_log.include_current={include_current}",
                             f"mistake_log.store.replay_lag_steps={lag}",
                             f"mistake_log.window_steps={window}"])
    ml = cfg.mistake_log
    schema = Schema(16, 3, "float32")
    create_root(tmp_path, schema)
    rank = 1
    live = ZarrMistakeLog(tmp_path, rank=rank, schema=schema, cfg=ml.store,
                          window_steps=None if window == "all" else window,
                          replay_size=ml.replay_size, seed=cfg.seed)
    joint = []
    try:
        for step in range(STEPS):  # the joint loop: append, then the Copilot's batch
            current = fake_entries(step, rank=rank)
            live.append(current)
            joint.append(copilot_entries(current, live, step=step, cfg=ml,
                                         device=torch.device("cpu")))
    finally:
        live.close()
    stream = RecordedStream(tmp_path, rank=rank, cfg=cfg)
    try:
        for step in range(STEPS):
            got = stream.entries(step, torch.device("cpu"))
            if joint[step] is None:
                assert got is None, step
            else:
                assert got is not None, step
                assert_same(got, joint[step])
    finally:
        stream.close()
    assert sum(b is not None for b in joint) >= STEPS - 1 - lag
