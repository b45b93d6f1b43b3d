"""Initialising the Copilot from pretrained sources (GQA LLaMA, Qwen2 with biases, llama3 RoPE,
T5 incl. FLAN-T5-small's head split), its save/load (tcp-eval), and gradient checkpointing."""

from __future__ import annotations

import io

import pytest
import torch

from tcp.config import CopilotConfig
from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths
from tcp.models.copilot import Copilot, ErrorTarget
from tcp.models.copilot_init import init_copilot_from
from tcp.models.copilot_inputs import build_inputs

V = 40
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def random_batch(prompt_lens: list[int], target_lens: list[int], *, d: int, k: int = 4,
                 seed: int = 0) -> MistakeBatch:
    """Mistake Log entries of Pilot width d with random top-k errors."""
    g = torch.Generator().manual_seed(seed)
    P, N, B = sum(prompt_lens), sum(target_lens), len(prompt_lens)
    top_p, top_i = torch.rand(N, V, generator=g).softmax(-1).topk(k, -1)
    return MistakeBatch(
        x_tilde=torch.randn(P, d, generator=g),
        x_offsets=offsets_from_lengths(torch.tensor(prompt_lens)),
        h=torch.randn(N, d, generator=g),
        y_offsets=offsets_from_lengths(torch.tensor(target_lens)),
        labels=torch.randint(V, (N,), generator=g), topk_ids=top_i, topk_probs=top_p,
        residual=1 - top_p.sum(-1), step=torch.zeros(B, dtype=torch.long),
        sample_id=torch.arange(B), rank=torch.zeros(B, dtype=torch.long), loss=torch.zeros(B),
    )


def gqa_source(family: str = "llama", *, tie: bool = False, scaled_rope: bool = False,
               bias: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny GQA decoder built from config (8 query / 2 key-value heads), random biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=tie,
              max_position_embeddings=4096)
    if family == "qwen2":
        cfg, cls = Qwen2Config(**kw, rope_theta=1e6), Qwen2ForCausalLM
    else:
        extra = {"rope_scaling": LLAMA3_ROPE, "rope_theta": 5e5} if scaled_rope else {}
        cfg, cls = LlamaConfig(**kw, attention_bias=bias, **extra), LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF's small init (biases zero) would hide a wrong head or angle
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0, 0.5)
    return model


def copilot_for(*, d: int = 64, heads: int = 8, inner: int = 96, layers: int = 2,
                encoder_decoder: bool = False, pilot_hidden: int | None = None,
                **kw) -> Copilot:
    cfg = CopilotConfig(hidden_size=d, intermediate_size=inner, num_layers=layers,
                        num_heads=heads, init_from="none", **kw)
    return Copilot(cfg, vocab_size=V, pilot_hidden=pilot_hidden or d,
                   encoder_decoder=encoder_decoder).eval()


def assert_same_shapes(att: torch.nn.Module, src_att: torch.nn.Module) -> None:
    """q/k/v/o weights and biases have the source's shapes (GQA kept, nothing repeated)."""
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        ours, theirs = getattr(att, name), getattr(src_att, name)
        assert ours.weight.shape == theirs.weight.shape, name
        assert (ours.bias is None) == (theirs.bias is None), name
        if ours.bias is not None:
            assert ours.bias.shape == theirs.bias.shape, name


def attention_outputs(cop: Copilot, src: torch.nn.Module, layer: int, pos0: int):
    """The Copilot's and the source's self-attention of `layer` on the same input/positions."""
    torch.manual_seed(1)
    x = torch.randn(2, 7, 64)
    pos = torch.arange(pos0, pos0 + 7)[None].expand(2, -1)
    cs = cop.rotary(pos)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    ours, _ = cop.layers[layer].self_attn(x, kv_src=x, q_rope=cs, k_rope=cs, mask=causal)
    body = src.model
    theirs, _ = body.layers[layer].self_attn(
        hidden_states=x, position_embeddings=body.rotary_emb(x, pos), attention_mask=None)
    return ours, theirs


