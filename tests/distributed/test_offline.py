"""Offline Copilot training under real DeepSpeed (2 CPU ranks, ZeRO-3) from the Mistake Log of
the 2-rank joint test run (conftest.py: joint_run): no Pilot forward or backward, the same data
stream and loss as the joint run's Copilot, evaluated with that run's Pilot; a Copilot of
another size and architecture from the same log; bad input refused before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, launch, unexplained_console_lines

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NO_MLFLOW = "tracking.enabled=false"


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_offline_copilot_from_the_joint_runs_log(joint_run, tmp_path):
    src, out = joint_run.path, tmp_path / "offline"
    proc = launch(out, NO_MLFLOW, offline_from=src)
    res, joint = results(out), results(src)
    assert res["offline_from"] == str(src.resolve()) and res["world_size"] == 2
    assert res["steps"] == [0, 23] and res["skipped_steps"] == 0
    # Done-when: the validation Copilot RMSE (teacher-forced, with the source's final Pilot)
    # within 10% of the jointly trained Copilot's.
    mine = res["validation"]["teacher_forced"]["copilot_rmse"]
    theirs = joint["validation"]["teacher_forced"]["copilot_rmse"]
    assert abs(mine / theirs - 1) <= 0.10, (mine, theirs)
    assert res["copilot_rmse"] == {"offline": mine, "joint": theirs, "ratio": mine / theirs}
    # Stronger: the same data stream, loss, initialisation and schedule give the joint run's
    # Copilot training curve, interval by interval.
    assert [r["step"] for r in res["history"]] == [r["step"] for r in joint["history"]]
    for a, b in zip(res["history"], joint["history"], strict=True):
        for key in ("copilot_rmse", "zero_rmse", "lr_copilot"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (a["step"], key)
    # Only the Copilot was trained: no Pilot steps, no Pilot saved, no log written.
    assert "[offline] 24/24" in proc.stdout and "[joint]" not in proc.stdout
    assert unexplained_console_lines(proc.stdout + proc.stderr) == []
    assert "Pilot+Copilot" in proc.stdout and "validation Copilot RMSE: offline" in proc.stdout
    assert not (out / "final" / "pilot").exists() and not (out / "mistake_log").exists()
    for rel in ("final/copilot.pt", "tokenizer/tokenizer_config.json", "plots/training.png"):
        assert (out / rel).exists(), rel
    assert f"source: {src.resolve()}" in (out / "config.yaml").read_text()
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == res["test_size"] == 32 and res["paired"]["n"] == 32
    assert res["pilot"]["source"] == str(src.resolve() / "final" / "pilot")
    assert not list(src.rglob(".tcp.lock"))  # the source was only read
    # ... and marked as read meanwhile (tcp.runtime.read_marks); the marks are gone.
    assert {p.parent for p in src.rglob(".tcp.readers")} == {src, src / "mistake_log"}
    assert not list(src.rglob(".tcp.readers/*"))
    # tcp-eval scores it: with the source's Pilot named, and found from offline.source.
    from tcp.cli.tcp_eval import eval_main

    assert eval_main([str(out), f"--pilot={src}"]) == 0
    ev = json.loads((out / "eval" / "transfer-run.json").read_text())
    assert ev["test_size"] == 32 and 0 <= ev["pilot+copilot"]["accuracy"] <= 1
    assert ev["pilot"]["source"] == str(src / "final" / "pilot")
    assert abs(ev["validation"]["teacher_forced"]["copilot_rmse"] - mine) <= 1e-4
    assert eval_main([str(out), "--limit=4", "--lambda=0.5"]) == 0  # the Pilot: offline.source
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["pilot"]["source"] == str(src.resolve() / "final" / "pilot")


def test_a_smaller_encoder_decoder_copilot_from_the_same_log(joint_run, tmp_path):
    src, out = joint_run.path, tmp_path / "small"
    launch(out, NO_MLFLOW, "copilot.init_from=none", "copilot.hidden_size=64",
           "copilot.intermediate_size=172", "copilot.num_layers=2",
           "copilot.architecture=encoder_decoder", offline_from=src)
    res, joint = results(out), results(src)
    assert res["params"]["copilot"] < joint["params"]["copilot"] / 4
    hist = res["history"]
    assert hist[-1]["copilot_rmse"] < hist[0]["copilot_rmse"]  # it learns from the log
    tf = res["validation"]["teacher_forced"]
    assert 0 < tf["copilot_rmse"] and res["copilot_rmse"]["offline"] == tf["copilot_rmse"]
    assert 0 <= res["pilot+copilot"]["accuracy"] <= 1 and res["paired"]["n"] == 32
    state = __import__("torch").load(out / "final/copilot.pt", weights_only=True)
    assert any(".cross_attn." in k for k in state)  # the encoder-decoder variant


def plain(*args: str) -> subprocess.CompletedProcess:
    """`python launcher/train.py ...` (one process, no launcher)."""
    return subprocess.run([sys.executable, str(ROOT / "launcher/train.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_bad_sources_are_one_line_and_exit_2_before_any_model(joint_run, tmp_path):
    out = tmp_path / "off"
    p = plain("--offline-from", str(tmp_path), f"output_dir={out}")  # not a run
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: --offline-from") and "not a tcp run" in last
    # One rank for a log of two shards.
    p = plain("--offline-from", str(joint_run.path), f"output_dir={out}", NO_MLFLOW)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("offline error: ") and "2 rank shard(s) and this job 1 rank(s)" \
        in last and "--merge-ranks" in last
    assert not out.exists()  # checked before DeepSpeed, before anything was written
