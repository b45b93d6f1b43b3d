"""Pilot tap: X~, layer-mean pooled states and top-k match HF's own outputs."""

import torch

from tcp.data.collate import collate, tokenize_records
from tcp.models.log_entries import collect
from tcp.models.pilot import PilotTap, flat_indices, pilot_forward
from tests.helpers import tiny_pilot


def _batch(tok):
    recs = [{"prompt": "Q: 12+30=\nA: ", "answer": "42"}, {"prompt": "Q: 7-2=\nA: ", "answer": "5"}]
    samples, _ = tokenize_records(recs, tok, max_length=64)
    return collate(samples, tok.pad_token_id)


def test_tap_matches_output_hidden_states():
    model, tok = tiny_pilot(layers=3)
    tap = PilotTap(model)
    batch = _batch(tok)
    out = pilot_forward(model, tap, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True)
    (b_in, t_in), (b_y, t_y) = flat_indices(batch["prompt_len"], batch["target_len"])
    hs = ref.hidden_states  # embeddings, then layers (HF's last entry is after the final norm)
    # So collect raw layer outputs independently and compare the pooled mean against them.
    layer_outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: layer_outs.append(o[0] if isinstance(
        o, tuple) else o)) for layer in model.model.layers]
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in hooks:
        h.remove()
    expect = torch.stack([o[b_y, t_y] for o in layer_outs]).float().mean(0)
    torch.testing.assert_close(out.pooled, expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer_outs[0][b_y, t_y], hs[1][b_y, t_y])
    torch.testing.assert_close(out.x_tilde, hs[0][b_in, t_in])
    torch.testing.assert_close(out.target_logits, ref.logits[b_y, t_y])
    # labels are the answer tokens + EOS, in order
    assert tok.decode(out.labels[: int(batch["target_len"][0]) - 1].tolist()) == "42"
    tap.remove()


def test_loss_is_cross_entropy_on_answer_tokens_only():
    model, tok = tiny_pilot()
    tap = PilotTap(model)
    batch = _batch(tok)
    out = pilot_forward(model, tap, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_collect_topk_and_residual():
    model, tok = tiny_pilot()
    tap = PilotTap(model)
    batch = _batch(tok)
    out = pilot_forward(model, tap, batch)
    e = collect(out, topk=4, step=3, rank=1, sample_id=batch["sample_id"])
    p = torch.softmax(out.target_logits.float(), -1)
    torch.testing.assert_close(e.topk_probs, p.topk(4, -1).values)
    torch.testing.assert_close(e.residual + e.topk_probs.sum(-1), torch.ones(e.num_tokens))
    assert e.step.tolist() == [3, 3] and e.rank.tolist() == [1, 1]
    assert e.prompt_lens.tolist() == batch["prompt_len"].tolist()
    exact = collect(out, topk=10_000, step=0, rank=0, sample_id=batch["sample_id"])
    assert exact.topk_ids.shape[1] == p.shape[1]  # k capped at V: exact errors
    assert float(exact.residual.abs().max()) < 1e-5
