"""Copilot: causality, sparse projection, zero-init, incremental decoding == teacher forcing."""

import pytest
import torch
from transformers import LlamaForCausalLM

from tcp.config import ArchConfig, CopilotConfig
from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths
from tcp.models.copilot import Copilot
from tcp.models.copilot_init import init_copilot_from
from tcp.models.copilot_inputs import build_inputs
from tests.helpers import tiny_copilot

V, DP = 37, 20


def random_batch(prompt_lens, target_lens, k=5, seed=0) -> MistakeBatch:
    g = torch.Generator().manual_seed(seed)
    P, N = sum(prompt_lens), sum(target_lens)
    probs = torch.rand(N, V, generator=g).softmax(-1)
    top_p, top_i = probs.topk(k, -1)
    B = len(prompt_lens)
    return MistakeBatch(
        x_tilde=torch.randn(P, DP, generator=g),
        x_offsets=offsets_from_lengths(torch.tensor(prompt_lens)),
        h=torch.randn(N, DP, generator=g),
        y_offsets=offsets_from_lengths(torch.tensor(target_lens)),
        labels=torch.randint(V, (N,), generator=g), topk_ids=top_i, topk_probs=top_p,
        residual=1 - top_p.sum(-1), step=torch.zeros(B, dtype=torch.long),
        sample_id=torch.arange(B), rank=torch.zeros(B, dtype=torch.long),
        loss=torch.zeros(B),
    )


def test_zero_initialised_head_outputs_zero():
    cop = tiny_copilot(V, DP)
    f = cop(build_inputs(random_batch([4, 6], [5, 3]), "cpu"))
    assert f.shape == (2, 5, V) and f.abs().max() == 0


def test_layers_alternate_self_and_cross():
    cop = tiny_copilot(V, DP, layers=4)
    assert [blk.kind for blk in cop.layers] == ["self", "cross", "self", "cross"]
    encdec = tiny_copilot(V, DP, layers=3, encoder_decoder=True)
    assert [blk.kind for blk in encdec.layers] == ["both"] * 3
    assert all(hasattr(blk, "cross_attn") for blk in encdec.layers)


@pytest.mark.parametrize("encoder_decoder", [False, True])
@pytest.mark.parametrize("i", [0, 2, 4])
def test_no_future_leakage(i, encoder_decoder):
    """f_i depends on X~, h_<=i and ell_<i only: perturbing anything later leaves f_i unchanged."""
    torch.manual_seed(1)
    cop = tiny_copilot(V, DP, randomize_head=True, encoder_decoder=encoder_decoder)
    batch = random_batch([6], [7])
    base = build_inputs(batch, "cpu")
    f0 = cop(base)[0]
    x = build_inputs(batch, "cpu")
    P = 6
    x.mem[0, P + i + 1:] += torch.randn_like(x.mem[0, P + i + 1:]) * 3  # h_j, j > i
    x.err_vals[0, i + 1:] = torch.rand_like(x.err_vals[0, i + 1:])  # ell_j, j >= i
    x.err_ids[0, i + 1:] = torch.randint(V, x.err_ids[0, i + 1:].shape)
    f1 = cop(x)[0]
    torch.testing.assert_close(f1[: i + 1], f0[: i + 1], rtol=0, atol=1e-6)
    assert (f1[i + 1:] - f0[i + 1:]).abs().max() > 1e-3  # later positions did see the change

    # ...and the things it may see do matter (so the test above can fail):
    y = build_inputs(batch, "cpu")
    y.mem[0, P + i] += 3.0  # h_i itself
    assert (cop(y)[0][i] - f0[i]).abs().max() > 1e-4
    z = build_inputs(batch, "cpu")
    z.mem[0, 0] += 3.0  # X~
    assert (cop(z)[0][0] - f0[0]).abs().max() > 1e-4


def test_padding_does_not_change_outputs():
    cop = tiny_copilot(V, DP, randomize_head=True)
    two = random_batch([3, 8], [6, 2], seed=4)
    both = cop(build_inputs(two, "cpu"))
    alone = cop(build_inputs(two.select([1]), "cpu"))
    torch.testing.assert_close(both[1, :2], alone[0, :2], rtol=1e-5, atol=1e-5)


def test_sparse_projection_equals_dense_projection():
    cop = tiny_copilot(V, DP)
    batch = random_batch([4], [6], k=5)
    x = build_inputs(batch, "cpu")
    start = torch.zeros(1, 6, dtype=torch.bool)
    start[0, 0] = True
    sparse = cop.err_proj(ids=x.err_ids, vals=x.err_vals, is_start=start)
    ell = batch.dense_errors(V)
    dense_in = torch.zeros(1, 6, V)
    dense_in[0, 1:] = ell[:-1]  # shifted right
    dense = cop.err_proj(dense=dense_in, is_start=start)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_label_inside_topk_is_handled():
    batch = random_batch([2], [3], k=5)
    batch.labels[:] = batch.topk_ids[:, 0]
    ell = batch.dense_errors(V)
    assert torch.allclose(ell.sum(-1), batch.residual, atol=1e-6)
    idx = torch.arange(3)
    torch.testing.assert_close(ell[idx, batch.labels], 1 - batch.topk_probs[:, 0])


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_incremental_decoding_equals_teacher_forcing(encoder_decoder):
    """KV-cached steps fed the same (dense) errors reproduce the full forward."""
    torch.manual_seed(2)
    cop = tiny_copilot(V, DP, randomize_head=True, encoder_decoder=encoder_decoder)
    batch = random_batch([5], [6], k=V)  # k = V: exact error vectors
    x = build_inputs(batch, "cpu")
    full = cop(x)[0]
    ell = batch.dense_errors(V)
    P = 5
    cache = cop(prefix=(x.mem[:, :P], x.mem_valid[:, :P], x.mem_pos[:, :P]))
    prev = None
    for i in range(6):
        f = cop(cache=cache, prev_f=prev, h_new=x.mem[:, P + i], pos=x.q_pos[:, i])
        torch.testing.assert_close(f[0], full[i], rtol=1e-4, atol=1e-5)
        prev = ell[i][None]


