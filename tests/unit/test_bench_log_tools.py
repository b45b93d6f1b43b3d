"""tools/bench_log_tools.py runs end to end on a small log (1 repetition) and writes its JSON."""

from __future__ import annotations

import json

from tests.log_tools_helpers import make_log, snapshot
from tools.bench_log_tools import POLICIES, main


def test_bench_log_tools_smoke(tmp_path, capsys):
    src = make_log(tmp_path / "mistake_log", steps=8)
    before = snapshot(src)
    out = tmp_path / "bench"
    res = main(["--log", str(src), "--out", str(out), "--reps", "1"])
    saved = json.loads((out / "bench.json").read_text())
    assert saved.keys() >= {"machine", "torch", "zarr", "command", "prune", "compact"}
    assert len(saved["prune"]) == len(POLICIES)
    for row in saved["prune"]:
        assert row.keys() >= {"estimate", "entries_after", "stored_before", "stored_after",
                              "reclaimed", "reclaimed_pct", "apply_s"}
        assert row["entries_after"] == row["estimate"]["kept"]
    c = saved["compact"]
    assert len(c["copy_s"]) == len(c["compact_s"]) == 1 and c["ratio"] > 0
    assert set(c["phases_median_s"]) >= {"read", "encode+write", "verify", "fsync", "delete"}
    assert res["compact"]["ratio"] == c["ratio"]
    assert snapshot(src) == before  # the source log is never changed
    assert "Compact throughput vs plain copy" in capsys.readouterr().out