@pytest.mark.parametrize(("family", "tie", "scaled", "bias"), [
    ("llama", False, False, False),
    ("llama", True, True, False),  # LLaMA-3.2: tied embeddings, 'llama3' RoPE scaling
    ("llama", False, False, True),  # attention_bias: q/k/v and o biases
    ("qwen2", True, False, True),  # Qwen2.5: q/k/v biases, theta 1e6, tied embeddings
])
def test_gqa_source_attention_equals_the_source(family, tie, scaled, bias):
    src = gqa_source(family, tie=tie, scaled_rope=scaled, bias=bias)
    cop = copilot_for(layers=2, num_kv_heads=2)  # the source's 8 query / 2 key-value heads
    names = init_copilot_from(cop, src)
    assert "layers.1.self_attn.k_proj.weight" in names and "rotary" in names
    for layer in (0, 1):  # a self- and a (modified) cross-attention layer
        assert_same_shapes(cop.layers[layer].self_attn, src.model.layers[layer].self_attn)
        ours, theirs = attention_outputs(cop, src, layer, pos0=3000)  # past the llama3 knee
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):  # copied as they are
            torch.testing.assert_close(getattr(cop.layers[layer].self_attn, p).weight,
                                       getattr(src.model.layers[layer].self_attn, p).weight)
    x = torch.randn(3, 64)
    torch.testing.assert_close(cop.layers[1].mlp(x), src.model.layers[1].mlp(x))
    torch.testing.assert_close(cop.err_proj.weight, src.get_input_embeddings().weight)
    assert cop.head.weight.abs().max() == 0  # still neutral
    if scaled:  # the test can tell: plain RoPE at the same theta gives another attention
        plain = copilot_for(layers=2, num_kv_heads=2)
        init_copilot_from(plain, src)
        plain.rotary.set_frequencies(1.0 / (5e5 ** (torch.arange(0, 8, 2).float() / 8)))
        ours, theirs = attention_outputs(plain, src, 0, pos0=3000)
        assert (ours - theirs).abs().max() > 1e-2


def test_multi_head_copilot_repeats_gqa_heads_per_group():
    """The fallback for a Copilot left multi-head (num_kv_heads unset): same attention."""
    src = gqa_source("qwen2", bias=True)
    cop = copilot_for(layers=2)
    init_copilot_from(cop, src)
    k_src, k_cop = src.model.layers[0].self_attn.k_proj, cop.layers[0].self_attn.k_proj
    assert k_cop.weight.shape == (64, 64)
    hd = 8
    for head in range(8):  # query head j reads key/value head j // (8 / 2)
        g = head // 4
        torch.testing.assert_close(k_cop.weight[head * hd:(head + 1) * hd],
                                   k_src.weight[g * hd:(g + 1) * hd])
        torch.testing.assert_close(k_cop.bias[head * hd:(head + 1) * hd],
                                   k_src.bias[g * hd:(g + 1) * hd])
    assert cop.layers[0].self_attn.o_proj.bias is None  # Qwen2's o_proj has none
    ours, theirs = attention_outputs(cop, src, 0, pos0=5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_mismatched_head_settings_name_the_keys():
    src = gqa_source("llama")
    with pytest.raises(ValueError, match=r"copilot\.num_kv_heads=4 but the source has 2"):
        init_copilot_from(copilot_for(num_kv_heads=4), src)
    with pytest.raises(ValueError, match=r"copilot\.head_dim=16 \(heads of 16\).* 8 wide"):
        init_copilot_from(copilot_for(num_kv_heads=2, head_dim=16), src)


def test_encoder_decoder_copilot_from_llama_style_source():
    """d_P == d_C: cross-attention starts as the same block's self-attention (q/k/v/o)."""
    src = gqa_source("qwen2", tie=True)
    cop = copilot_for(layers=2, encoder_decoder=True, num_kv_heads=2)
    names = init_copilot_from(cop, src)
    assert "layers.1.cross_attn.k_proj.weight" in names
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(getattr(cop.layers[1].cross_attn, name).weight,
                                   getattr(cop.layers[1].self_attn, name).weight)
    assert_same_shapes(cop.layers[1].cross_attn, src.model.layers[1].self_attn)
    torch.testing.assert_close(cop.layers[1].cross_layernorm.weight,
                               src.model.layers[1].input_layernorm.weight)


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_memory_keys_values_start_fresh_when_the_pilot_is_wider(encoder_decoder):
    """d_P != d_C: memory rows reach k/v through a random d_P -> d_C projection, so the
    memory attention's k/v keep their initialisation; q/o are still copied."""
    src = gqa_source("llama")
    torch.manual_seed(5)
    cop = copilot_for(layers=2, num_kv_heads=2, pilot_hidden=48,
                      encoder_decoder=encoder_decoder)
    fresh = {n: p.clone() for n, p in cop.named_parameters()}
    names = init_copilot_from(cop, src)
    a = src.model.layers[1].self_attn
    mem = cop.layers[1].cross_attn if encoder_decoder else cop.layers[1].self_attn
    prefix = "layers.1.cross_attn" if encoder_decoder else "layers.1.self_attn"
    for p in ("k_proj", "v_proj"):
        assert f"{prefix}.{p}.weight" not in names
        torch.testing.assert_close(getattr(mem, p).weight, fresh[f"{prefix}.{p}.weight"])
    for p in ("q_proj", "o_proj"):
        assert f"{prefix}.{p}.weight" in names
        torch.testing.assert_close(getattr(mem, p).weight, getattr(a, p).weight)
    # Self-attention (layer 0, and the encoder-decoder's layer 1 self_attn) is copied whole.
    torch.testing.assert_close(cop.layers[0].self_attn.k_proj.weight,
                               src.model.layers[0].self_attn.k_proj.weight)
    if encoder_decoder:
        torch.testing.assert_close(cop.layers[1].self_attn.v_proj.weight, a.v_proj.weight)


def roundtrip(cop: Copilot, *, encoder_decoder: bool = False) -> Copilot:
    """final/copilot.pt as tcp-eval loads it: a state dict into a Copilot built from config."""
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in cop.state_dict().items()}, buf)
    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=True)
    fresh = Copilot(cop.cfg, vocab_size=V, pilot_hidden=cop.mem_proj.proj.in_features,
                    encoder_decoder=encoder_decoder)
    fresh.load_state_dict(state)
    return fresh.eval()


