"""tcp-log (tcp/log_tools): prune policies and compact keep exactly the expected entries, a dry
run changes nothing, a live run's lock is refused, export round-trips, merge holds both runs,
and every error is one line with exit code 2. The kill tests are in test_log_tools_crash.py."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tcp.cli.tcp_log import main
from tcp.log_tools.export import load_export
from tcp.log_tools.paths import marker_path, old_path, temp_path
from tcp.mistake_log.chunk_io import ChunkWrites
from tcp.mistake_log.maintenance import verify
from tcp.mistake_log.reader import RankStoreReader
from tcp.mistake_log.shard_writer import RankStoreWriter
from tcp.runtime.run_lock import LOCK_NAME, RunLock
from tests.log_tools_helpers import (
    digests,
    entries,
    make_log,
    newest_steps_within,
    ratio,
    snapshot,
)


@pytest.fixture(scope="module")
def base_log(tmp_path_factory) -> Path:
    return make_log(tmp_path_factory.mktemp("base") / "mistake_log")


@pytest.fixture
def log(base_log, tmp_path) -> Path:
    dst = tmp_path / "run" / "mistake_log"
    shutil.copytree(base_log, dst)
    return dst


def run_tool(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def no_leftovers(path: Path) -> bool:
    return not any(p.exists() for p in (temp_path(path), old_path(path), marker_path(path),
                                        path / LOCK_NAME))


# ----------------------------------------------------------------------------- prune + compact
POLICIES = {
    "keep-last-steps": (["--keep-last-steps", "7"], lambda e, last: e["step"] > last - 7),
    "before-step": (["--before-step", "10"], lambda e, last: e["step"] >= 10),
    "min-loss": (["--min-loss", "0.6"], lambda e, last: e["loss"] > 0.6),
    "only-mistakes": (["--only-mistakes"], lambda e, last: e["mistakes"] > 0),
    "max-bytes": (["--max-bytes", "30K"], None),
    "combined": (["--keep-last-steps", "20", "--min-loss", "0.3", "--max-bytes", "20K"], None),
}


def expected_kept(name: str, ents: list[dict], ratios: dict[int, float]) -> set:
    last = max(e["step"] for e in ents)
    if name == "max-bytes":
        steps = newest_steps_within(ents, ratios, 30 * 1024)
        return {e["digest"] for e in ents if e["step"] in steps}
    if name == "combined":
        rest = [e for e in ents if e["step"] > last - 20 and e["loss"] > 0.3]
        steps = newest_steps_within(rest, ratios, 20 * 1024)
        return {e["digest"] for e in rest if e["step"] in steps}
    keep = POLICIES[name][1]
    return {e["digest"] for e in ents if keep(e, last)}


@pytest.mark.parametrize("name", list(POLICIES))
def test_prune_then_compact_keep_exactly_the_expected_entries(log, capsys, name):
    before = entries(log)
    want = expected_kept(name, before, ratio(log))
    assert 0 < len(want) < len(before)  # each policy really drops something here
    rc, out, err = run_tool(capsys, "prune", log, *POLICIES[name][0], "--apply")
    assert rc == 0, err
    assert f"{len(before)} -> {len(want)} entries" in out
    after = digests(log)
    assert set(after.values()) == want and len(after) == len(want)
    assert verify(log).ok and no_leftovers(log)
    info = json.loads(run_tool(capsys, "info", log, "--json")[1])
    assert info["entries"] == len(want)
    assert info["history"][-1]["op"] == "prune"
    assert info["history"][-1]["entries_after"] == len(want)
    rc, _, err = run_tool(capsys, "compact", log, "--chunk-mib", "0.01")
    assert rc == 0, err
    assert digests(log) == after and no_leftovers(log)
    assert [h["op"] for h in json.loads(run_tool(capsys, "info", log, "--json")[1])["history"]] \
        == ["prune", "compact"]


def test_prune_dry_run_changes_nothing(log, capsys):
    snap = snapshot(log)
    rc, out, _ = run_tool(capsys, "prune", log, "--keep-last-steps", "5", "--only-mistakes",
                          "--max-bytes", "1G")
    assert rc == 0 and "dry run" in out
    assert "rank 0: keep" in out and "rank 1: keep" in out and "total: keep" in out
    assert snapshot(log) == snap
    assert not temp_path(log).exists() and not (log / LOCK_NAME).exists()


def test_prune_that_keeps_everything_leaves_the_log_alone(log, capsys):
    snap = snapshot(log)
    rc, out, _ = run_tool(capsys, "prune", log, "--before-step", "0", "--apply")
    assert rc == 0 and "unchanged" in out and snapshot(log) == snap


def test_compact_is_idempotent_and_can_recode_and_merge_ranks(log, capsys):
    orig = entries(log)
    ref = digests(log)
    assert run_tool(capsys, "compact", log, "--compressor", "blosc", "--shard-chunks", "2")[0] \
        == 0
    first = snapshot(log)
    assert digests(log) == ref and no_leftovers(log)
    assert RankStoreReader(log, 0).manifest.codec["compressor"] == "blosc"
    assert run_tool(capsys, "compact", log)[0] == 0  # again: same entries
    assert digests(log) == ref
    assert {k for k in snapshot(log)} == {k for k in first}
    assert run_tool(capsys, "compact", log, "--merge-ranks")[0] == 0
    merged = entries(log)
    assert [e["rank"] for e in merged] == [0] * len(orig)
    assert Counter(e["digest_no_rank"] for e in merged) == \
        Counter(e["digest_no_rank"] for e in orig)
    # A stable merge by step: within a step, rank 0's entries, then rank 1's, each in order.
    want = sorted(orig, key=lambda e: (e["step"], e["rank"]))
    assert [e["digest_no_rank"] for e in merged] == [e["digest_no_rank"] for e in want]
    assert verify(log).ok


# ----------------------------------------------------------------------------- locking
def test_tools_refuse_a_log_locked_by_a_live_run(log, tmp_path, capsys):
    other = make_log(tmp_path / "other", steps=4, ranks=1)
    lock = RunLock(log, what="run").acquire()  # as the trainer holds it
    try:
        snap = snapshot(log)
        for argv in (["prune", log, "--keep-last-steps", "3", "--apply"], ["compact", log],
                     ["merge", tmp_path / "out", other, log]):
            rc, out, err = run_tool(capsys, *argv)
            assert rc == 2 and out == ""
            assert err.count("\n") == 1 and err.startswith("lock error: ")
            assert "in use by a running tcp run" in err
            assert snapshot(log) == snap and not temp_path(log).exists()
        assert not (tmp_path / "out").exists()
        # Read-only commands work on the live log.
        assert run_tool(capsys, "info", log)[0] == 0
        assert run_tool(capsys, "verify", log)[0] == 0
        assert run_tool(capsys, "prune", log, "--keep-last-steps", "3")[0] == 0
        assert run_tool(capsys, "export", log, "--out", tmp_path / "x.npz")[0] == 0
    finally:
        lock.release()


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["parquet", "npz"])
def test_export_round_trips(tmp_path, capsys, dtype, fmt):
    log = make_log(tmp_path / "log", steps=10, dtype=dtype)
    out = tmp_path / f"sel.{fmt}"
    rc, msg, err = run_tool(capsys, "export", log, "--out", out, "--steps", "2:8")
    assert rc == 0, err
    got = load_export(out)
    refs = []
    for rank in (0, 1):
        rd = RankStoreReader(log, rank)
        lo, hi = rd.entry_range(2, 8)
        refs.append(rd.read_range(lo, hi))
    ref = type(got).cat(refs, device="cpu")
    assert f"exported {ref.num_entries} entries" in msg
    for name, t in ref.state_dict().items():
        g = getattr(got, name)
        assert g.dtype == t.dtype and torch.equal(g, t), name
    # Selections combine: one rank, some sample ids.
    ids = [int(i) for i in ref.sample_id[:3]]
    rc, _, _ = run_tool(capsys, "export", log, "--out", out, "--force", "--rank", "0",
                        "--sample-ids", ",".join(map(str, ids)))
    sub = load_export(out)
    assert rc == 0 and set(sub.sample_id.tolist()) <= set(ids) and set(sub.rank.tolist()) == {0}


# ----------------------------------------------------------------------------- merge
def test_merge_holds_both_runs_and_verifies(tmp_path, capsys):
    a = make_log(tmp_path / "a", steps=6, seed=1)
    b = make_log(tmp_path / "b", steps=5, seed=2, ranks=1)
    out = tmp_path / "merged"
    rc, msg, err = run_tool(capsys, "merge", out, a, b)
    assert rc == 0, err
    assert "3 shards" in msg and verify(out).ok
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    mapping = {m["shard"]: (m["source"], m["rank"]) for m in attrs["merged_from"]}
    assert mapping == {0: (str(a), 0), 1: (str(a), 1), 2: (str(b), 0)}
    src = {**{(0, *k[1:]): v for k, v in digests(a).items() if k[0] == 0},
           **{(1, *k[1:]): v for k, v in digests(a).items() if k[0] == 1}}
    got = digests(out)
    # Entry contents are identical; only `rank` (the shard) is renumbered.
    no_rank = Counter(e["digest_no_rank"] for e in entries(out))
    assert no_rank == Counter(e["digest_no_rank"] for e in entries(a) + entries(b))
    assert {k: v for k, v in got.items() if k[0] < 2} == src
    assert not (out / LOCK_NAME).exists() and not (a / LOCK_NAME).exists()
    # OUT must be new; a different Pilot family is one clear error.
    rc, _, err = run_tool(capsys, "merge", out, a, b)
    assert rc == 2 and "not empty" in err and err.count("\n") == 1
    c = make_log(tmp_path / "c", steps=2, d=32, ranks=1)
    rc, _, err = run_tool(capsys, "merge", tmp_path / "m2", a, c)
    assert rc == 2 and "d_model 32 (vs 16)" in err and err.count("\n") == 1
    assert not (tmp_path / "m2").exists()


# ----------------------------------------------------------------------------- info / errors
def test_info_reports_k_and_mean_residual(log, capsys):
    d = json.loads(run_tool(capsys, "info", log, "--json")[1])
    res = np.concatenate([RankStoreReader(log, r).read_range(0, RankStoreReader(log, r)
                                                             .num_entries).residual.numpy()
                          for r in (0, 1)])
    assert d["entries"] == len(entries(log)) and d["topk"] == 3
    assert d["mean_residual"] == pytest.approx(float(res.astype(np.float64).mean()), rel=1e-9)
    text = run_tool(capsys, "info", log)[1]
    assert "top-3" in text and f"{d['mean_residual']:.4f}" in text
    rc, text, _ = run_tool(capsys, "verify", log)
    assert rc == 0 and "mean residual mass" in text and text.rstrip().endswith("OK")


@pytest.mark.parametrize("argv,needle", [
    (["prune", "{log}", "--max-bytes", "lots"], "--max-bytes 'lots'"),
    (["prune", "{log}"], "needs a policy"),
    (["prune", "{log}", "--min-loss", "1", "--only-mistakes"], "not allowed with"),
    (["compact", "{log}", "--level", "99"], "--level: 99 is not a valid zstd level"),
    (["export", "{log}", "--out", "x.csv"], "must end in .parquet or .npz"),
    (["export", "{log}", "--out", "x.npz", "--steps", "5:2"], "B must be greater than A"),
    (["info", "{tmp}/nothing"], "no such folder"),
    (["compact", "{tmp}"], "not a Mistake Log (no rank shards"),
])
def test_errors_are_one_line_exit_2_and_change_nothing(log, tmp_path, capsys, argv, needle):
    snap = snapshot(log)
    rc, _, err = run_tool_safe(capsys, [a.format(log=log, tmp=tmp_path) for a in argv])
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert err.split(" ", 1)[0] in ("usage", "log")
    assert snapshot(log) == snap


def run_tool_safe(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_damaged_log_is_refused_with_a_pointer_to_verify(log, capsys):
    # The newest chunk: prune keeps (and so reads) its entries.
    victim = [p for p in sorted((log / "rank00001" / "h" / "c").rglob("*")) if p.is_file()][-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    snap = snapshot(log)
    for cmd in (["compact", log], ["prune", log, "--keep-last-steps", "5", "--apply"]):
        rc, _, err = run_tool(capsys, *cmd)
        assert rc == 2 and err.startswith("log error: ") and err.count("\n") == 1
        assert f"run `tcp-log verify {log}`" in err
        assert snapshot(log) == snap and no_leftovers(log)
    assert run_tool(capsys, "verify", log)[0] == 1


def test_damaged_sealed_chunk_fails_a_plain_compact(log, capsys):
    # A plain compact copies sealed chunks as bytes: their CRC32C is checked, not skipped.
    victim = log / "rank00000" / "x_tilde" / "c" / "0" / "0"
    assert RankStoreReader(log, 0).manifest.prompt_rows > 2 * \
        RankStoreReader(log, 0).arrays["x_tilde"].chunks[0]  # chunk 0 is sealed
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    snap = snapshot(log)
    rc, _, err = run_tool(capsys, "compact", log)
    assert rc == 2 and err.startswith("log error: ") and err.count("\n") == 1
    assert "CRC32C" in err and f"run `tcp-log verify {log}`" in err
    assert snapshot(log) == snap and no_leftovers(log)


def _chunk_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "/c/" in str(p.relative_to(root))}


def test_plain_compact_copies_sealed_chunks_byte_for_byte(log, capsys):
    ref, before = digests(log), _chunk_files(log)
    sealed = []
    for rank in (0, 1):
        rd = RankStoreReader(log, rank)
        for name, arr in rd.arrays.items():
            c = arr.chunks[0]
            sealed += [f"rank{rank:05d}/{name}/c/{u}" for u in range(rd.manifest.rows(name) // c)]
    assert len(sealed) > 20
    assert run_tool(capsys, "compact", log)[0] == 0
    after = _chunk_files(log)
    assert digests(log) == ref and verify(log).ok
    for key in sealed:
        got = [k for k in after if k == key or k.startswith(key + "/")]
        assert got and all(after[k] == before[k] for k in got), key
    # A compact that changes the chunking re-encodes: no state chunk is the original's file.
    assert run_tool(capsys, "compact", log, "--chunk-mib", "0.02")[0] == 0
    assert digests(log) == ref
    assert not any(before.get(k) == v for k, v in _chunk_files(log).items()
                   if k.split("/")[1] in ("h", "x_tilde"))


def test_full_disk_removes_the_partial_copy(log, capsys, monkeypatch):
    real = ChunkWrites.finish
    calls = []

    def finish(self):
        calls.append(1)
        if len(calls) == 2:  # rank 1's first writes (rank 0's shard was written)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)

    monkeypatch.setattr(ChunkWrites, "finish", finish)
    snap = snapshot(log)
    for argv in (["compact", log], ["compact", log, "--level", "5"]):  # by copy, by re-encoding
        calls.clear()
        rc, _, err = run_tool(capsys, *argv)
        assert rc == 2 and err.startswith("log error: disk full while writing") and \
            err.count("\n") == 1
        assert "removed that partial copy" in err
        assert snapshot(log) == snap and no_leftovers(log)


def test_console_script_help():
    exe = Path(sys.executable).parent / "tcp-log"
    if not exe.exists():
        pytest.skip("tcp-log is not installed in this environment (pip install -e .)")
    for argv in ([], ["prune"], ["compact"], ["export"], ["merge"], ["info"], ["verify"]):
        p = subprocess.run([str(exe), *argv, "--help"], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and "examples:" in p.stdout, p.stderr


def test_resume_cursor_after_prune_and_compact(log, capsys):
    """A checkpoint's log cursor (the manifest snapshot) still fits a plain compact, and no
    longer fits a log pruned before it: resume refuses that log instead of replaying wrongly."""
    from tcp.config import ZarrStoreConfig
    from tcp.mistake_log.format import MistakeLogCorrupt, Schema
    from tests.log_tools_helpers import SMALL

    rd = RankStoreReader(log, 0)
    cursor = rd.manifest.to_json()
    cfg = ZarrStoreConfig(chunk_mib=SMALL)
    assert run_tool(capsys, "compact", log)[0] == 0
    assert RankStoreWriter(log, 0, Schema(16, 3, "float32"), cfg).check_cursor(cursor)
    assert run_tool(capsys, "prune", log, "--before-step", "3", "--apply")[0] == 0
    with pytest.raises(MistakeLogCorrupt, match=r"not the one this checkpoint|does not hold"):
        RankStoreWriter(log, 0, Schema(16, 3, "float32"), cfg).check_cursor(cursor)
