"""tools/analyze_yesno.py: counts of how a yes/no Pilot decided, and what the Copilot changed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("analyze_yesno",
                                                  ROOT / "tools" / "analyze_yesno.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(claim: int, gold: str, pilot: str, fused: str) -> dict:
    word = gold.split()[-1]
    return {"split": "test", "prompt": f"Q: Ann has 3 cats. Is the answer {claim}?\nA: ",
            "gold": gold,
            "pilot": {"generation": pilot, "correct": pilot.split()[-1] == word},
            "pilot+copilot": {"generation": fused, "correct": fused.split()[-1] == word}}


def test_counts_copies_of_the_claim_and_the_copilots_changes(tmp_path, capsys):
    rows = [_row(3, "3, so yes", "3, so yes", "3, so yes"),       # copies a true claim
            _row(7, "3, so no", "7, so yes", "3, so no"),         # copies; Copilot computes
            _row(9, "3, so no", "4, so no", "9, so yes"),         # own value; Copilot copies
            _row(9, "3, so no", "4, so no", "5, so no"),          # another value, no effect
            {**_row(1, "1, so yes", "1, so yes", "1, so yes"), "split": "validation"}]
    (tmp_path / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _tool().report(tmp_path)
    out = capsys.readouterr().out
    assert "(test n = 4)" in out  # validation rows are not counted
    assert "| yes | copies the claim | value right | says yes | 1 | 1 |" in out
    assert "| no | copies the claim | value wrong | says yes | 1 | 1 |" in out
    assert "| no | own value | value right | says no | 0 | 1 |" in out
    assert "| no | own value | value wrong | says no | 2 | 1 |" in out
    assert "answers Pilot+Copilot changed: 3" in out
    assert "- away from the claim: 1 (fixed)" in out
    assert "- towards copying the claim: 1 (broke)" in out
    assert "- another value or word: 1 (no effect)" in out