def test_save_load_keeps_rope_scaling_and_biases():
    src = gqa_source("llama", tie=True, scaled_rope=True, bias=True)
    cop = copilot_for(layers=2, num_kv_heads=2)
    init_copilot_from(cop, src)
    with torch.no_grad():
        cop.head.weight.normal_(0, 0.5)
    again = roundtrip(cop)
    assert again.layers[0].self_attn.k_proj.weight.shape == (16, 64)  # 2 heads of 8
    torch.testing.assert_close(again.rotary.inv_freq, cop.rotary.inv_freq, rtol=0, atol=0)
    assert again.layers[0].self_attn.q_proj.bias is not None
    x = build_inputs(random_batch([5, 3], [4, 6], d=64), "cpu")
    torch.testing.assert_close(again(x), cop(x))
    ours, theirs = attention_outputs(again, src, 0, pos0=3000)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_rope_frequencies_survive_a_bf16_cast_and_old_state_dicts_load():
    src = gqa_source("llama", scaled_rope=True)
    cop = copilot_for(layers=2, num_kv_heads=2)
    init_copilot_from(cop, src)
    inv = cop.rotary.inv_freq.clone()
    cop.to(torch.bfloat16)  # what a bf16 DeepSpeed engine does to buffers
    torch.testing.assert_close(cop.rotary.inv_freq, inv, rtol=0, atol=0)
    # A Copilot saved before the rotary state existed: plain RoPE with rope_theta.
    plain = copilot_for(layers=2, rope_theta=500.0)
    old = {k: v for k, v in plain.state_dict().items() if not k.startswith("rotary.")}
    fresh = copilot_for(layers=2, rope_theta=500.0)
    fresh.rotary.set_frequencies(inv)  # must be reset to the default by the load
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.rotary.inv_freq, plain.rotary.inv_freq)


def test_incompatible_sources_name_the_keys():
    src = gqa_source("llama")
    with pytest.raises(ValueError, match=r"copilot\.hidden_size=32.*copilot\.num_heads=4"):
        init_copilot_from(copilot_for(d=32, heads=4, inner=96), src)
    with pytest.raises(ValueError, match=r"copilot\.num_layers=4"):
        init_copilot_from(copilot_for(layers=4, num_kv_heads=2), src)
    with pytest.raises(ValueError, match="neither a LLaMA-style decoder"):
        init_copilot_from(copilot_for(), torch.nn.Linear(2, 2))