def test_init_from_llama_copies_blocks_and_rejects_mismatch():
    from tcp.models.pilot import build_llama

    arch = ArchConfig(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4)
    llama: LlamaForCausalLM = build_llama(arch, vocab_size=V, pad_id=0, bos_id=1, eos_id=2,
                                          seed=0)
    cfg = CopilotConfig(hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4)
    cop = Copilot(cfg, vocab_size=V, pilot_hidden=32)
    init_copilot_from(cop, llama)
    torch.testing.assert_close(cop.layers[3].self_attn.k_proj.weight,
                               llama.model.layers[3].self_attn.k_proj.weight)
    torch.testing.assert_close(cop.err_proj.weight, llama.model.embed_tokens.weight)
    assert cop.head.weight.abs().max() == 0
    bad = Copilot(CopilotConfig(hidden_size=16, intermediate_size=64, num_layers=4, num_heads=4),
                  vocab_size=V, pilot_hidden=32)
    with pytest.raises(ValueError, match="hidden_size"):
        init_copilot_from(bad, llama)


def gqa_copilot(*, encoder_decoder: bool = False, **heads) -> Copilot:
    """4 query heads sharing 2 key/value heads, heads 10 wide on a 24-wide model."""
    torch.manual_seed(2)
    kw = {"num_kv_heads": 2, "head_dim": 10} | heads
    cfg = CopilotConfig(hidden_size=24, intermediate_size=48, num_layers=4, num_heads=4,
                        init_from="none", **kw)
    cop = Copilot(cfg, vocab_size=V, pilot_hidden=DP, encoder_decoder=encoder_decoder).eval()
    with torch.no_grad():
        cop.head.weight.normal_(0, 0.5)
        cop.head.bias.normal_(0, 0.1)
    return cop


def test_default_heads_are_the_plain_multi_head_attention():
    """num_kv_heads / head_dim unset: the parameters (names, shapes, initial values) and
    outputs of the multi-head attention saved Copilots were trained with."""
    plain, explicit = gqa_copilot(num_kv_heads=None, head_dim=None), \
        gqa_copilot(num_kv_heads=4, head_dim=6)
    attn = {k: tuple(v.shape) for k, v in plain.state_dict().items()
            if k.startswith("layers.0.self_attn.")}
    assert attn == {f"layers.0.self_attn.{p}_proj.weight": (24, 24) for p in "qkvo"}
    a, b = plain.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    x = build_inputs(random_batch([4, 6], [5, 3]), "cpu")
    torch.testing.assert_close(plain(x), explicit(x), rtol=0, atol=0)


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_gqa_incremental_decoding_and_beam_reorder(encoder_decoder):
    """A GQA Copilot caches keys/values at its 2 key/value heads; cached steps (also after a
    beam reorder that swaps and duplicates rows) reproduce the teacher-forced forward."""
    cop = gqa_copilot(encoder_decoder=encoder_decoder)
    att = cop.layers[0].self_attn
    assert att.k_proj.weight.shape == (20, 24) and att.q_proj.weight.shape == (40, 24)
    assert att.o_proj.weight.shape == (24, 40)
    batch = random_batch([5, 5], [6, 6], k=V)
    x = build_inputs(batch, "cpu")
    full = cop(x)
    ell = batch.dense_errors(V).view(2, 6, V)
    P = 5
    cache = cop(prefix=(x.mem[:, :P], x.mem_valid[:, :P], x.mem_pos[:, :P]))
    assert cache.mem_kv[1][0].shape == (2, 2, P, 10)  # (B, kv heads, rows, head_dim)
    rows, prev = torch.arange(2), None
    for i in range(6):
        if i == 3:  # beam search: row 1 continues twice, row 0 once
            idx = torch.tensor([1, 0, 1])
            cache.reorder(idx)
            rows = rows[idx]
            prev = ell[rows, i - 1]
        f = cop(cache=cache, prev_f=prev, h_new=x.mem[rows, P + i], pos=x.q_pos[rows, i])
        torch.testing.assert_close(f, full[rows, i], rtol=1e-4, atol=1e-5)
        prev = ell[rows, i]
    kv = cache.kv[0] if not encoder_decoder else cache.kv[1]
    assert kv[0].shape == (3, 2, 6, 10)
