"""Shape twins of the paper's models: the same family and architecture flags (grouped-query
ratio, tied embeddings, RoPE type and base, q/k/v biases, heads x head width vs model width,
gated MLP), at a few thousand parameters, built from config — no download.

The paper configs (configs/*.yaml) name hub models that cannot be fetched in tests or CI, nor
on an offline GPU machine. A twin is saved as a local folder (model + tokenizer) that a config
points `model.name_or_path` / `copilot.init_from` at, so the code path a user's run takes
(from_pretrained, LoRA, GQA Copilot initialisation, T5) is the one the tests run.

`PAPER_MODELS` records the real models' architecture (from their published config.json); the
memory plan (`--dry-run`) uses it when the hub config is not available offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}

PAPER_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-3B": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-5),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        tie_word_embeddings=False, rope_parameters=QWEN_ROPE, max_position_embeddings=131072,
        rms_norm_eps=1e-6, extra_vocab_rows=128),  # 128 more padding rows than Qwen2.5-0.5B
    "Qwen/Qwen2.5-0.5B": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
        tie_word_embeddings=True, rope_parameters=QWEN_ROPE, max_position_embeddings=32768,
        rms_norm_eps=1e-6),
    "google/flan-t5-small": dict(
        model_type="t5", d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
        num_heads=6, feed_forward_proj="gated-gelu", vocab_size=32128,
        tie_word_embeddings=False),
}


def paper_config(name: str) -> Any:
    """The HF config of the real model `name` (one of PAPER_MODELS), without the hub."""
    from transformers import AutoConfig  # heavy: transformers loads only where a model is built

    real = dict(PAPER_MODELS[name])
    real.pop("extra_vocab_rows", None)
    return AutoConfig.for_model(real.pop("model_type"), **real)


def twin_config(name: str, *, vocab_size: int, pad_id: int, bos_id: int | None,
                eos_id: int | None, layers: int = 2, head_dim: int = 8) -> Any:
    """The HF config of `name`'s twin: 2 key/value heads and as many query heads per KV head as
    the real model (T5: the real head count), heads `head_dim` wide, MLP twice the width,
    `layers` layers, the tokenizer's vocabulary (plus the real model's extra padding rows), the
    real model's flags otherwise."""
    from transformers import AutoConfig  # heavy: transformers loads only where a model is built

    real = dict(PAPER_MODELS[name])
    kind = real.pop("model_type")
    # Same-family models may pad their embedding tables differently (Qwen2.5-7B has 128 rows
    # more than Qwen2.5-0.5B for the same tokenizer): the twin keeps that difference.
    common = dict(vocab_size=vocab_size + real.pop("extra_vocab_rows", 0), pad_token_id=pad_id,
                  eos_token_id=eos_id, tie_word_embeddings=real["tie_word_embeddings"])
    if kind == "t5":
        d = 4 * head_dim  # heads x d_kv (6 x 8) != d_model (32), as in FLAN-T5-small
        return AutoConfig.for_model(
            "t5", d_model=d, d_kv=head_dim, d_ff=2 * d, num_layers=layers,
            num_decoder_layers=layers, num_heads=real["num_heads"],
            feed_forward_proj=real["feed_forward_proj"], decoder_start_token_id=pad_id, **common)
    ratio = real["num_attention_heads"] // real["num_key_value_heads"]
    heads = 2 * ratio
    d = heads * head_dim
    return AutoConfig.for_model(
        kind, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2,
        rope_parameters=dict(real["rope_parameters"]),
        max_position_embeddings=real["max_position_embeddings"],
        rms_norm_eps=real["rms_norm_eps"], bos_token_id=bos_id, **common)


def write_twin(name: str, path: Path, tokenizer: Any, *, layers: int = 2, head_dim: int = 8,
               seed: int = 0) -> Path:
    """Save `name`'s twin (model and `tokenizer`) to `path` as a from_pretrained folder."""
    # heavy: transformers loads only where a model is built
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = twin_config(name, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                      bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                      layers=layers, head_dim=head_dim)
    auto = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = auto.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def copilot_overrides(source: Any, *, layers: int) -> list[str]:
    """`copilot.*` overrides that shape a Copilot like the pretrained `source` config (the
    decoder it is initialised from), with its first `layers` layers."""
    if getattr(source, "is_encoder_decoder", False):
        return [f"copilot.hidden_size={source.d_model}", f"copilot.num_heads={source.num_heads}",
                f"copilot.head_dim={source.d_kv}", f"copilot.intermediate_size={source.d_ff}",
                f"copilot.num_layers={layers}", "copilot.num_kv_heads=null"]
    return [f"copilot.hidden_size={source.hidden_size}",
            f"copilot.num_heads={source.num_attention_heads}",
            f"copilot.num_kv_heads={source.num_key_value_heads}",
            f"copilot.head_dim={source.hidden_size // source.num_attention_heads}",
            f"copilot.intermediate_size={source.intermediate_size}",
            f"copilot.num_layers={layers}"]
