"""Fused decoding: zero-initialised Copilot == Pilot alone == HF greedy generate."""

import torch

from tcp.evaluate import GenResult, answer_correct, choose_lambda
from tcp.generate import fused_generate
from tcp.models.pilot import PilotTap
from tests.helpers import tiny_copilot, tiny_pilot


def _prompts(tok):
    texts = ["Q: 12+30=\nA: ", "Q: 7-2=\nA: ", "Q: Ann has 3 cups and gets 4 more.\nA: "]
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_zero_copilot_fused_equals_pilot_and_hf_generate():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size)
    prompts = _prompts(tok)
    for fusion in ("probs", "logits"):
        toks, st = fused_generate(model, tap, cop, prompts, lambdas=[0.0, 1.0, 2.0],
                                  fusion=fusion, max_new_tokens=7, eos_id=tok.eos_token_id,
                                  pad_id=tok.pad_token_id, device=torch.device("cpu"))
        assert toks[1] == toks[0] and toks[2] == toks[0]
        assert int(st.flips.sum()) == 0
    # Pilot-only rows equal HF's own greedy decoding, prompt by prompt (no batching effects).
    for b, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                             max_new_tokens=7, do_sample=False, eos_token_id=-1,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        want = []
        for t in ref:
            if t in (tok.eos_token_id, tok.pad_token_id):
                break
            want.append(t)
        assert toks[0][b] == want


def test_nonzero_copilot_changes_decoding_and_counts_flips():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    toks, st = fused_generate(model, tap, cop, _prompts(tok), lambdas=[0.0, 50.0],
                              fusion="probs", max_new_tokens=5, eos_id=tok.eos_token_id,
                              pad_id=tok.pad_token_id, device=torch.device("cpu"))
    assert toks[1] != toks[0]
    assert int(st.flips[3:].sum()) > 0 and int(st.flips[:3].sum()) == 0
    assert max(st.max_abs_f) > 0


def test_choose_lambda_prefers_best_then_smallest():
    r = GenResult(lambdas=[0.0, 0.5, 1.0, 2.0], accuracy=[0.5, 0.6, 0.7, 0.7], flips=[0] * 4,
                  flipped_rows_correct=[0] * 4, flipped_rows=[0] * 4, max_abs_f_median=0,
                  pilot_margin_median=0, n=10)
    assert choose_lambda(r) == (1.0, 0.7)


def test_answer_match():
    assert answer_correct(" 42 ", "42") and not answer_correct("421", "42")
