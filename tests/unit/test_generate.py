"""Fused decoding: zero-initialised Copilot == Pilot alone == HF generate (greedy and beam);
batched == one by one; sampling reproducible by seed; beams reorder the Copilot's state."""

import pytest
import torch

from tcp.evaluation.decode_caches import FusedState
from tcp.evaluation.decoding import DecodeOptions, cut_at_stop, fused_generate
from tcp.evaluation.generation_eval import GenResult
from tcp.evaluation.lambda_choice import choose_lambda
from tcp.models.pilot import PilotTap
from tests.helpers import hf_generated, sample_prompts, tiny_copilot, tiny_pilot


def test_zero_copilot_fused_equals_pilot_and_hf_generate():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size)
    prompts = sample_prompts(tok)
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
        assert toks[0][b] == hf_generated(ref, tok)


def test_nonzero_copilot_changes_decoding_and_counts_flips():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    toks, st = fused_generate(model, tap, cop, sample_prompts(tok), lambdas=[0.0, 50.0],
                              fusion="probs", max_new_tokens=5, eos_id=tok.eos_token_id,
                              pad_id=tok.pad_token_id, device=torch.device("cpu"))
    assert toks[1] != toks[0]
    assert int(st.flips[3:].sum()) > 0 and int(st.flips[:3].sum()) == 0
    assert max(st.max_abs_f) > 0
    # one margin and one max|f| per (row, step) while the row was unfinished
    assert len(st.margin) == len(st.max_abs_f) and 6 <= len(st.margin) <= 6 * st.steps
    assert all(0 <= m <= 1 for m in st.margin)


def test_choose_lambda_prefers_best_then_smallest():
    r = GenResult(lambdas=[0.0, 0.5, 1.0, 2.0], accuracy=[0.5, 0.6, 0.7, 0.7], flips=[0] * 4,
                  flipped_rows_correct=[0] * 4, flipped_rows=[0] * 4, max_abs_f_median=0,
                  pilot_margin_median=0, n=10)
    assert choose_lambda(r) == (1.0, 0.7)


CPU = torch.device("cpu")


def _gen(model, tap, cop, prompts, tok, lambdas, **kw):
    opts = DecodeOptions(**kw)
    return fused_generate(model, tap, cop, prompts, lambdas=lambdas, opts=opts,
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=CPU,
                          decode=tok.decode)



@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_beam_with_zero_copilot_equals_hf_pilot_beam_search(fusion):
    """Zero-initialised Copilot at lambda 1 and 3: the beams equal HF's own beam search of the
    Pilot (4 beams, length penalty 1, early_stopping='never': the exact stopping rule)."""
    model, tok = tiny_pilot(seed=5)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size)
    prompts = sample_prompts(tok)
    toks, _ = _gen(model, tap, cop, prompts, tok, [0.0, 1.0, 3.0], strategy="beam",
                   num_beams=4, max_new_tokens=6, fusion=fusion)
    assert toks[1] == toks[0] and toks[2] == toks[0]
    for b, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                             max_new_tokens=6, num_beams=4, do_sample=False,
                             early_stopping="never", length_penalty=1.0,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert toks[0][b] == hf_generated(ref[0, len(p):].tolist(), tok), b
    # Beam search differs from greedy somewhere on these prompts (the test has teeth).
    greedy, _ = _gen(model, tap, None, prompts, tok, [0.0], max_new_tokens=6)
    assert greedy[0] != toks[0]


def test_beam_search_finishes_on_eos_like_hf():
    """A Pilot whose EOS is likely: finished hypotheses compete with running ones as in HF."""
    model, tok = tiny_pilot(seed=8)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] += 0.35 * model.lm_head.weight.mean(0)
        model.lm_head.weight[tok.eos_token_id].mul_(6.0)
    tap = PilotTap(model)
    prompts = sample_prompts(tok)
    toks, _ = _gen(model, tap, None, prompts, tok, [0.0], strategy="beam", num_beams=3,
                   max_new_tokens=8)
    lengths = []
    for b, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                             max_new_tokens=8, num_beams=3, do_sample=False,
                             early_stopping="never", eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert toks[0][b] == hf_generated(ref, tok)
        lengths.append(len(toks[0][b]))
    assert min(lengths) < 8  # some hypothesis did end on EOS


def test_batched_decoding_equals_one_by_one():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    prompts = sample_prompts(tok)  # ragged: left padding differs per batch composition
    for kw in ({}, {"strategy": "beam", "num_beams": 3}):
        batched, _ = _gen(model, tap, cop, prompts, tok, [0.0, 2.0], max_new_tokens=6, **kw)
        for b, p in enumerate(prompts):
            single, _ = _gen(model, tap, cop, [p], tok, [0.0, 2.0], max_new_tokens=6, **kw)
            assert single[0][0] == batched[0][b] and single[1][0] == batched[1][b], (kw, b)
        assert batched[1] != batched[0]  # the Copilot changes something


