"""Evidence in every result: predictions.jsonl holds both outputs and flags per test example,
results.json["paired"] and the table's paired line agree with the accuracies, and
tools/summarize_runs.py pools runs' examples into one paired test."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from tcp.config import load_config
from tcp.data.collate import tokenize_records
from tcp.evaluation.answer_scoring import AnswerScorer
from tcp.evaluation.decode_budget import pilot_context, resolve_budget
from tcp.evaluation.generation_eval import generation_eval
from tcp.evaluation.predictions import pair_rows, prediction_row, read_paired_flags
from tcp.evaluation.protocol import decode_options, evaluate_and_report
from tcp.evaluation.report import format_table, summary_metrics
from tcp.models.pilot import PilotTap
from tests.helpers import tiny_copilot, tiny_pilot

CPU = torch.device("cpu")
PROMPTS = [f"Q: item {i}\nA: " for i in range(4)]
ROOT = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _evaluate(tmp_path: Path, model, tok, cop, golds: list[str], lam: float) -> dict:
    """evaluate_and_report at a given λ (no sweep) with predictions, world 1."""
    cfg = load_config(None, [f"output_dir={tmp_path}", "eval.answer_format=exact",
                             "eval.max_new_tokens=6", "eval.batch_size=3", "data.max_length=96"])
    records = [{"prompt": p, "answer": g} for p, g in zip(PROMPTS, golds, strict=True)]
    samples, _ = tokenize_records(records, tok, max_length=cfg.data.max_length)
    ctx, encdec = pilot_context(model, max_length=cfg.data.max_length)
    budget = resolve_budget(cfg.eval, {"validation": samples}, tok, context=ctx,
                            encoder_decoder=encdec)
    tap = PilotTap(model)
    try:
        return evaluate_and_report(cfg, pilot=model, copilot=cop, tap=tap, tokenizer=tok,
                                   val_records=records, test_records=records,
                                   val_samples=samples, rank=0, world=1, device=CPU, lam=lam,
                                   budget=budget, predictions_path=tmp_path / "p.jsonl")
    finally:
        tap.remove()


@pytest.fixture(scope="module")
def models():
    """An untrained Pilot and a Copilot that pushes 'x' at every step: at λ = 1 Pilot+Copilot
    answers 'xxxxxx', the Pilot something else."""
    model, tok = tiny_pilot(seed=0)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size)
    with torch.no_grad():
        cop.head.bias[tok.convert_tokens_to_ids("x")] = 50.0
    return model, tok, cop


@pytest.fixture(scope="module")
def evaluated(models, tmp_path_factory):
    """Golds chosen from a first decode so that examples 0 and 2 only the Pilot gets right (b),
    example 1 only Pilot+Copilot (c), example 3 neither."""
    model, tok, cop = models
    probe = tmp_path_factory.mktemp("probe")
    _evaluate(probe, model, tok, cop, ["?"] * 4, lam=1.0)
    first = _lines(probe / "p.jsonl")
    pilot, fused = ([ln[k]["answer_text"] for ln in first] for k in ("pilot", "pilot+copilot"))
    assert all(p.strip() and p != f for p, f in zip(pilot, fused, strict=True)), (pilot, fused)
    golds = [pilot[0], fused[1], pilot[2], "no such answer"]
    out = tmp_path_factory.mktemp("eval")
    return _evaluate(out, model, tok, cop, golds, lam=1.0), out / "p.jsonl", golds


# ------------------------------------------------------------------ predictions.jsonl
def test_predictions_hold_both_outputs_and_flags_per_example(evaluated):
    res, path, golds = evaluated
    lines = _lines(path)
    assert [ln["index"] for ln in lines] == [0, 1, 2, 3] == list(range(res["test_size"]))
    assert [ln["outcome"] for ln in lines] == ["broken", "fixed", "broken", "both_wrong"]
    for ln, gold, prompt in zip(lines, golds, PROMPTS, strict=True):
        assert (ln["split"], ln["prompt"], ln["gold"], ln["lambda"]) == ("test", prompt, gold, 1.0)
        assert ln["changed"] is True
        assert ln["pilot"]["lambda"] == 0.0 and ln["pilot+copilot"]["lambda"] == 1.0
        for out in (ln["pilot"], ln["pilot+copilot"]):
            assert set(out) == {"lambda", "generation", "answer_text", "parsed", "parse_error",
                                "correct", "hit_budget"}
        assert ln["pilot+copilot"]["generation"] == "x" * 6
        assert ln["pilot+copilot"]["hit_budget"] is True
    assert read_paired_flags(path) == ([True, False, True, False], [False, True, False, False])


def test_paired_in_results_matches_the_accuracies(evaluated):
    res, _, _ = evaluated
    p = res["paired"]
    assert (p["n"], p["b"], p["c"], p["pilot_correct"], p["copilot_correct"]) == (4, 2, 1, 2, 1)
    assert p["pilot_correct"] / p["n"] == res["pilot"]["accuracy"]
    assert p["copilot_correct"] / p["n"] == res["pilot+copilot"]["accuracy"]
    assert p["diff"] == res["pilot+copilot"]["accuracy"] - res["pilot"]["accuracy"] == -0.25
    assert p["mcnemar_p"] == 1.0  # 2 * P[Bin(3, 1/2) <= 1] = 2 * 4/8
    lo, hi = p["diff_ci95"]
    assert lo <= -0.25 <= hi and p["bootstrap"] == {
        "resamples": 10_000, "seed": 0,
        "method": "percentile, examples resampled with replacement"}
    assert (p["lambda"], p["copilot_off"]) == (1.0, False)
    json.dumps(res)  # results.json-ready
    m = summary_metrics(res)
    assert m["test_paired_diff"] == -0.25 and m["test_paired_mcnemar_p"] == 1.0


def test_table_shows_the_paired_line(evaluated):
    res, _, _ = evaluated
    table = format_table(res)
    line = next(x for x in table.splitlines() if x.startswith("paired test"))
    lo, hi = res["paired"]["diff_ci95"]
    assert line == (f"paired test, Pilot+Copilot − Pilot: -25.0 points [{100 * lo:+.1f}, "
                    f"{100 * hi:+.1f}] 95% bootstrap CI, exact McNemar p = 1 (b=2 only the "
                    "Pilot right, c=1 only Pilot+Copilot right; n=4)")
    old = {k: v for k, v in res.items() if k != "paired"}  # results written before "paired"
    assert "paired test" not in format_table(old) and "test_paired_diff" not in \
        summary_metrics(old)


def test_copilot_off_is_trivially_equal_and_says_so(models, tmp_path):
    model, tok, cop = models
    res = _evaluate(tmp_path, model, tok, cop, ["a", "b", "c", "d"], lam=0.0)
    p = res["paired"]
    assert (p["b"], p["c"], p["mcnemar_p"], p["diff"], p["diff_ci95"], p["copilot_off"]) == (
        0, 0, 1.0, 0.0, [0.0, 0.0], True)
    lines = _lines(tmp_path / "p.jsonl")
    assert len(lines) == 4 and all(ln["pilot"] == ln["pilot+copilot"] for ln in lines)
    assert all(not ln["changed"] and ln["lambda"] == 0.0 for ln in lines)
    assert ("paired test (n=4): λ=0 chosen, so Pilot+Copilot is the Pilot on every test "
            "example: difference 0, McNemar p = 1 (nothing to test)") in format_table(res)


def test_rank_shards_pair_into_one_line_per_example(models):
    """Under distributed evaluation each rank decodes records[rank::world]; gathered, the
    rows pair into exactly one line per example and count what the ranks counted."""
    model, tok, cop = models
    cfg = load_config(None, ["eval.max_new_tokens=4"])
    records = [{"prompt": f"Q: {i}\nA: ", "answer": str(i % 3)} for i in range(7)]
    tap = PilotTap(model)
    try:
        parts = [generation_eval(model, tap, cop, records, tok, lambdas=[0.0, 1.0],
                                 opts=decode_options(cfg, max_new_tokens=4), batch_size=2,
                                 rank=rank, world=2, device=CPU, answer_format="exact",
                                 predictions_split="test") for rank in (0, 1)]
    finally:
        tap.remove()
    lines = pair_rows([r for part in parts for r in part.rows], 1.0)
    assert [ln["index"] for ln in lines] == list(range(7))
    for key, li in (("pilot", 0), ("pilot+copilot", 1)):
        # without a process group each rank's accuracy is over its own shard
        assert sum(ln[key]["correct"] for ln in lines) == round(
            sum(p.accuracy[li] * p.n for p in parts))


# ------------------------------------------------------------------ file formats
def _decode_rows(index: int, gold: str, answers: dict[float, str]) -> list[dict]:
    scorer = AnswerScorer("numeric")
    rec = {"prompt": f"Q{index}", "answer": gold}
    return [prediction_row(split="test", index=index, record=rec, lam=lam, generation=a,
                           answer_text=a, scorer=scorer, correct=scorer.correct(a, gold),
                           hit_budget=False) for lam, a in answers.items()]


def test_read_paired_flags_reads_the_older_per_lambda_files(tmp_path):
    rows = _decode_rows(1, "3", {0.0: "3", 0.5: "4"}) + _decode_rows(0, "2", {0.0: "1", 0.5: "2"})
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_paired_flags(old, 0.5) == ([False, True], [True, False])
    assert read_paired_flags(old, 0.0) == ([False, True], [False, True])
    with pytest.raises(ValueError, match="pass the chosen lambda"):
        read_paired_flags(old)
    lines = pair_rows(rows, 0.5)
    assert [ln["outcome"] for ln in lines] == ["fixed", "broken"]
    assert lines[0]["pilot+copilot"]["parsed"] == 2 and lines[1]["gold"] == "3"


# ------------------------------------------------------------------ summarize_runs
def _tool(name: str):
    """tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # a dataclass resolves its annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _summarize_module():
    return _tool("summarize_runs")


