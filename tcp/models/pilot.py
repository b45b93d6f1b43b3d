"""The Pilot: any Hugging Face causal LM or encoder-decoder (T5), plus a tap that extracts what
the Mistake Log needs.

The tap registers forward hooks once. During a `capture(...)`, the embedding hook (decoder-only)
or the encoder hook (encoder-decoder) keeps the prompt rows of X~, and every decoder-layer hook
adds its output rows at the
target-producing positions into one fp32 accumulator (`tcp.kernels.pooling`), so the layer-mean
pooled state h costs one (N, d) buffer, never an (L, B, T, d) stack of `output_hidden_states`.

`FusedLMHead` replaces the LM head (same parameters, same state-dict keys): an ordinary Linear,
except during `pilot_forward(..., head=HeadOptions(...))`, where its forward computes the fused
cross-entropy and top-k of the target rows (`tcp.kernels.pilot_loss`) instead of the logits. The
loss runs inside the head's own forward, which is where DeepSpeed ZeRO-3 gathers its weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tcp.config import ArchConfig, ModelConfig
from tcp.kernels.pilot_loss import logits_cross_entropy
from tcp.kernels.pooling import pool_layer_
from tcp.models.lm_head import FusedLMHead, HeadOptions, _HeadRequest, logits_at

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from its config name."""
    return _DTYPES[name]


def build_llama(arch: ArchConfig, *, vocab_size: int, pad_id: int, bos_id: int | None,
                eos_id: int | None, seed: int) -> nn.Module:
    """A LLaMA-architecture causal LM built from config (no download), seeded."""
    # heavy: transformers loads only where a model is built
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads or arch.num_heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def build_t5(arch: ArchConfig, *, vocab_size: int, pad_id: int, eos_id: int | None,
             seed: int) -> nn.Module:
    """A T5 encoder-decoder built from config (no download), seeded. The decoder starts from
    the pad token, as T5 does."""
    # heavy: transformers loads only where a model is built
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=vocab_size, d_model=arch.hidden_size, d_ff=arch.intermediate_size,
        d_kv=arch.hidden_size // arch.num_heads, num_layers=arch.num_layers,
        num_decoder_layers=arch.num_layers, num_heads=arch.num_heads,
        feed_forward_proj="gated-gelu", pad_token_id=pad_id, eos_token_id=eos_id,
        decoder_start_token_id=pad_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(cfg)