def test_sampling_is_reproducible_by_seed_and_varies_across_seeds():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    prompts = sample_prompts(tok) * 2
    kw = dict(strategy="sample", max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.95)
    a, _ = _gen(model, tap, cop, prompts, tok, [0.0, 1.0], seed=7, **kw)
    b, _ = _gen(model, tap, cop, prompts, tok, [0.0, 1.0], seed=7, **kw)
    c, _ = _gen(model, tap, cop, prompts, tok, [0.0, 1.0], seed=8, **kw)
    assert a == b and a != c


def test_top_k_one_sampling_is_greedy():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    greedy, _ = _gen(model, tap, cop, sample_prompts(tok), tok, [0.0, 0.5], max_new_tokens=6)
    sampled, _ = _gen(model, tap, cop, sample_prompts(tok), tok, [0.0, 0.5], max_new_tokens=6,
                      strategy="sample", top_k=1, seed=3)
    assert sampled == greedy


def test_reorder_moves_the_copilot_state_with_the_beam():
    """Decoding rows [a, b] then reordering to [b, a] gives the next f of running [b, a]."""
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    pa, pb = sample_prompts(tok)[:2]
    s1 = FusedState.create(model, tap, cop, CPU)
    s1.start([pa, pb], tok.pad_token_id)
    s1.advance(torch.tensor([20, 21]))
    s1.reorder(torch.tensor([1, 0]))
    z1, f1 = s1.advance(torch.tensor([22, 23]))
    s2 = FusedState.create(model, tap, cop, CPU)
    s2.start([pb, pa], tok.pad_token_id)
    s2.advance(torch.tensor([21, 20]))
    z2, f2 = s2.advance(torch.tensor([22, 23]))
    torch.testing.assert_close(z1, z2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f1, f2, rtol=1e-5, atol=1e-5)
    assert f1.abs().max() > 0


def test_stop_strings_end_rows_and_cut_text():
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    prompts = sample_prompts(tok)
    full, _ = _gen(model, tap, None, prompts, tok, [0.0], max_new_tokens=8)
    text0 = tok.decode(full[0][0])
    stop = text0[2]  # a character the first row produces at its third step
    cut, _ = _gen(model, tap, None, prompts, tok, [0.0], max_new_tokens=8, stop=[stop])
    assert tok.decode(cut[0][0]).endswith(stop) and len(cut[0][0]) <= 3
    assert cut_at_stop(tok.decode(cut[0][0]), [stop]) == text0[:text0.index(stop)]
    assert cut_at_stop("12\nQ: next", ["\n", "Q:"]) == "12"


def test_decoding_passes_the_cache_by_its_current_name():
    """No deprecated keyword: with transformers' `cache` rename, fused decoding (greedy and
    beam, Copilot on) raises no `past_key_values` deprecation; under a peft wrapper the keyword
    is the wrapped HF model's."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from tcp.evaluation.decode_caches import cache_keyword

    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for beams in (1, 2):
            _gen(model, tap, cop, sample_prompts(tok), tok, [0.0, 1.0], num_beams=beams,
                 max_new_tokens=4)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    with warnings.catch_warnings():  # peft reads HF's deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_keyword(peft) == cache_keyword(model)


@pytest.mark.parametrize("feedback", ["prediction", "realised"])
def test_copilot_feedback_is_its_own_f_or_the_realised_error(feedback):
    """What the Copilot reads as the previous error at each decoding step: its own previous f
    (the paper), or onehot(emitted token) - the Pilot's p_hat that emitted it (training's ell);
    reordering (beam search) keeps it with its row."""
    model, tok = tiny_pilot(seed=3)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.hidden_size, randomize_head=True)
    seen: list = []
    step = cop.forward

    def spy(*args, **kw):  # the real Copilot, recording the prev_f each step is given
        if "prev_f" in kw:
            seen.append(None if kw["prev_f"] is None else kw["prev_f"].clone())
        return step(*args, **kw)

    cop.forward = spy
    state = FusedState.create(model, tap, cop, CPU, feedback)
    z, f = state.start(sample_prompts(tok)[:2], tok.pad_token_id)
    for toks in ([20, 21], [22, 23]):
        want = (torch.nn.functional.one_hot(torch.tensor(toks), z.shape[-1]).float()
                - torch.softmax(z, -1)) if feedback == "realised" else f
        z, f = state.advance(torch.tensor(toks))
        torch.testing.assert_close(seen[-1], want)
    assert seen[0] is None and len(seen) == 3
    state.reorder(torch.tensor([1, 0]))
    want = (torch.nn.functional.one_hot(torch.tensor([24, 25]), z.shape[-1]).float()
            - torch.softmax(z, -1)[[1, 0]]) if feedback == "realised" else f[[1, 0]]
    state.advance(torch.tensor([24, 25]))
    torch.testing.assert_close(seen[-1], want)
    with pytest.raises(ValueError, match=r"copilot_feedback must be prediction\|realised"):
        DecodeOptions(copilot_feedback="label")