def _write_run(folder: Path, template: dict, *, seed: int, lam: float,
               pilot: list[bool], fused: list[bool]) -> None:
    """A run folder as the main job leaves it: results.json and predictions.jsonl."""
    from tcp.evaluation.predictions import paired_summary, write_predictions

    rows = []
    for i, (p, f) in enumerate(zip(pilot, fused, strict=True)):
        rows += _decode_rows(i, "7", {0.0: "7" if p else "8"})
        if lam:
            rows += _decode_rows(i, "7", {lam: "7" if f else "9"})
    lines = pair_rows(rows, lam)
    n = len(pilot)
    res = json.loads(json.dumps(template))
    res.update(seed=seed, test_size=n, paired=paired_summary(lines, lam),
               predictions=str(folder / "predictions.jsonl"))
    res["pilot"]["accuracy"] = sum(pilot) / n
    res["pilot+copilot"].update({"accuracy": sum(fused) / n, "lambda": lam,
                                 "copilot_off": lam == 0})
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(res))
    write_predictions(folder / "predictions.jsonl", lines)


def test_summarize_runs_pools_seeds(evaluated, tmp_path, capsys):
    template = evaluated[0]
    T, F = True, False
    _write_run(tmp_path / "seed0", template, seed=0, lam=0.5, pilot=[T, F, F, T],
               fused=[T, T, T, F])  # b=1, c=2
    _write_run(tmp_path / "seed1", template, seed=1, lam=1.0, pilot=[F, F, T],
               fused=[T, T, T])  # b=0, c=2
    (tmp_path / "seed2").mkdir()  # matched by the glob, holds no results.json: refused
    summarize = _summarize_module()
    summarize.main([str(tmp_path / "seed[01]"), "--json"])
    out = json.loads(capsys.readouterr().out)
    r0, r1 = out["runs"]
    assert (r0["run"], r0["seed"], r0["n"], r0["lambda"]) == ("seed0", 0, 4, 0.5)
    assert (r0["paired"]["b"], r0["paired"]["c"], r1["paired"]["b"], r1["paired"]["c"]) == \
        (1, 2, 0, 2)
    # recomputed from predictions.jsonl: what the run wrote to results.json
    assert r1["paired"] == json.loads((tmp_path / "seed1/results.json").read_text())["paired"]
    assert r1["paired"]["mcnemar_p"] == 0.5  # 2 * (1/2)^2
    pool = out["pooled"]
    assert pool["seeds"] == [0, 1] and pool["paired_runs"] == ["seed0", "seed1"]
    assert pool["pilot_accuracy"]["mean"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    assert pool["pilot_accuracy"]["sd"] == pytest.approx(statistics.stdev([2 / 4, 1 / 3]))
    assert pool["copilot_accuracy"]["mean"] == pytest.approx((3 / 4 + 1) / 2)
    p = pool["paired"]
    assert (p["n"], p["b"], p["c"], p["pilot_correct"], p["copilot_correct"]) == (7, 1, 4, 3, 6)
    assert p["mcnemar_p"] == 0.375 and p["diff"] == pytest.approx(3 / 7)  # 2 * (1 + 5) / 32
    assert p["diff_ci95"][0] <= 3 / 7 <= p["diff_ci95"][1]

    summarize.main([str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    text = capsys.readouterr().out
    assert "| seed0 | 0 | 4 | 0.5000 | 0.7500 | 0.5 | +25.0 [" in text
    assert ("pooled over 2 runs (seeds 0, 1), mean ± sd over runs: Pilot 0.4167 ± 0.1179, "
            "Pilot+Copilot 0.8750 ± 0.1768") in text
    assert ("paired test over the 7 pooled test examples (2 runs): +42.9 points [") in text
    assert "exact McNemar p = 0.375 (b=1 only the Pilot right, c=4 only Pilot+Copilot " in text
    with pytest.raises(SystemExit, match=r"holds no results\.json"):
        summarize.main([str(tmp_path / "seed*")])


def test_summarize_runs_pools_each_task_apart(evaluated, tmp_path, capsys):
    T, F = True, False
    runs = {"c0": ("choice", 0, [T, F, F], [T, T, F]),      # b=0, c=1
            "y0": ("yesno", 0, [T, T], [F, T]),             # b=1, c=0
            "c1": ("choice", 1, [F, F], [T, T]),            # b=0, c=2
            "u0": ("jsonl", 0, [T], [T])}
    for name, (source, seed, pilot, fused) in runs.items():
        _write_run(tmp_path / name, evaluated[0], seed=seed, lam=0.5, pilot=pilot, fused=fused)
        data = {"source": source} | ({"train_path": "/data/my_set.jsonl"}
                                     if source == "jsonl" else {})
        (tmp_path / name / "config.yaml").write_text(json.dumps({"seed": seed, "data": data}))
    summarize = _summarize_module()
    summarize.main([str(tmp_path / n) for n in runs] + ["--json"])
    out = json.loads(capsys.readouterr().out)
    mine = "jsonl:/data/my_set.jsonl"
    assert [r["task"] for r in out["runs"]] == ["choice", "yesno", "choice", mine]
    tasks = out["tasks"]
    assert list(tasks) == ["choice", "yesno", mine]
    ch = tasks["choice"]
    assert ch["seeds"] == [0, 1] and ch["paired_runs"] == ["c0", "c1"]
    assert (ch["paired"]["n"], ch["paired"]["b"], ch["paired"]["c"]) == (5, 0, 3)
    assert ch["pilot_accuracy"]["mean"] == pytest.approx((1 / 3 + 0) / 2)
    assert (tasks["yesno"]["paired"]["b"], tasks["yesno"]["paired"]["c"]) == (1, 0)
    assert out["pooled"]["paired"]["n"] == 8  # all tasks together
    summarize.main([str(tmp_path / n) for n in runs])
    text = capsys.readouterr().out
    assert "| choice | 2 (0, 1) | 0.1667 ± 0.2357 | 0.8333 ± 0.2357 | +400.0% | +60.0 [" in text
    assert "| 0.25 | 0 | 3 | 5 |" in text  # exact McNemar p = 2 * (1/2)^3, b, c, n


def test_summarize_runs_pairs_a_matched_size_pilot_with_runs_of_its_task_and_seed(
        evaluated, tmp_path, capsys):
    T, F = True, False
    runs = {"a0": ("arithmetic", 0, [T, F], [T, T]), "a1": ("arithmetic", 1, [F, F], [T, F]),
            "c0": ("choice", 0, [T, T], [T, T]), "m0": ("arithmetic", 0, [F, F], [F, F])}
    for name, (source, seed, pilot, fused) in runs.items():
        _write_run(tmp_path / name, evaluated[0], seed=seed, lam=0.5, pilot=pilot, fused=fused)
        (tmp_path / name / "config.yaml").write_text(json.dumps({"seed": seed,
                                                                 "data": {"source": source}}))
        res = json.loads((tmp_path / name / "results.json").read_text())
        res["params"] = {"pilot": 1_650_000 if name == "m0" else 820_000, "copilot": 830_000}
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    _summarize_module().main([str(tmp_path / n) for n in ("a0", "a1", "c0")]
                             + ["--matched", str(tmp_path / "m0")])
    table = capsys.readouterr().out.split("\n\n")[0]
    assert "| arithmetic | 0 | 0.5000 (0.82M) | 1.0000 (1.65M, λ=0.5) | 0.0000 (1.65M) |" in table
    assert "choice" not in table and "| arithmetic | 1 |" not in table  # other task, other seed
    assert "mean ± sd (1 runs)" in table


def test_summarize_runs_without_predictions_uses_results_and_skips_pooling(evaluated,
                                                                         tmp_path, capsys):
    _write_run(tmp_path / "a", evaluated[0], seed=3, lam=0.0, pilot=[True, False],
               fused=[True, False])
    (tmp_path / "a" / "predictions.jsonl").unlink()
    summarize = _summarize_module()
    summarize.main([str(tmp_path / "a"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["runs"][0]["paired"]["copilot_off"] is True and out["runs"][0]["paired"]["b"] == 0
    assert out["pooled"]["paired"] is None and out["pooled"]["pilot_accuracy"]["sd"] is None
    summarize.main([str(tmp_path / "a")])
    text = capsys.readouterr().out
    assert "| a | 3 | 2 | 0.5000 | 0.5000 | 0 (Copilot off) | +0.0 [+0.0, +0.0] | 1 | 0 | 0 |" \
        in text
    assert "paired test over pooled examples: n/a (no run has predictions.jsonl)" in text


def test_summarize_runs_help_documents_the_output():
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "tools" / "summarize_runs.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for words in ("--json", "McNemar", "bootstrap", "mean ± sd", "predictions.jsonl"):
        assert words in out, words


# ------------------------------------------------------------------ analyze_choice
def _line(split: str, index: int, prompt: str, gold: str, pilot: str, fused: str) -> dict:
    decode = {"pilot": pilot, "pilot+copilot": fused}
    return {"split": split, "index": index, "prompt": prompt, "gold": gold, "lambda": 1.0,
            **{w: {"generation": g, "correct": g == gold} for w, g in decode.items()}}


def test_analyze_choice_counts_values_checks_and_labels(tmp_path, capsys):
    prompt = "Q: 7+5?\nanswer1: 12\nanswer2: 13\nanswer3: 11\nanswer4: 10\nA: "
    gold = "12. answer1: 12 yes, so the correct answer is answer1"
    lines = [_line("test", 0, prompt, gold,                                  # fixed
                   "13. answer1: 12 no, answer2: 13 yes, so the correct answer is answer2", gold),
             _line("test", 1, prompt, gold,
                   "12. answer1: 12 yes, so the correct answer is answer3",
                   "12. answer1: 13 yes, so the correct answer is answer1"),
             _line("test", 2, prompt, gold, "99. answer1: 12 no", "x"),
             _line("validation", 0, prompt, gold, gold, gold)]              # not counted
    path = tmp_path / "p.predictions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _tool("analyze_choice").report(path)
    out = capsys.readouterr().out
    assert "(test n = 3)" in out
    assert "| another option | check right | names its option | 1 | 0 |" in out
    assert "| right value | check right | names another option | 1 | 0 |" in out
    assert "| right value | check right | names its option | 0 | 1 |" in out
    assert "| right value | check wrong | names its option | 0 | 1 |" in out
    assert "| not an option | - | - | 1 | 0 |" in out
    assert "| unparsable | - | - | 0 | 1 |" in out
    assert "pilot: exact match 0 of 3" in out and "pilot+copilot: exact match 1 of 3" in out