def tiny_t5_source(seed: int = 0) -> torch.nn.Module:
    """A tiny gated-GELU T5 (d 32, 4 heads of 8, d_ff 64, 2 layers) as tcp builds T5 Pilots."""
    from tcp.config import ArchConfig
    from tcp.models.pilot import build_t5

    arch = ArchConfig(family="t5", hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4)
    return build_t5(arch, vocab_size=V, pad_id=0, eos_id=1, seed=seed).eval()


@pytest.mark.parametrize("encoder_decoder", [True, False])
def test_t5_source_copies_blocks_and_runs(encoder_decoder):
    t5 = tiny_t5_source()
    cfg = CopilotConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        init_from="none")
    cop = Copilot(cfg, vocab_size=V, pilot_hidden=32, encoder_decoder=encoder_decoder).eval()
    names = init_copilot_from(cop, t5)
    assert "rotary" not in names  # T5 has no RoPE: the Copilot keeps rope_theta
    dec = t5.decoder
    for i, blk in enumerate(cop.layers):
        s = dec.block[i]
        mem_att = blk.cross_attn if encoder_decoder else blk.self_attn
        if blk.kind != "cross":
            sa = s.layer[0].SelfAttention
            torch.testing.assert_close(blk.self_attn.k_proj.weight, sa.k.weight)
            torch.testing.assert_close(blk.self_attn.q_proj.weight, sa.q.weight * 8 ** 0.5)
        if blk.kind != "self":
            ca = s.layer[1].EncDecAttention
            for ours, theirs in (("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
                torch.testing.assert_close(getattr(mem_att, ours).weight,
                                           getattr(ca, theirs).weight)
        ff = s.layer[2]
        torch.testing.assert_close(blk.mlp.gate_proj.weight, ff.DenseReluDense.wi_0.weight)
        torch.testing.assert_close(blk.mlp.up_proj.weight, ff.DenseReluDense.wi_1.weight)
        torch.testing.assert_close(blk.mlp.down_proj.weight, ff.DenseReluDense.wo.weight)
        torch.testing.assert_close(blk.post_attention_layernorm.weight, ff.layer_norm.weight)
    torch.testing.assert_close(cop.err_proj.weight, dec.embed_tokens.weight)
    torch.testing.assert_close(cop.norm.weight, dec.final_layer_norm.weight)
    batch = random_batch([5, 3], [4, 6], d=32)
    x = build_inputs(batch, "cpu")
    f = cop(x)
    assert f.shape == (2, 6, V) and f.abs().max() == 0  # zero head: neutral
    loss, zero = cop(x, target=ErrorTarget.from_batch(batch, "cpu"))
    assert torch.isfinite(loss) and torch.isfinite(zero)


def test_t5_cross_attention_logits_match_at_position_zero():
    """With every rotary position 0 (no rotation) the copied cross-attention is T5's: the q
    weights carry the sqrt(d_kv) that T5's unscaled logits lack."""
    t5 = tiny_t5_source()
    cfg = CopilotConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        init_from="none")
    cop = Copilot(cfg, vocab_size=V, pilot_hidden=32, encoder_decoder=True).eval()
    init_copilot_from(cop, t5)
    torch.manual_seed(3)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    zeros = cop.rotary(torch.zeros(2, 5, dtype=torch.long))
    zk = cop.rotary(torch.zeros(2, 9, dtype=torch.long))
    ours, _ = cop.layers[0].cross_attn(x, kv_src=mem, q_rope=zeros, k_rope=zk, mask=None)
    theirs = t5.decoder.block[0].layer[1].EncDecAttention(x, key_value_states=mem)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def flan_t5_small_shaped(heads: int = 6, d_kv: int = 4) -> torch.nn.Module:
    """FLAN-T5-small's shape in small: heads x d_kv (6 x 4 = 24) != d_model (32), gated GELU."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=32, d_ff=64, d_kv=d_kv, num_heads=heads, num_layers=2,
        feed_forward_proj="gated-gelu")).eval()


@pytest.mark.parametrize("encoder_decoder", [True, False])
def test_flan_t5_small_shaped_source_initialises_with_head_dim(encoder_decoder):
    t5 = flan_t5_small_shaped()
    cfg = CopilotConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=6,
                        head_dim=4, init_from="none")
    cop = Copilot(cfg, vocab_size=V, pilot_hidden=32, encoder_decoder=encoder_decoder).eval()
    init_copilot_from(cop, t5)
    sa = t5.decoder.block[0].layer[0].SelfAttention
    att = cop.layers[0].self_attn
    assert att.q_proj.weight.shape == sa.q.weight.shape == (24, 32)
    assert att.o_proj.weight.shape == sa.o.weight.shape == (32, 24)
    assert cop.rotary.inv_freq.shape == (2,)
    if encoder_decoder:  # cross-attention at rotary position 0 is T5's (see the test above)
        torch.manual_seed(3)
        x, mem = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
        zq = cop.rotary(torch.zeros(2, 5, dtype=torch.long))
        zk = cop.rotary(torch.zeros(2, 9, dtype=torch.long))
        ours, _ = cop.layers[1].cross_attn(x, kv_src=mem, q_rope=zq, k_rope=zk, mask=None)
        theirs = t5.decoder.block[1].layer[1].EncDecAttention(x, key_value_states=mem)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    batch = random_batch([5, 3], [4, 6], d=32)
    x = build_inputs(batch, "cpu")
    loss, zero = cop(x, target=ErrorTarget.from_batch(batch, "cpu"))
    assert torch.isfinite(loss) and torch.isfinite(zero)
    again = roundtrip(cop, encoder_decoder=encoder_decoder)
    torch.testing.assert_close(again(x), cop(x))


def test_t5_head_split_mismatch_names_head_dim():
    t5 = flan_t5_small_shaped(heads=4, d_kv=4)  # 4 x 4 = 16 != 32
    cfg = CopilotConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        init_from="none")  # heads of 32 / 4 = 8
    with pytest.raises(ValueError, match=r"copilot\.head_dim=None \(heads of 8\).* 4 wide"):
        init_copilot_from(Copilot(cfg, vocab_size=V, pilot_hidden=32, encoder_decoder=True), t5)
    gqa = CopilotConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4, init_from="none")
    with pytest.raises(ValueError, match=r"copilot\.num_kv_heads=2 but the source has 4"):
        init_copilot_from(Copilot(gqa, vocab_size=V, pilot_hidden=32, encoder_decoder=True), t5)


@pytest.mark.parametrize("heads", [{}, {"num_kv_heads": 2, "head_dim": 6}])
@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_gradient_checkpointing_same_loss_and_gradients(encoder_decoder, heads):
    batch = random_batch([5, 3], [4, 6], d=32)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cop = copilot_for(d=32, heads=4, inner=64, layers=4, encoder_decoder=encoder_decoder,
                          gradient_checkpointing=ckpt, **heads).train()
        with torch.no_grad():
            cop.head.weight.normal_(0, 0.5)
        calls = []
        # A pre-hook: the recompute stops early (before the block returns), post-hooks miss it.
        cop.layers[0].register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        x = build_inputs(batch, "cpu")
        loss, _ = cop(x, target=ErrorTarget.from_batch(batch, "cpu", fused=False))
        loss.backward()
        assert len(calls) == (2 if ckpt else 1)  # recomputed in the backward
        results.append((loss.detach(), {n: p.grad for n, p in cop.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_gradient_checkpointing_is_off_without_grad_and_in_decoding():
    cop = copilot_for(d=32, heads=4, inner=64, layers=2, gradient_checkpointing=True).train()
    calls = []
    cop.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    x = build_inputs(random_batch([5], [4], d=32), "cpu")
    with torch.no_grad():
        cop(x)
    cache = cop(prefix=(x.mem[:, :5], x.mem_valid[:, :5], x.mem_pos[:, :5]))
    cop(cache=cache, prev_f=None, h_new=x.mem[:, 5], pos=x.q_pos[:, 0])
    assert len(calls) == 2  # once each, never recomputed


@pytest.mark.parametrize("kind", ["qwen2", "t5"])
def test_build_copilot_initialises_from_a_local_folder(tmp_path, kind):
    """`copilot.init_from=<folder>`: a T5 loads as seq2seq, a decoder as a causal LM."""
    from tcp.config import load_config
    from tcp.training.build import build_copilot

    src = tiny_t5_source() if kind == "t5" else gqa_source("qwen2", tie=True)
    src.save_pretrained(tmp_path / "src")
    d, inner = (32, 64) if kind == "t5" else (64, 96)
    cfg = load_config(None, [f"copilot.hidden_size={d}", f"copilot.intermediate_size={inner}",
                             "copilot.num_layers=2", f"copilot.num_heads={4 if d == 32 else 8}",
                             f"copilot.init_from={tmp_path / 'src'}"])
    cop = build_copilot(cfg, vocab=V, d_pilot=d, base=None, pilot_encoder_decoder=kind == "t5")
    assert cop.encoder_decoder == (kind == "t5")
    embed = src.get_input_embeddings().weight
    torch.testing.assert_close(cop.err_proj.weight, embed.float())


def test_build_copilot_refuses_a_source_with_another_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from tcp.config import load_config
    from tcp.data.tokenizer import build_char_tokenizer
    from tcp.training.build import build_copilot

    tok = build_char_tokenizer()
    src = gqa_source("qwen2", tie=True)
    src.save_pretrained(tmp_path / "src")
    cfg = load_config(None, ["copilot.hidden_size=64", "copilot.intermediate_size=96",
                             "copilot.num_layers=2", "copilot.num_heads=8",
                             f"copilot.init_from={tmp_path / 'src'}"])
    tok.save_pretrained(tmp_path / "src")  # same tokenizer: accepted
    build_copilot(cfg, vocab=V, d_pilot=64, base=None, tokenizer=tok)
    other = PreTrainedTokenizerFast.from_pretrained(tmp_path / "src")
    other.add_tokens(["<another-family>"])
    other.save_pretrained(tmp_path / "src")
    with pytest.raises(RuntimeError, match="tokenizer differs from the Pilot's"):
        build_copilot(cfg, vocab=V, d_pilot=64, base=None, tokenizer=tok)


def test_tcp_eval_rebuilds_a_gqa_copilot_from_the_run_config(tmp_path):
    """load_run builds the Copilot from the run's config.yaml (num_kv_heads, head_dim) and
    loads final/copilot.pt into it: same outputs."""
    from tcp.config import dump_yaml, load_config
    from tcp.evaluation.run_loading import load_run, run_config
    from tests.helpers import tiny_pilot

    pilot, tok = tiny_pilot(d=32)
    run = tmp_path / "run"
    cfg = load_config("configs/default.yaml", [
        f"output_dir={run}", "copilot.init_from=none", "copilot.hidden_size=32",
        "copilot.intermediate_size=64", "copilot.num_layers=2", "copilot.num_heads=4",
        "copilot.num_kv_heads=2", "copilot.head_dim=6"])
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(cfg))
    tok.save_pretrained(run / "tokenizer")
    pilot.save_pretrained(run / "final" / "pilot")
    vocab = pilot.config.vocab_size
    torch.manual_seed(0)
    cop = Copilot(cfg.copilot, vocab_size=vocab, pilot_hidden=32).eval()
    with torch.no_grad():
        cop.head.weight.normal_(0, 0.5)
    torch.save(cop.state_dict(), run / "final" / "copilot.pt")
    loaded = load_run(run, run_config(run, []), pilot_from=None, device=torch.device("cpu"))
    att = loaded.copilot.layers[1].self_attn
    assert (att.kv_heads, att.hd, att.k_proj.weight.shape) == (2, 6, (12, 32))
    g = torch.Generator().manual_seed(0)
    batch = random_batch([5, 3], [4, 6], d=32)
    batch.labels = torch.randint(vocab, batch.labels.shape, generator=g)
    batch.topk_ids = torch.randint(vocab, batch.topk_ids.shape, generator=g)
    x = build_inputs(batch, "cpu")
    torch.testing.assert_close(loaded.copilot(x), cop(x))


@pytest.mark.parametrize("extra", [8, -8])
def test_embedding_tables_padded_differently_share_their_rows(extra):
    """Qwen2.5-7B's table has 128 rows more than Qwen2.5-0.5B's (one tokenizer): the error
    projection takes the shared rows; the rest keep their initialisation."""
    src = gqa_source("qwen2", tie=True)
    cfg = CopilotConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8,
                        num_kv_heads=2, init_from="none")
    cop = Copilot(cfg, vocab_size=V + extra, pilot_hidden=64)
    before = cop.err_proj.weight.detach().clone()
    init_copilot_from(cop, src)
    n = min(V, V + extra)
    embed = src.get_input_embeddings().weight
    torch.testing.assert_close(cop.err_proj.weight[:n], embed[:n])
    torch.testing.assert_close(cop.err_proj.weight[n:], before[n:])
