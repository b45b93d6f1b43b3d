"""Starting the Copilot from a pretrained model of the Pilot's family (docs/method.md §4, §8).

`init_copilot_from(copilot, source)` copies what maps from

- a LLaMA-style decoder (LLaMA, Qwen2, Mistral: `model.layers[i].self_attn.q_proj`, ...),
  grouped-query attention, q/k/v biases, tied or untied embeddings and scaled RoPE included;
- a T5 (`decoder.block[i].layer[...]`), heads narrower than d_model / heads included
  (FLAN-T5-small: 6 x 64 on 512),

into either Copilot variant. Attention heads are copied as they are (docs/method.md §8): the Copilot
is configured with the source's heads (copilot.num_heads, num_kv_heads, head_dim), so q/k/v/o
keep their shapes and a GQA source stays GQA. Attention reading the memory [X~ ; h] takes its
k/v only where the Pilot width equals the Copilot's (`_memory_kv_copied`).

The two pieces of the Copilot that exist because of such sources live with its attention
(tcp.models.attention): `Rotary` (the rotary frequencies, which a source may scale, e.g.
LLaMA-3's 'llama3' RoPE) and `adopt_saved_biases` (Qwen2's q/k/v biases, re-created when a saved
Copilot that has them is loaded into a Copilot built from its config). Both travel in the
Copilot's state dict, so `final/copilot.pt` rebuilds the same model in `tcp-eval`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tcp.models.attention import enable_bias
from tcp.models.copilot import Copilot

# ---------------------------------------------------------------------------------------------
# Copying a source into the Copilot


def init_copilot_from(copilot: Copilot, source: nn.Module) -> list[str]:
    """Initialise `copilot` from a pretrained LLaMA-style decoder or T5; returns the names of
    the Copilot tensors that were copied (the head stays zero, so the Copilot starts neutral).

    Raises ValueError naming the copilot.* keys to change when the shapes do not fit.
    """
    if _llama_body(source) is not None:
        return _init_from_llama_style(copilot, source)
    if _t5_decoder(source) is not None:
        return _init_from_t5(copilot, source)
    raise ValueError(f"copilot.init_from: cannot initialise the Copilot from a "
                     f"{type(source).__name__}: neither a LLaMA-style decoder (model.layers[i]."
                     "self_attn.q_proj, mlp.gate_proj) nor a T5 (decoder.block). Use "
                     "copilot.init_from=none")


def _llama_body(model: nn.Module) -> nn.Module | None:
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if not layers or not hasattr(body, "embed_tokens"):
        return None
    first = layers[0]
    attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
    if attn is None or mlp is None or not hasattr(attn, "q_proj") or \
            not hasattr(mlp, "gate_proj"):
        return None
    return body


def _t5_decoder(model: nn.Module) -> nn.Module | None:
    dec = getattr(model, "decoder", None)
    return dec if dec is not None and hasattr(dec, "block") else None


def _refuse(problems: list[str], what: str) -> None:
    if problems:
        raise ValueError(f"copilot.init_from: incompatible {what}: " + "; ".join(problems) +
                         ". Set these copilot.* keys to the source's values, or use "
                         "copilot.init_from=none")


def _shape_problems(copilot: Copilot, *, hidden: int, heads: int, kv_heads: int,
                    head_dim: int, inner: int, layers: int) -> list[str]:
    c, problems = copilot.cfg, []
    att = copilot.layers[0].self_attn
    if hidden != c.hidden_size:
        problems.append(f"copilot.hidden_size={c.hidden_size} but the source's hidden_size is "
                        f"{hidden}")
    if heads != c.num_heads:
        problems.append(f"copilot.num_heads={c.num_heads} but the source has {heads} (query) "
                        "heads")
    # A multi-head Copilot (num_kv_heads = num_heads) also takes a GQA source (_kv_repeat).
    if kv_heads != att.kv_heads and att.kv_heads != att.heads:
        problems.append(f"copilot.num_kv_heads={c.num_kv_heads} but the source has {kv_heads} "
                        "key/value heads")
    if head_dim != att.hd:
        problems.append(f"copilot.head_dim={c.head_dim} (heads of {att.hd}) but the source's "
                        f"heads are {head_dim} wide")
    if inner != c.intermediate_size:
        problems.append(f"copilot.intermediate_size={c.intermediate_size} but the source's MLP "
                        f"width is {inner}")
    if layers < c.num_layers:
        problems.append(f"copilot.num_layers={c.num_layers} but the source has only {layers} "
                        "decoder layers")
    return problems


def _copy_linear(dst: nn.Linear, src: nn.Linear, *, repeat: int = 1, head_dim: int = 0,
                 scale: float = 1.0) -> None:
    """dst <- src. `repeat` > 1 repeats each output head of `head_dim` rows `repeat` times (a
    GQA key/value head becomes the key/value head of each query head of its group)."""
    w = src.weight.detach()
    b = None if src.bias is None else src.bias.detach()
    if repeat > 1:
        w = w.reshape(-1, head_dim, w.shape[1]).repeat_interleave(repeat, 0).flatten(0, 1)
        b = None if b is None else b.reshape(-1, head_dim).repeat_interleave(repeat, 0).flatten()
    dst.weight.copy_(w * scale)
    if b is not None:
        enable_bias(dst)
        dst.bias.copy_(b * scale)
    elif dst.bias is not None:
        nn.init.zeros_(dst.bias)


def _copy_attention(dst: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, *,
                    repeat: int, head_dim: int, q_scale: float = 1.0, kv: bool = True) -> None:
    """q/k/v/o as they are (k/v repeated per group only by `_kv_repeat`'s fallback); `kv`
    False leaves k/v as initialised (memory attention of a narrower or wider Pilot)."""
    _copy_linear(dst.q_proj, q, scale=q_scale)
    if kv:
        _copy_linear(dst.k_proj, k, repeat=repeat, head_dim=head_dim)
        _copy_linear(dst.v_proj, v, repeat=repeat, head_dim=head_dim)
    _copy_linear(dst.o_proj, o)


def _kv_repeat(copilot: Copilot, kv_heads: int) -> int:
    """1 when the Copilot has the source's key/value heads (the configuration docs/method.md §8
    asks for). Otherwise (checked by `_shape_problems`) the Copilot is multi-head
    (num_kv_heads = num_heads, e.g. left unset) and each source key/value head is repeated for
    the H / n_kv query heads of its group, as transformers' `repeat_kv` does at run time: the
    same attention at H / n_kv times the key/value parameters and cache."""
    return copilot.layers[0].self_attn.kv_heads // kv_heads


def _memory_kv_copied(copilot: Copilot) -> bool:
    """Whether attention over the memory [X~ ; h] takes the source's k/v (docs/method.md §8).

    Memory rows reach k_proj/v_proj through `mem_proj` (d_P -> d_C, shared by all memory
    layers), so any copy would fit by shape. Only when d_P == d_C is `mem_proj` the identity,
    and the source's k/v read Pilot states of the width (and, same family, the kind of space)
    they were trained on. Otherwise they would read a random projection, so k/v keep their
    fresh initialisation and only q/o (which face the Copilot's own states) are copied.
    """
    return copilot.mem_proj.proj.in_features == copilot.cfg.hidden_size


def _memory_attention(blk: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the block's attention over the memory, None for a 'self' block."""
    if blk.kind == "self":
        return None
    return ("cross_attn", blk.cross_attn) if blk.kind == "both" else ("self_attn", blk.self_attn)


def source_rope(config: Any) -> tuple[torch.Tensor, float]:
    """A LLaMA-style config's rotary inverse frequencies (head_dim/2,) and cos/sin scaling,
    computed as transformers computes them at init (rope_theta, rope_scaling / rope_parameters:
    'llama3', 'linear', 'yarn', ...). For 'dynamic' these are the frequencies before any
    length-dependent update; the Copilot does not re-scale with sequence length."""
    params = dict(getattr(config, "rope_parameters", None) or
                  getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        hd = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("copilot.init_from: partial rotary embeddings are not supported")
        return 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd)), 1.0
    # heavy: transformers loads only where a model is built
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"copilot.init_from: unknown RoPE type {rope_type!r}")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return inv.float(), float(scaling)


