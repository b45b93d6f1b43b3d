"""Encoder-decoder (T5) Pilots: teacher-forced capture, fused head, decoding == HF generate, and
the decoding layout == the training layout the Copilot learns from (for both Pilot families)."""

import pytest
import torch

from tcp.data.collate import collate
from tcp.evaluation.decode_caches import FusedState
from tcp.evaluation.decoding import DecodeOptions, fused_generate
from tcp.models.copilot_inputs import build_inputs
from tcp.models.lm_head import HeadOptions, use_fused_head
from tcp.models.log_entries import collect
from tcp.models.pilot import PilotTap, pilot_forward, seq2seq_inputs
from tests.helpers import (
    hf_generated,
    sample_prompts,
    tiny_copilot,
    tiny_pilot,
    tiny_t5,
    tokenized_batch,
)

CPU = torch.device("cpu")


def test_teacher_forced_t5_matches_hf_loss_and_fused_head():
    model, tok = tiny_t5(seed=1)
    tap = PilotTap(model)
    assert tap.encoder_decoder and len(tap.layers) == 2
    batch = collate(tokenized_batch(tok, n=3), tok.pad_token_id)
    eager = pilot_forward(model, tap, batch, head=HeadOptions(topk=4, fused=False))
    inp = seq2seq_inputs(batch, model.config.decoder_start_token_id, tok.pad_token_id)
    labels = torch.full_like(inp["decoder_input_ids"], -100)
    for b, (p, n) in enumerate(zip(batch["prompt_len"].tolist(), batch["target_len"].tolist(),
                                   strict=True)):
        labels[b, :n] = batch["input_ids"][b, p:p + n]
    ref = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], labels=labels,
                output_hidden_states=True)
    torch.testing.assert_close(eager.loss, ref.loss)
    # X~ is the encoder output at the prompt tokens, h the layer-mean of the decoder blocks.
    enc = ref.encoder_last_hidden_state
    torch.testing.assert_close(eager.x_tilde[:int(batch["prompt_len"][0])],
                               enc[0, :int(batch["prompt_len"][0])])
    assert eager.x_tilde.shape[0] == int(batch["prompt_len"].sum())
    assert eager.pooled.shape[0] == int(batch["target_len"].sum())
    use_fused_head(model)
    fused = pilot_forward(model, tap, batch, head=HeadOptions(topk=4, fused=True, impl="torch"))
    torch.testing.assert_close(fused.loss, eager.loss)
    torch.testing.assert_close(fused.pooled, eager.pooled)
    torch.testing.assert_close(fused.topk_probs, eager.topk_probs, rtol=1e-5, atol=1e-6)




@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_t5_fused_decoding_with_zero_copilot_equals_hf_generate(strategy):
    model, tok = tiny_t5(seed=2)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.d_model, encoder_decoder=True)
    prompts = sample_prompts(tok)
    opts = DecodeOptions(strategy=strategy, num_beams=3, max_new_tokens=6)
    toks, st = fused_generate(model, tap, cop, prompts, lambdas=[0.0, 1.0], opts=opts,
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=CPU)
    assert toks[1] == toks[0] and int(st.flips.sum()) == 0
    for b, p in enumerate(prompts):
        kw = {"num_beams": 3, "early_stopping": "never"} if strategy == "beam" else {}
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                             max_new_tokens=6, do_sample=False, **kw)[0, 1:].tolist()
        assert toks[0][b] == hf_generated(ref, tok), b


def test_t5_batched_equals_one_by_one_with_a_trained_looking_copilot():
    model, tok = tiny_t5(seed=2)
    tap = PilotTap(model)
    cop = tiny_copilot(model.config.vocab_size, model.config.d_model, encoder_decoder=True,
                       randomize_head=True)
    prompts = sample_prompts(tok)
    for strategy in ("greedy", "beam"):
        opts = DecodeOptions(strategy=strategy, num_beams=2, max_new_tokens=5)
        kw = dict(opts=opts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=CPU)
        batched, _ = fused_generate(model, tap, cop, prompts, lambdas=[0.0, 3.0], **kw)
        for b, p in enumerate(prompts):
            one, _ = fused_generate(model, tap, cop, [p], lambdas=[0.0, 3.0], **kw)
            assert one[0][0] == batched[0][b] and one[1][0] == batched[1][b]
        assert batched[1] != batched[0]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_decoding_layout_equals_training_layout(family):
    """Fed the true tokens and the true errors, the decoding loop's pooled states and Copilot
    outputs equal the teacher-forced ones the Copilot is trained on (positions, X~, h agree)."""
    model, tok = tiny_t5(seed=3) if family == "t5" else tiny_pilot(seed=3)
    tap = PilotTap(model)
    d = model.config.hidden_size if family == "llama" else model.config.d_model
    cop = tiny_copilot(model.config.vocab_size, d, encoder_decoder=family == "t5",
                       randomize_head=True)
    sample = tokenized_batch(tok, n=1, seed=5)
    batch = collate(sample, tok.pad_token_id)
    out = pilot_forward(model, tap, batch)
    V = model.config.vocab_size
    entries = collect(out, topk=V, step=0, rank=0, sample_id=batch["sample_id"])
    f_tf = cop(build_inputs(entries, CPU))[0]
    ell = entries.dense_errors(V)
    p = int(batch["prompt_len"][0])
    ids = batch["input_ids"][0].tolist()
    state = FusedState.create(model, tap, cop, CPU)
    z, f = state.start([ids[:p]], tok.pad_token_id)
    n = int(batch["target_len"][0])
    for i in range(n):
        torch.testing.assert_close(f[0], f_tf[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.softmax(z[0], -1)[entries.labels[i]],
                                   1 - ell[i, entries.labels[i]], rtol=1e-4, atol=1e-5)
        if i == n - 1:
            break
        state.prev_f = ell[i][None]  # teacher-force the Copilot's input as in training
        z, f = state.advance(torch.tensor([ids[p + i]]))
