"""No tensor with a vocabulary-sized dimension beyond the logits: every op of a training step,
of decoding (greedy and beam) and of evaluation is watched, and none may produce a tensor with
a dimension >= V + 1 (views of the logits excepted: they allocate nothing). V is made larger
than every other dimension here, so the rule is checked with a small model.

Also: the chunked teacher-forced diagnostics equal a dense reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tcp.config import ArchConfig
from tcp.data.collate import collate
from tcp.evaluation.decoding import DecodeOptions, fused_generate
from tcp.evaluation.diagnostics import teacher_forced_diagnostics
from tcp.evaluation.generation_eval import generation_eval
from tcp.kernels.copilot_loss import per_sequence_rmse
from tcp.models.copilot import ErrorTarget
from tcp.models.copilot_inputs import build_inputs
from tcp.models.lm_head import HeadOptions, use_fused_head
from tcp.models.log_entries import collect
from tcp.models.pilot import PilotTap, build_llama, pilot_forward
from tests.helpers import sample_prompts, tiny_copilot, tokenized_batch

V = 2003  # > every other dimension below (d 32, MLP 64, rows x prompt tokens < 1000)
CPU = torch.device("cpu")


class VocabGuard(TorchDispatchMode):
    """Records every op whose (non-view) output has a dimension >= limit."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.hits: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and any(s >= self.limit for s in t.shape):
                    self.hits.append((str(func), tuple(t.shape)))
        return out


@pytest.fixture(scope="module")
def models():
    from tcp.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    arch = ArchConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    pilot = build_llama(arch, vocab_size=V, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id,
                        eos_id=tok.eos_token_id, seed=0).eval()
    use_fused_head(pilot)
    cop = tiny_copilot(V, 32, randomize_head=True)
    return pilot, PilotTap(pilot, impl="torch"), cop, tok


def test_guard_catches_a_vocab_plus_one_gather():
    # The shape the old diagnostics built: the error projection gathered for all V+1 ids.
    w, ids = torch.randn(V, 8), torch.zeros(3, V + 1, dtype=torch.long)
    with VocabGuard(V + 1) as g:
        w[ids].sum(-2)
    assert g.hits == [("aten.index.Tensor", (3, V + 1, 8))]


@pytest.mark.parametrize("fused", [True, False])
def test_training_step_has_no_vocab_plus_one_tensor(models, fused):
    pilot, tap, cop, tok = models
    batch = collate(tokenized_batch(tok, n=6), tok.pad_token_id)
    with VocabGuard(V + 1) as g:
        out = pilot_forward(pilot, tap, batch,
                            head=HeadOptions(topk=8, fused=fused, impl="torch", chunk_mib=0.05))
        entries = collect(out, topk=8, step=0, rank=0, sample_id=batch["sample_id"])
        target = ErrorTarget.from_batch(entries, CPU, fused=fused, impl="torch", chunk_mib=0.05)
        loss, _ = cop(build_inputs(entries, CPU), target=target)
        (out.loss + loss).backward()
    assert g.hits == []


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_decoding_has_no_vocab_plus_one_tensor(models, strategy):
    pilot, tap, cop, tok = models
    opts = DecodeOptions(max_new_tokens=5, strategy=strategy, num_beams=3, top_k=5)
    with VocabGuard(V + 1) as g, torch.no_grad():
        fused_generate(pilot, tap, cop, sample_prompts(tok), lambdas=[0.0, 1.0], opts=opts,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device=CPU)
    assert g.hits == []


def test_evaluation_has_no_vocab_plus_one_tensor(models):
    pilot, tap, cop, tok = models
    samples = tokenized_batch(tok, n=8)
    records = [{"prompt": "Q: 12+30=\nA: ", "answer": "42"}, {"prompt": "Q: 7-2=\nA: ",
                                                                "answer": "5"}]
    with VocabGuard(V + 1) as g:
        teacher_forced_diagnostics(pilot, tap, cop, samples, pad_id=tok.pad_token_id, topk=8,
                                   lambdas=[0.5, 1.0], fusion="probs", batch_size=4, rank=0,
                                   world=1, device=CPU, chunk_mib=0.05)
        generation_eval(pilot, tap, cop, records, tok, lambdas=[0.0, 1.0],
                        opts=DecodeOptions(max_new_tokens=4), batch_size=2, rank=0, world=1,
                        device=CPU)
    assert g.hits == []