@torch.no_grad()
def _init_from_llama_style(copilot: Copilot, model: nn.Module) -> list[str]:
    """LLaMA / Qwen2 / Mistral into either Copilot variant.

    Copilot layer l takes decoder layer l's attention, MLP and norms. Every attention of the
    block (self-attention; the modified cross-attention, which keeps the name `self_attn`; an
    encoder-decoder block's `cross_attn`, which also takes the block's `input_layernorm` as its
    norm) starts as the source's self-attention: a decoder has no cross-attention of its own,
    and Encoder-Decoder Gemma starts its cross-attention the same way (docs/method.md §8). Attention
    over the memory takes the k/v only when d_P == d_C (`_memory_kv_copied`); q/o always.

    Grouped-query attention (n_kv < H key/value heads): query head j reads key/value head
    j // (H / n_kv) in HF and in the Copilot's attention alike, so with copilot.num_kv_heads =
    n_kv and copilot.head_dim = the source's, q/k/v/o (and biases) copy as they are and the
    Copilot computes exactly the source's attention, caching n_kv heads as it does (this is what
    transformers' Mllama cross-attention and T5Gemma do). A Copilot left multi-head gets the
    key/value heads repeated per group instead (`_kv_repeat`); other head counts are refused.
    Biases (Qwen2's q/k/v) are copied; bias-free projections stay so.

    The error projection takes the input embedding table (ell projects to the expected
    embedding difference E[y] - sum_v p_v E[v]), whether or not the source ties it to its
    output layer (the rows it shares with the Pilot's vocabulary: `_copy_embedding`). The
    rotary frequencies become the source's (rope_theta and any scaling). Not copied: the
    final-norm epsilon (the Copilot's RMSNorm keeps 1e-6) and sliding windows.
    """
    cfg, body = model.config, _llama_body(model)
    assert body is not None
    heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    embed = body.embed_tokens.weight
    problems = _shape_problems(copilot, hidden=hidden, heads=heads, kv_heads=n_kv,
                               head_dim=head_dim, inner=cfg.intermediate_size,
                               layers=len(body.layers))
    if heads % n_kv:
        problems.append(f"{heads} query heads do not split into {n_kv} key/value groups")
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"the source's MLP activation is {act!r}; the Copilot's is SiLU")
    if hasattr(body.layers[0].self_attn, "q_norm"):
        problems.append("the source normalises queries/keys per head (q_norm/k_norm, e.g. "
                        "Qwen3), which the Copilot's attention lacks")
    _refuse(problems, f"decoder ({type(model).__name__})")
    inv, scaling = source_rope(cfg)
    copilot.rotary.set_frequencies(inv, scaling)
    repeat, mem_kv = _kv_repeat(copilot, n_kv), _memory_kv_copied(copilot)
    for i, blk in enumerate(copilot.layers):
        s = body.layers[i]
        a = s.self_attn
        targets = [blk.self_attn] + ([blk.cross_attn] if blk.kind == "both" else [])
        mem = _memory_attention(blk)
        for att in targets:
            _copy_attention(att, a.q_proj, a.k_proj, a.v_proj, a.o_proj, repeat=repeat,
                            head_dim=head_dim, kv=mem_kv or mem is None or att is not mem[1])
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy_linear(getattr(blk.mlp, name), getattr(s.mlp, name))
        blk.input_layernorm.weight.copy_(s.input_layernorm.weight)
        if blk.kind == "both":
            blk.cross_layernorm.weight.copy_(s.input_layernorm.weight)
        blk.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight)
    _copy_embedding(copilot, embed)
    copilot.norm.weight.copy_(body.norm.weight)
    return [*_copied_names(copilot, mem_kv), "rotary"]


