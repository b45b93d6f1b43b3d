"""Evaluation does not silently mislead: eval.max_new_tokens=auto sized from the data, truncation
at the budget counted and warned about, λ = 0 ("Copilot off") as a candidate, and
predictions.jsonl saying why an answer failed."""

import json

import pytest
import torch

from tcp.config import ConfigError, RunConfig, load_config
from tcp.data.collate import collate, encode_prompt, tokenize_records
from tcp.evaluation.answer_scoring import AnswerScorer
from tcp.evaluation.decode_budget import (
    TruncationError,
    check_truncation,
    pilot_context,
    resolve_budget,
)
from tcp.evaluation.decoding import DecodeOptions, fused_generate
from tcp.evaluation.generation_eval import GenResult
from tcp.evaluation.lambda_choice import choose_lambda
from tcp.evaluation.protocol import evaluate_and_report
from tcp.evaluation.report import format_table
from tcp.evaluation.stats import mcnemar_exact
from tcp.models.pilot import PilotTap
from tests.helpers import sample_prompts, tiny_copilot, tiny_pilot

CPU = torch.device("cpu")
# Multiple-choice answers of 21 characters = 21 tokens of the character tokenizer: longer than
# the old default budget (8), as in the "the choice is answer2".
LONG = [{"prompt": f"Q: pick {i}\nA: ", "answer": f"the choice is answer{i}"} for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained():
    """A tiny Pilot that has memorised the three long answers (a few seconds on CPU)."""
    torch.manual_seed(0)
    model, tok = tiny_pilot(seed=0, d=64, layers=2)
    batch = collate(tokenize_records(LONG, tok, max_length=96)[0], tok.pad_token_id)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.005:
            break
    return model.eval(), tok


def _cfg(tmp_path, *overrides: str) -> RunConfig:
    return load_config(None, [f"output_dir={tmp_path}", "eval.answer_format=choice",
                              "eval.lambdas=[0.5,1.0]", "eval.batch_size=2",
                              "data.max_length=96", *overrides])


def _evaluate(cfg: RunConfig, model, tok, copilot, *, predictions=None) -> dict:
    """evaluate_and_report with plain modules (world 1), the budget resolved as run() does."""
    samples, _ = tokenize_records(LONG, tok, max_length=cfg.data.max_length)
    ctx, encdec = pilot_context(model, max_length=cfg.data.max_length)
    budget = resolve_budget(cfg.eval, {"train": samples, "validation": samples}, tok,
                            context=ctx, encoder_decoder=encdec)
    tap = PilotTap(model)
    try:
        return evaluate_and_report(cfg, pilot=model, copilot=copilot, tap=tap, tokenizer=tok,
                                   val_records=LONG, test_records=LONG, val_samples=samples,
                                   rank=0, world=1, device=CPU, budget=budget,
                                   predictions_path=predictions)
    finally:
        tap.remove()


def _zero_copilot(model):
    """A fresh Copilot: zero head, so f = 0 and every λ decodes like the Pilot."""
    return tiny_copilot(model.config.vocab_size, model.config.hidden_size)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ the budget
def test_config_default_is_auto_and_numbers_still_win():
    assert RunConfig().eval.max_new_tokens == "auto"
    assert load_config(None, ["eval.max_new_tokens=32"]).eval.max_new_tokens == 32
    assert load_config("configs/default.yaml").eval.max_new_tokens == "auto"
    for bad in ("eval.max_new_tokens=0", "eval.max_new_tokens=many",
                "eval.truncation_warn_frac=1.5"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [bad])
        assert str(e.value).startswith(bad.split("=")[0] + ":"), str(e.value)


def test_resolver_margin_cap_and_explicit_number():
    _, tok = tiny_pilot()
    samples, _ = tokenize_records(LONG, tok, max_length=96)
    prompt = max(s.prompt_len for s in samples)
    ev = RunConfig().eval
    b = resolve_budget(ev, {"train": samples, "validation": samples[:1]}, tok, context=256)
    assert (b.tokens, b.longest_answer, b.margin) == (22, 21, 1)  # + EOS
    assert b.describe() == ("eval.max_new_tokens=auto -> 22 (longest train/validation answer "
                            "21 tokens + 1 margin for EOS)")
    ev.stop = ["\n#"]  # a 2-token stop string
    assert resolve_budget(ev, {"train": samples}, tok, context=256).tokens == 21 + 2 + 1
    capped = resolve_budget(ev, {"train": samples}, tok, context=prompt + 10)
    assert capped.tokens == 10 and "capped by the Pilot's context at 10" in capped.describe()
    # an encoder-decoder reads the prompt in its encoder: the cap is the context itself
    assert resolve_budget(ev, {"train": samples}, tok, context=prompt + 10,
                          encoder_decoder=True).tokens == prompt + 10
    ev.max_new_tokens = 8
    fixed = resolve_budget(ev, {"train": samples}, tok, context=256)
    assert fixed.tokens == 8 and "shorter than the longest answer + EOS (22)" in fixed.describe()
    ev.max_new_tokens = "auto"
    with pytest.raises(ValueError, match=r"eval\.max_new_tokens to a number"):
        resolve_budget(ev, {"train": []}, tok, context=256)


def test_auto_scores_an_answer_longer_than_the_old_default(trained, tmp_path):
    model, tok = trained
    res = _evaluate(_cfg(tmp_path), model, tok, _zero_copilot(model))
    assert res["decoding"]["max_new_tokens"] == 22 and res["decoding"]["budget"]["requested"] \
        == "auto"
    assert res["pilot"]["accuracy"] == 1.0 and res["validation"]["pilot_accuracy"] == 1.0
    t = res["truncation"]
    assert t["validation"]["truncated"] == t["test"]["truncated"] == 0 and t["warning"] is None
    table = format_table(res)
    assert "eval.max_new_tokens=auto -> 22" in table and "WARNING" not in table
    assert "validation 0.0% (0/3), test 0.0% (0/3)" in table


def test_forced_small_budget_counts_truncation_and_warns(trained, tmp_path, capsys):
    model, tok = trained
    res = _evaluate(_cfg(tmp_path, "eval.max_new_tokens=8"), model, tok, _zero_copilot(model),
                    predictions=tmp_path / "predictions.jsonl")
    assert res["pilot"]["accuracy"] == 0.0  # every answer cut: what the run reported
    t = res["truncation"]
    assert (t["validation"]["truncated"], t["validation"]["generations"]) == (3, 3)  # λ = 0
    assert [x["truncated"] for x in t["validation"]["by_lambda"]] == [3, 3, 3]
    assert (t["test"]["truncated"], t["test"]["share"]) == (3, 1.0)
    assert t["over_threshold"] == ["validation", "test"]
    assert "eval.max_new_tokens=8" in t["warning"]
    table = format_table(res)
    assert table.count("WARNING") == 1 and "Raise eval.max_new_tokens" in table
    assert "validation 100.0% (3/3), test 100.0% (3/3)" in table
    check_truncation(res)  # not strict: the warning is all
    res["truncation"]["strict"] = True
    with pytest.raises(TruncationError, match=r"eval\.strict=true"):
        check_truncation(res)


def test_strict_tcp_eval_exits_2_after_writing_results(tmp_path, capsys):
    from tcp.cli.tcp_eval import eval_main
    from tests.unit.test_eval_cli import make_run

    run = make_run(tmp_path / "a")
    assert eval_main([str(run), "--limit", "3", "eval.max_new_tokens=1", "eval.strict=true"]) == 2
    out, err = capsys.readouterr()
    assert "eval.strict=true" in err and "eval.max_new_tokens=1" in err
    assert "eval.max_new_tokens=1 (set in the config" in out  # the budget used is printed
    assert (run / "eval" / "eval.json").exists()  # the evidence is on disk


def test_train_cli_maps_strict_truncation_to_exit_2(monkeypatch, tmp_path, capsys):
    """run() raises TruncationError (after writing its results) under eval.strict; the CLI
    turns it into exit code 2 (the 2-rank job was checked by hand: both ranks exit 2)."""
    import tcp.training.joint_job
    from tcp.cli.tcp_train import train_main

    def strict_failure(cfg):
        raise TruncationError("12.5% of test generations ... eval.strict=true")

    monkeypatch.setattr(tcp.training.joint_job, "run", strict_failure)
    assert train_main(["--config", "configs/default.yaml", f"output_dir={tmp_path}"]) == 2
    assert "evaluation error: 12.5% of test generations" in capsys.readouterr().err


def test_tcp_eval_lambda_zero_scores_the_pilot_alone(tmp_path, capsys):
    from tcp.cli.tcp_eval import eval_main
    from tests.unit.test_eval_cli import make_run

    run = make_run(tmp_path / "a")
    assert eval_main([str(run), "--lambda", "-1"]) == 2
    assert "--lambda must be >= 0" in capsys.readouterr().err
    assert eval_main([str(run), "--lambda", "0", "--limit", "3"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    pc = res["pilot+copilot"]
    assert pc["lambda"] == 0 and pc["copilot_off"] and pc["accuracy"] == res["pilot"]["accuracy"]
    assert res["validation"]["sweep"] == [] and res["validation"]["copilot_helped"] is None
    assert len(_rows(run / "eval" / "eval.predictions.jsonl")) == 3
    assert "the Copilot is off (λ=0 given)" in capsys.readouterr().out


def test_parse_failure_reason_and_budget_hit_in_predictions(trained, tmp_path):
    model, tok = trained
    cut = tmp_path / "cut.jsonl"
    _evaluate(_cfg(tmp_path, "eval.max_new_tokens=8"), model, tok, _zero_copilot(model),
              predictions=cut)
    lines = _rows(cut)  # one per example; λ = 0 chosen, so both decodes are the Pilot's
    assert [r["index"] for r in lines] == [0, 1, 2] and {r["lambda"] for r in lines} == {0.0}
    assert all(r["pilot"] == r["pilot+copilot"] for r in lines)
    for r in (ln["pilot"] for ln in lines):
        assert r["generation"] == r["answer_text"] == "the choi" and r["lambda"] == 0.0
        assert r["parsed"] is None and r["parse_error"] == "no choice found"
        assert r["hit_budget"] is True and r["correct"] is False
    full = tmp_path / "full.jsonl"
    _evaluate(_cfg(tmp_path), model, tok, _zero_copilot(model), predictions=full)
    for i, ln in enumerate(_rows(full)):
        r = ln["pilot"]
        assert ln["gold"] == r["answer_text"] == LONG[i]["answer"] and ln["split"] == "test"
        assert (r["parsed"], r["parse_error"], r["correct"], r["hit_budget"]) == \
            (i + 1, None, True, False)


def test_parse_with_reason_leaves_scoring_unchanged():
    num = AnswerScorer("numeric")
    assert num.parse_with_reason("so 42.") == (42, None)
    assert num.parse_with_reason("no idea") == (None, "no number found")
    assert num.parse_with_reason("  ") == (None, "empty answer")
    assert AnswerScorer("choice").parse_with_reason("the choi") == (None, "no choice found")
    assert AnswerScorer("yesno").parse_with_reason("maybe")[1] == "no yes/no/true/false found"
    assert num.correct("it is 42", "42") and not num.correct("no idea", "42")


# ------------------------------------------------------------------ λ = 0
def _gen(lambdas, accuracy):
    L = len(lambdas)
    return GenResult(lambdas=lambdas, accuracy=accuracy, flips=[0] * L,
                     flipped_rows_correct=[0] * L, flipped_rows=[0] * L, max_abs_f_median=0,
                     pilot_margin_median=0, n=10)


def _counted(lambdas, accuracy, fixes, breaks):
    g = _gen(lambdas, accuracy)
    g.fixes, g.breaks = fixes, breaks
    return g


def test_choose_lambda_needs_a_gain_beyond_noise_with_lambda_significance():
    # +2 answers of 10 (2 fixed, 0 broken): McNemar p = 0.5, noise
    few = _counted([0.0, 0.5], [0.5, 0.7], [0, 2], [0, 0])
    assert choose_lambda(few) == (0.5, 0.7)  # the old rule takes any gain
    assert choose_lambda(few, 0.05) == (0.0, 0.5)
    # 20 fixed, 0 broken: p = 1.9e-6, well below 0.05 / 2
    many = _counted([0.0, 0.5, 1.0], [0.5, 0.7, 0.6], [0, 20, 10], [0, 0, 0])
    assert choose_lambda(many, 0.05) == (0.5, 0.7)
    # 8 fixed, 1 broken: p = 0.039 < 0.05, but two lambdas were tried: needs p < 0.025 ...
    mid = _counted([0.0, 0.5, 1.0], [0.5, 0.57, 0.5], [0, 8, 0], [0, 1, 0])
    assert choose_lambda(mid, 0.05) == (0.0, 0.5)
    # ... while with one lambda tried p < 0.05 is enough
    assert choose_lambda(_counted([0.0, 0.5], [0.5, 0.57], [0, 8], [0, 1]), 0.05) == (0.5, 0.57)
    # the most accurate λ is noise (p = 0.082) but a smaller one's gain is not: that one is used
    two = _counted([0.0, 0.5, 1.0], [0.5, 0.7, 0.75], [0, 20, 40], [0, 0, 25])
    assert choose_lambda(two) == (1.0, 0.75) and choose_lambda(two, 0.05) == (0.5, 0.7)
    # uncounted fixes/breaks cannot show significance: off
    assert choose_lambda(_gen([0.0, 0.5], [0.5, 0.9]), 0.05) == (0.0, 0.5)


def test_choose_lambda_switches_the_copilot_off_unless_it_helps():
    assert choose_lambda(_gen([0.0, 0.5, 1.0], [0.8, 0.7, 0.6])) == (0.0, 0.8)  # only hurts
    assert choose_lambda(_gen([0.0, 0.5, 1.0], [0.8, 0.8, 0.8])) == (0.0, 0.8)  # ties: off
    assert choose_lambda(_gen([0.0, 0.5, 1.0, 2.0], [0.5, 0.6, 0.7, 0.7])) == (1.0, 0.7)
    assert choose_lambda(_gen([0.0], [0.4])) == (0.0, 0.4)


def test_a_copilot_that_only_hurts_is_switched_off(trained, tmp_path):
    model, tok = trained
    cop = _zero_copilot(model)
    with torch.no_grad():  # f pushes one wrong token hard at every step, for every λ > 0
        cop.head.bias[tok.convert_tokens_to_ids("x")] = 50.0
    preds = tmp_path / "predictions.jsonl"
    res = _evaluate(_cfg(tmp_path), model, tok, cop, predictions=preds)
    v, pc = res["validation"], res["pilot+copilot"]
    assert v["pilot_accuracy"] == 1.0 and all(s["accuracy"] == 0.0 for s in v["sweep"])
    # every answer the Pilot got right is broken, none fixed (counted per answer, per lambda)
    assert all((s["fixes"], s["breaks"]) == (0, v["size"]) for s in v["sweep"])
    assert all(s["mcnemar_p"] == mcnemar_exact(v["size"], 0) for s in v["sweep"])
    assert pc["lambda"] == 0 and pc["copilot_off"] and v["copilot_helped"] is False
    assert pc["accuracy"] == res["pilot"]["accuracy"] == 1.0 and pc["flips"] == 0
    t = res["truncation"]
    assert t["test"]["generations"] == 3  # test decoded once, with the Pilot alone
    # the rejected λs run on ('x' forever): shown per λ, not counted against the budget
    assert [x["truncated"] for x in t["validation"]["by_lambda"]] == [0, 3, 3]
    assert t["validation"]["share"] == 0.0 and t["warning"] is None
    assert {r["lambda"] for r in _rows(preds)} == {0.0} and len(_rows(preds)) == 3
    table = format_table(res)
    assert "the Copilot did not help on validation" in table
    assert "Pilot (Copilot off)  <- chosen" in table and "Pilot+Copilot (λ=0)" in table
    assert res["rectification"]["lambda"] == 0.5  # traced at the best λ > 0 instead
    # had the best λ gained within noise, the table says so, with its counts and p
    v["sweep"][0].update(accuracy=1.0 + 1 / 3, fixes=1, breaks=0, mcnemar_p=1.0)
    assert ("no λ gained beyond noise on validation (the most accurate, λ=0.5: 1 fixed, "
            "0 broken, McNemar p = 1; needs p < 0.05/2; eval.lambda_significance), so "
            "Pilot+Copilot is the Pilot alone. With 3 validation examples a gain of a few points "
            "rarely passes: give validation at least 1000 examples") in format_table(res)
    v["size"] = 1000  # no advice once validation is large enough
    assert "rarely passes" not in format_table(res)


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_hit_budget_marks_rows_without_eos(trained, strategy):
    """Without stop strings a row hit the budget exactly when it holds T tokens (no EOS): the
    trained Pilot ends its 21-token answers with EOS, so T <= 21 cuts them and T >= 22 not."""
    model, tok = trained
    # A random Copilot flattens the fused distribution: sampling could draw the pad token,
    # which cuts the returned ids though the row ran on; sampling sees the Pilot alone.
    cop = None if strategy == "sample" else tiny_copilot(model.config.vocab_size, 64,
                                                          randomize_head=True)
    tap = PilotTap(model)
    prompts = [encode_prompt(tok, r["prompt"]) for r in LONG]
    seen = set()
    for T in (5, 21, 22, 40):
        toks, st = fused_generate(model, tap, cop, prompts, lambdas=[0.0, 1.0],
                                  opts=DecodeOptions(strategy=strategy, num_beams=2,
                                                     max_new_tokens=T),
                                  eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=CPU)
        flat = [t for per_lam in toks for t in per_lam]
        assert st.hit_budget is not None
        assert st.hit_budget.tolist() == [len(t) == T for t in flat], (strategy, T)
        if strategy != "sample":  # the Pilot alone (λ = 0) decodes its memorised answers
            assert st.hit_budget[:3].tolist() == [T <= 21] * 3
        seen |= set(st.hit_budget.tolist())
    tap.remove()
    assert seen == {True, False}


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_stop_string_is_not_a_budget_hit(strategy):
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    prompts = sample_prompts(tok)
    kw = dict(lambdas=[0.0], eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=CPU,
              decode=tok.decode)
    full, st = fused_generate(model, tap, None, prompts,
                              opts=DecodeOptions(strategy=strategy, max_new_tokens=6), **kw)
    text = tok.decode(full[0][0])
    assert st.hit_budget is not None and bool(st.hit_budget[0]), "row 0 runs to the budget"
    _, st = fused_generate(model, tap, None, prompts, opts=DecodeOptions(
        strategy=strategy, max_new_tokens=6, stop=[text[1]]), **kw)
    assert st.hit_budget is not None and not bool(st.hit_budget[0])