def build_model(arch: ArchConfig, *, vocab_size: int, pad_id: int, bos_id: int | None,
                eos_id: int | None, seed: int) -> nn.Module:
    """The Pilot built from `arch` (its family)."""
    if arch.family == "t5":
        return build_t5(arch, vocab_size=vocab_size, pad_id=pad_id, eos_id=eos_id, seed=seed)
    return build_llama(arch, vocab_size=vocab_size, pad_id=pad_id, bos_id=bos_id,
                       eos_id=eos_id, seed=seed)


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for T5/BART-style Pilots (also through a DeepSpeed engine)."""
    return bool(getattr(getattr(model, "module", model).config, "is_encoder_decoder", False))


def load_pretrained(name_or_path: str, cfg: ModelConfig | None = None) -> nn.Module:
    """`from_pretrained` for a causal LM or an encoder-decoder (by its config), with one clear
    error when it cannot be found."""
    # heavy: transformers loads only where a model is built
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    kw: dict[str, Any] = {}
    if cfg is not None:
        kw = {"dtype": torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    try:
        conf = AutoConfig.from_pretrained(name_or_path,
                                          trust_remote_code=kw.get("trust_remote_code", False))
        auto = AutoModelForSeq2SeqLM if conf.is_encoder_decoder else AutoModelForCausalLM
        return auto.from_pretrained(name_or_path, **kw)
    except OSError as e:
        raise RuntimeError(
            f"model.name_or_path={name_or_path!r} could not be loaded: not a local directory with "
            "a config.json and weights, and not reachable on the Hugging Face hub (offline, or "
            "a typo, or a gated repo without a token). Download it once with "
            "`huggingface-cli download` and point model.name_or_path at the local folder."
        ) from e


def _module_at(model: nn.Module, path: str) -> nn.ModuleList | None:
    mod: Any = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod if isinstance(mod, nn.ModuleList) else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (LLaMA/Qwen/Mistral/GPT-2/...) or of the decoder of
    an encoder-decoder (T5: decoder.block; BART: model.decoder.layers); through a peft wrapper,
    the (adapted) layers of the model it wraps."""
    if hasattr(model, "get_base_model"):  # peft: the paths below are the wrapped model's
        model = model.get_base_model()
    encdec = is_encoder_decoder(model)
    paths = (("decoder.block", "model.decoder.layers", "decoder.layers") if encdec else
             ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"))
    for path in paths:
        found = _module_at(model, path)
        if found is not None:
            return found
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for mod in model.modules():  # decoder-only fallback: the ModuleList with one entry per layer
        if not encdec and isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise RuntimeError(
        f"cannot find the decoder layers of {type(model).__name__}; tcp looks for "
        f"{' / '.join(paths)}; add the attribute path to tcp.models.pilot.decoder_layers"
    )


@dataclass
class Capture:
    """What one captured forward produced (all detached)."""

    x_tilde: torch.Tensor
    """(Nx, d_P) prompt embeddings, flat over the batch."""
    pooled: torch.Tensor
    """(N, d_P) layer-mean hidden states at target-producing positions (the capture's dtype)."""
    acc: torch.Tensor | None = None
    """(N, d_P) fp32 accumulator while the forward runs."""
    layers_seen: int = 0


class PilotTap:
    """Forward hooks on an HF causal LM that capture X~ and layer-mean pooled states.

    The hooks act only inside `capture(...)`, which ends with the forward: under gradient
    checkpointing, a recompute of a layer during the backward that re-runs its forward hooks
    (depending on whether transformers checkpoints the layer's `__call__` or its `forward`)
    finds no capture and adds nothing.
    """

    def __init__(self, model: nn.Module, *, impl: str | None = "auto") -> None:
        self.layers = decoder_layers(model)
        self.embed = model.get_input_embeddings()
        self.encoder_decoder = is_encoder_decoder(model)
        """X~ is the encoder output (encoder-decoder) or the prompt embeddings (decoder-only)."""
        self.impl = impl
        """Pooling kernel backend (tcp.kernels.dispatch)."""
        self._prompt_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._target_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rows: torch.Tensor | None = None
        self._cap: Capture | None = None
        x_source = model.get_encoder() if self.encoder_decoder else self.embed
        self._handles = [x_source.register_forward_hook(self._on_embed)]
        self._handles += [layer.register_forward_hook(self._on_layer) for layer in self.layers]

    def _on_embed(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        if self._cap is None or self._prompt_index is None:
            return
        if not isinstance(out, torch.Tensor):  # an encoder's ModelOutput / tuple
            out = out[0]
        self._cap.x_tilde = out.detach()[self._prompt_index]

    def _on_layer(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        cap, index = self._cap, self._target_index
        if cap is None or index is None or cap.acc is None:
            return
        hs = (out[0] if isinstance(out, tuple) else out).detach()  # (B, T, d)
        if self._rows is None:  # flat row b * T + t of each target-producing position
            self._rows = (index[0] * hs.shape[1] + index[1]).long()
        L = len(self.layers)
        last = cap.layers_seen == L - 1
        pool_layer_(cap.acc, hs, self._rows, first=cap.layers_seen == 0,
                    final_scale=1.0 / L if last else None, out=cap.pooled if last else None,
                    impl=self.impl)
        cap.layers_seen += 1

    @contextlib.contextmanager
    def capture(self, *, prompt_index: tuple[torch.Tensor, torch.Tensor],
                target_index: tuple[torch.Tensor, torch.Tensor], hidden_size: int,
                device: torch.device, dtype: torch.dtype = torch.float32) -> Iterator[Capture]:
        """Capture during one forward. Indices are (batch_idx, pos_idx) pairs of flat rows;
        `dtype` is the pooled output's (the mean is accumulated in fp32)."""
        n = target_index[0].numel()
        self._cap = Capture(
            x_tilde=torch.empty(0, hidden_size, device=device),
            pooled=torch.zeros(n, hidden_size, dtype=dtype, device=device),
            acc=torch.empty(n, hidden_size, dtype=torch.float32, device=device),
        )
        self._prompt_index, self._target_index, self._rows = prompt_index, target_index, None
        try:
            yield self._cap
        finally:
            cap = self._cap
            self._cap = self._prompt_index = self._target_index = self._rows = None
            cap.acc = None
            if cap.layers_seen not in (0, len(self.layers)):
                raise RuntimeError(f"the Pilot ran {cap.layers_seen} of its {len(self.layers)} "
                                   "decoder layers during one capture; pooling needs all")

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """HF gradient checkpointing on every decoder layer, reentrant (the variant DeepSpeed ZeRO-3
    is known to work with: its partitioned parameters are re-gathered by the module hooks during
    the recompute). Reentrant checkpointing computes parameter gradients only when the layer's
    input requires grad, so with frozen embeddings (LoRA) the embedding output is made to
    require it (`enable_input_require_grads`)."""
    kw = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable is
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)  # deprecated
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    else:
        raise RuntimeError(f"{type(model).__name__} has no HF gradient checkpointing; set "
                           "pilot.gradient_checkpointing=false")
    if not model.get_input_embeddings().weight.requires_grad:
        model.enable_input_require_grads()


@dataclass
class PilotStep:
    """A teacher-forced Pilot forward over a batch, in flat target-token layout."""

    loss: torch.Tensor
    """Scalar mean cross-entropy over target tokens (with grad)."""
    sample_loss: torch.Tensor
    """(B,) per-sample mean cross-entropy (detached)."""
    labels: torch.Tensor
    """(N,) target tokens y_i."""
    x_tilde: torch.Tensor
    """(Nx, d_P) prompt embeddings (detached)."""
    pooled: torch.Tensor
    """(N, d_P) layer-mean pooled states (detached; the capture's dtype, fp32 by default)."""
    prompt_len: torch.Tensor
    """(B,) rows of x_tilde per sample."""
    target_len: torch.Tensor
    """(B,) rows of pooled/labels per sample."""
    topk_probs: torch.Tensor | None = None
    """(N, k) fp32 top-k probabilities of p_hat_i (detached), when `head` asked for them."""
    topk_ids: torch.Tensor | None = None
    """(N, k) their token ids."""
    target_logits: torch.Tensor | None = None
    """(N, V) logits at target-producing positions (with grad); eager path only. With a
    `FusedLMHead` installed only these rows are ever computed."""


def flat_indices(prompt_len: torch.Tensor, target_len: torch.Tensor, *,
                 encoder_decoder: bool = False
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(batch, position) indices of prompt tokens and of target-producing positions.

    Decoder-only: target i of sample b is produced at position prompt_len[b] - 1 + i of the one
    sequence. Encoder-decoder: prompt rows index the encoder output, and target i is produced
    at decoder position i (the decoder is fed [start, y_1, ..., y_{n-1}]).
    """
    B = prompt_len.numel()
    b_in = torch.repeat_interleave(torch.arange(B), prompt_len)
    t_in = torch.cat([torch.arange(int(n)) for n in prompt_len])
    b_y = torch.repeat_interleave(torch.arange(B), target_len)
    shift = [0 if encoder_decoder else int(p) - 1 for p in prompt_len]
    t_y = torch.cat([torch.arange(int(m)) + s for s, m in zip(shift, target_len, strict=True)])
    return (b_in, t_in), (b_y, t_y)


def seq2seq_inputs(batch: dict[str, torch.Tensor], start_id: int, pad_id: int
                   ) -> dict[str, torch.Tensor]:
    """Encoder/decoder inputs of a collated `[prompt answer EOS]` batch: the encoder reads the
    prompt, the decoder reads [start, y_1, ..., y_{n-1}] (right-padded, masks included)."""
    ids, P, T = batch["input_ids"], batch["prompt_len"].tolist(), batch["target_len"].tolist()
    B, dev = ids.shape[0], ids.device
    enc = torch.full((B, max(P)), pad_id, dtype=torch.long, device=dev)
    dec = torch.full((B, max(T)), pad_id, dtype=torch.long, device=dev)
    enc_mask = torch.zeros_like(enc)
    dec_mask = torch.zeros_like(dec)
    for b, (p, n) in enumerate(zip(P, T, strict=True)):
        enc[b, :p], enc_mask[b, :p] = ids[b, :p], 1
        dec[b, 0], dec[b, 1:n], dec_mask[b, :n] = start_id, ids[b, p:p + n - 1], 1
    return {"input_ids": enc, "attention_mask": enc_mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dec_mask}


def pilot_forward(model: nn.Module, tap: PilotTap, batch: dict[str, torch.Tensor], *,
                  head: HeadOptions | None = None,
                  pooled_dtype: torch.dtype = torch.float32) -> PilotStep:
    """Teacher-forced forward of `model` (an HF model or its DeepSpeed engine) on a collated batch.

    Returns the loss for the Pilot's backward and everything the Mistake Log needs. With
    `head.fused` (the model's head must be a `FusedLMHead`) no (N, V) logits exist; otherwise
    (`head` None or not fused) the logits are kept in `target_logits`, and top-k is taken from
    them when `head` asks for it.
    """
    device = batch["input_ids"].device
    prompt_len, target_len = batch["prompt_len"].cpu(), batch["target_len"].cpu()
    encdec = tap.encoder_decoder
    (b_in, t_in), (b_y, t_y) = flat_indices(prompt_len, target_len, encoder_decoder=encdec)
    d = tap.embed.embedding_dim
    pidx, tidx = (b_in.to(device), t_in.to(device)), (b_y.to(device), t_y.to(device))
    inputs: dict[str, Any]
    if encdec:
        conf = getattr(model, "module", model).config
        labels = batch["input_ids"][tidx[0], batch["prompt_len"].to(device)[tidx[0]] + tidx[1]]
        inputs = seq2seq_inputs(batch, conf.decoder_start_token_id, conf.pad_token_id)
    else:
        labels = batch["input_ids"][tidx[0], tidx[1] + 1]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs["use_cache"] = False
    with tap.capture(prompt_index=pidx, target_index=tidx, hidden_size=d, device=device,
                     dtype=pooled_dtype) as cap:
        if head is not None and head.fused:
            lm_head = getattr(model, "module", model).get_output_embeddings()
            if not isinstance(lm_head, FusedLMHead):
                raise RuntimeError("kernels.fused needs the Pilot's head swapped by "
                                   "tcp.models.lm_head.use_fused_head before DeepSpeed wraps it")
            with lm_head.request(_HeadRequest(rows=tidx, labels=labels, options=head)) as req:
                # The head returns the loss in place of logits; take it from the model's output,
                # which under ZeRO-3 carries the hook that re-gathers the weight for backward.
                loss = model(**inputs).logits
            res, logits = req.result, None
            assert res is not None
        else:
            with logits_at(model, tidx) as rows_only:  # (N, V), not the model's (B, T, V)
                logits = model(**inputs).logits
            logits = logits if rows_only else logits[tidx]
            res = logits_cross_entropy(logits, labels, topk=head.topk if head else 0,
                                       chunk_mib=head.chunk_mib if head else 64.0)
            loss = res.loss
    sample_loss = torch.zeros(prompt_len.numel(), device=device).index_add_(
        0, tidx[0], res.token_loss) / target_len.to(device)
    has_topk = head is not None and head.topk > 0
    return PilotStep(
        loss=loss, sample_loss=sample_loss, labels=labels, x_tilde=cap.x_tilde,
        pooled=cap.pooled, prompt_len=prompt_len, target_len=target_len,
        topk_probs=res.topk_probs if has_topk else None,
        topk_ids=res.topk_ids if has_topk else None, target_logits=logits,
    )