@torch.no_grad()
def _init_from_t5(copilot: Copilot, model: nn.Module) -> list[str]:
    """A T5's decoder into either Copilot variant.

    Per layer: T5's self-attention (`layer[0].SelfAttention`) -> the Copilot's self-attention;
    T5's cross-attention (`layer[1].EncDecAttention`) -> the Copilot's memory attention
    (`cross_attn` of an encoder-decoder Copilot; `self_attn` of a decoder-only Copilot's
    cross layers), now pointed at [X~ ; h] (its k/v only when d_P == d_C, as for decoders:
    `_memory_kv_copied`), each with the T5 layer norm in front of it; `layer[2]`'s gated MLP
    (wi_0, wi_1, wo) -> gate/up/down; the decoder's final norm and embedding table -> `norm`
    and `err_proj`. T5LayerNorm is an RMSNorm without bias, so norms copy as they are.

    Heads copy as they are: T5's num_heads x d_kv need not tile d_model (FLAN-T5-small: 6 x 64
    on 512), so the Copilot is configured with copilot.num_heads = num_heads and
    copilot.head_dim = d_kv; T5 has no grouped key/value heads (num_kv_heads unset or equal).

    Three differences, chosen rather than emulated:
    - Scaling: T5 does not divide attention logits by sqrt(d_kv) (its init folds that in); the
      Copilot's attention does, so q is copied times sqrt(d_kv) and the logits are T5's.
    - Positions: T5's relative position bias is not copied (the Copilot has none); positions
      come from the Copilot's rotary embedding (copilot.rope_theta). At position offset 0 the
      copied attention equals T5's bias-free attention; elsewhere it is a warm start.
    - Activation: T5 v1.1's gated MLP uses GELU (tanh), the Copilot's SwiGLU uses SiLU. The
      Copilot keeps SiLU: every saved Copilot then rebuilds from its config alone (tcp-eval,
      transfer), the copy is already inexact through positions, and the zero-initialised head
      keeps the Copilot neutral until training adapts the blocks.
    """
    cfg, dec = model.config, _t5_decoder(model)
    assert dec is not None
    heads, head_dim = cfg.num_heads, cfg.d_kv
    embed = dec.embed_tokens.weight
    problems = _shape_problems(copilot, hidden=cfg.d_model, heads=heads, kv_heads=heads,
                               head_dim=head_dim, inner=cfg.d_ff, layers=len(dec.block))
    if not getattr(cfg, "is_gated_act", False):
        problems.append(f"the T5's MLP is not gated (feed_forward_proj="
                        f"{cfg.feed_forward_proj!r}); the Copilot's SwiGLU needs a gated "
                        "(T5 v1.1 / FLAN-T5) source")
    _refuse(problems, f"T5 ({type(model).__name__})")
    q_scale, mem_kv = math.sqrt(head_dim), _memory_kv_copied(copilot)
    for i, blk in enumerate(copilot.layers):
        s = dec.block[i]
        sa, ca, ff = s.layer[0], s.layer[1], s.layer[2]
        if blk.kind != "cross":
            t = sa.SelfAttention
            _copy_attention(blk.self_attn, t.q, t.k, t.v, t.o, repeat=1, head_dim=head_dim,
                            q_scale=q_scale)
            blk.input_layernorm.weight.copy_(sa.layer_norm.weight)
        if (mem := _memory_attention(blk)) is not None:
            t = ca.EncDecAttention
            _copy_attention(mem[1], t.q, t.k, t.v, t.o, repeat=1, head_dim=head_dim,
                            q_scale=q_scale, kv=mem_kv)
            norm = blk.cross_layernorm if blk.kind == "both" else blk.input_layernorm
            norm.weight.copy_(ca.layer_norm.weight)
        d = ff.DenseReluDense
        _copy_linear(blk.mlp.gate_proj, d.wi_0)
        _copy_linear(blk.mlp.up_proj, d.wi_1)
        _copy_linear(blk.mlp.down_proj, d.wo)
        blk.post_attention_layernorm.weight.copy_(ff.layer_norm.weight)
    _copy_embedding(copilot, embed)
    copilot.norm.weight.copy_(dec.final_layer_norm.weight)
    return _copied_names(copilot, mem_kv)


def _copy_embedding(copilot: Copilot, embed: torch.Tensor) -> None:
    """The error projection takes the source's embedding rows it shares with the Pilot's
    vocabulary. Same-family tables may be padded to different sizes for one tokenizer
    (Qwen2.5-7B has 128 rows more than Qwen2.5-0.5B); rows the source lacks keep their
    initialisation. Row v means token v only if the source uses the Pilot's tokenizer (same
    family, as `copilot.init_from` asks); that is not checked here."""
    n = min(embed.shape[0], copilot.vocab_size)
    copilot.err_proj.weight[:n].copy_(embed[:n])


def _copied_names(copilot: Copilot, mem_kv: bool) -> list[str]:
    """Every block tensor, the error projection's table and the final norm (less the memory
    attention's k/v when they were left fresh)."""
    fresh = () if mem_kv else tuple(
        f"layers.{i}.{m[0]}.{p}_proj." for i, blk in enumerate(copilot.layers)
        if (m := _memory_attention(blk)) is not None for p in "kv")
    return [n for n, _ in copilot.named_parameters()
            if (n.startswith("layers.") and not n.startswith(fresh))
            or n in ("err_proj.weight", "norm.weight")]