@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_chunked_diagnostics_equal_dense_reference(models, fusion):
    pilot, tap, cop, tok = models
    samples = tokenized_batch(tok, n=5)
    lambdas = [0.5, 3.0, 20.0]
    # A Copilot that pushes towards the most common target token, so large λ fixes some.
    cop = copy.deepcopy(cop)
    common = torch.cat([torch.tensor(s.input_ids[s.prompt_len:]) for s in samples]).mode().values
    with torch.no_grad():
        cop.head.bias[common] += 50.0
    got = teacher_forced_diagnostics(pilot, tap, cop, samples, pad_id=tok.pad_token_id,
                                     topk=8, lambdas=lambdas, fusion=fusion, batch_size=5,
                                     rank=0, world=1, device=CPU, chunk_mib=0.01)  # 5+ chunks
    # Dense reference: full (N, V) f, p̂ and ell at once.
    with torch.no_grad():
        batch = collate(samples, tok.pad_token_id)
        out = pilot_forward(pilot, tap, batch, head=HeadOptions(topk=8, fused=False))
        entries = collect(out, topk=8, step=0, rank=0, sample_id=batch["sample_id"])
        inputs = build_inputs(entries, CPU)
        f = cop(inputs)[inputs.q_valid].float()
        z = out.target_logits.float()
        p = torch.softmax(z, -1)
        ell = F.one_hot(entries.labels, V).float() - p
        seq = torch.repeat_interleave(torch.arange(5), entries.target_lens)
        rmse = per_sequence_rmse((f - ell).pow(2).sum(-1), seq, 5).mean()
        zero = per_sequence_rmse(ell.pow(2).sum(-1), seq, 5).mean()
        cos = F.cosine_similarity(f, ell, dim=-1).mean()
        ok = p.argmax(-1) == entries.labels
    assert got["copilot_rmse"] == pytest.approx(float(rmse), rel=1e-5)
    assert got["zero_rmse"] == pytest.approx(float(zero), rel=1e-5)
    assert got["cosine"] == pytest.approx(float(cos), rel=1e-4, abs=1e-6)
    assert got["pilot_token_accuracy"] == pytest.approx(float(ok.float().mean()))
    for lam in lambdas:
        fused = (p if fusion == "probs" else z) + lam * f
        fok = fused.argmax(-1) == entries.labels
        assert got["fixes"][str(lam)] == int((fok & ~ok).sum())
        assert got["breaks"][str(lam)] == int((~fok & ok).sum())
    assert sum(got["fixes"].values()) + sum(got["breaks"].values()) > 0  # the test has teeth


def test_target_row_logits_equal_full_logits(models):
    pilot, tap, _, tok = models
    batch = collate(tokenized_batch(tok, n=4), tok.pad_token_id)
    with torch.no_grad():
        rows = pilot_forward(pilot, tap, batch).target_logits  # FusedLMHead: target rows only
        full = pilot(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert rows.shape[0] == int(batch["target_len"].sum())
    from tcp.models.pilot import flat_indices

    _, tidx = flat_indices(batch["prompt_len"], batch["target_len"])
    torch.testing.assert_close(rows, full[tidx])



def test_decoding_with_last_row_logits_equals_full_logits(models):
    pilot, tap, cop, tok = models
    plain = copy.deepcopy(pilot)
    plain.set_output_embeddings(torch.nn.Linear(32, V, bias=False))
    plain.get_output_embeddings().weight = pilot.get_output_embeddings().weight
    kw = dict(lambdas=[0.0, 1.0], opts=DecodeOptions(max_new_tokens=5), eos_id=-1,
              pad_id=tok.pad_token_id, device=CPU)
    with torch.no_grad():
        a, _ = fused_generate(pilot, tap, cop, sample_prompts(tok), **kw)
        b, _ = fused_generate(plain, PilotTap(plain), cop, sample_prompts(tok), **kw)
    assert a == b
