"""The Pilot: any Hugging Face causal LM, plus a tap that extracts what the Mistake Log needs.

The tap registers forward hooks once. During a `capture(...)`, the embedding hook keeps the
prompt rows of the embedding output (X~) and every decoder-layer hook adds its output rows at the
target-producing positions into one fp32 accumulator, so the layer-mean pooled state h costs one
(N, d) buffer, never an (L, B, T, d) stack of `output_hidden_states`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tcp.config import ArchConfig, ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype from its config name."""
    return _DTYPES[name]


def build_llama(arch: ArchConfig, *, vocab_size: int, pad_id: int, bos_id: int | None,
                eos_id: int | None, seed: int) -> nn.Module:
    """A LLaMA-architecture causal LM built from config (no download), seeded."""
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


def load_pretrained(name_or_path: str, cfg: ModelConfig) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained`, with one clear error when it cannot be found."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise RuntimeError(
            f"model.name_or_path={name_or_path!r} could not be loaded: not a local directory with "
            "a config.json and weights, and not reachable on the Hugging Face hub (offline, or "
            "a typo, or a gated repo without a token). Download it once with "
            "`huggingface-cli download` and point model.name_or_path at the local folder."
        ) from e


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (LLaMA/Qwen/Mistral/GPT-2/...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for attr in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        mod: Any = model
        for part in attr.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod
    for mod in model.modules():  # fallback: the ModuleList with one entry per layer
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise RuntimeError(
        f"cannot find the decoder layers of {type(model).__name__}; tcp looks for "
        "model.layers / transformer.h; add the attribute path to tcp.models.pilot.decoder_layers"
    )


@dataclass
class Capture:
    """What one captured forward produced (all detached)."""

    x_tilde: torch.Tensor
    """(Nx, d_P) prompt embeddings, flat over the batch."""
    pooled: torch.Tensor
    """(N, d_P) fp32 layer-mean hidden states at target-producing positions."""
    layers_seen: int = 0


class PilotTap:
    """Forward hooks on an HF causal LM that capture X~ and layer-mean pooled states."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.embed = model.get_input_embeddings()
        self._prompt_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._target_index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cap: Capture | None = None
        self._handles = [self.embed.register_forward_hook(self._on_embed)]
        self._handles += [layer.register_forward_hook(self._on_layer) for layer in self.layers]

    def _on_embed(self, _mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if self._cap is None or self._prompt_index is None:
            return
        self._cap.x_tilde = out.detach()[self._prompt_index]

    def _on_layer(self, _mod: nn.Module, _inp: Any, out: Any) -> None:
        if self._cap is None or self._target_index is None:
            return
        hs = out[0] if isinstance(out, tuple) else out
        self._cap.pooled += hs.detach()[self._target_index].float()
        self._cap.layers_seen += 1

    @contextlib.contextmanager
    def capture(self, *, prompt_index: tuple[torch.Tensor, torch.Tensor],
                target_index: tuple[torch.Tensor, torch.Tensor], hidden_size: int,
                device: torch.device) -> Iterator[Capture]:
        """Capture during one forward. Indices are (batch_idx, pos_idx) pairs of flat rows."""
        n = target_index[0].numel()
        self._cap = Capture(
            x_tilde=torch.empty(0, hidden_size, device=device),
            pooled=torch.zeros(n, hidden_size, dtype=torch.float32, device=device),
        )
        self._prompt_index, self._target_index = prompt_index, target_index
        try:
            yield self._cap
        finally:
            cap = self._cap
            self._cap = self._prompt_index = self._target_index = None
            if cap.layers_seen:
                cap.pooled /= cap.layers_seen

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


@dataclass
class PilotStep:
    """A teacher-forced Pilot forward over a batch, in flat target-token layout."""

    loss: torch.Tensor
    """Scalar mean cross-entropy over target tokens (with grad)."""
    sample_loss: torch.Tensor
    """(B,) per-sample mean cross-entropy (detached)."""
    target_logits: torch.Tensor
    """(N, V) logits at target-producing positions (with grad)."""
    labels: torch.Tensor
    """(N,) target tokens y_i."""
    x_tilde: torch.Tensor
    """(Nx, d_P) prompt embeddings (detached)."""
    pooled: torch.Tensor
    """(N, d_P) fp32 layer-mean pooled states (detached)."""
    prompt_len: torch.Tensor
    """(B,) rows of x_tilde per sample."""
    target_len: torch.Tensor
    """(B,) rows of pooled/labels per sample."""


def flat_indices(prompt_len: torch.Tensor, target_len: torch.Tensor
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(batch, position) indices of prompt tokens and of target-producing positions."""
    B = prompt_len.numel()
    b_in = torch.repeat_interleave(torch.arange(B), prompt_len)
    t_in = torch.cat([torch.arange(int(n)) for n in prompt_len])
    b_y = torch.repeat_interleave(torch.arange(B), target_len)
    # Target i of sample b is produced at position prompt_len[b] - 1 + i.
    t_y = torch.cat([torch.arange(int(m)) + int(p) - 1 for p, m in zip(prompt_len, target_len,
                                                                       strict=True)])
    return (b_in, t_in), (b_y, t_y)


def pilot_forward(model: nn.Module, tap: PilotTap, batch: dict[str, torch.Tensor]) -> PilotStep:
    """Teacher-forced forward of `model` (an HF model or its DeepSpeed engine) on a collated batch.

    Returns the loss for the Pilot's backward and everything the Mistake Log needs.
    """
    device = batch["input_ids"].device
    prompt_len, target_len = batch["prompt_len"].cpu(), batch["target_len"].cpu()
    (b_in, t_in), (b_y, t_y) = flat_indices(prompt_len, target_len)
    d = tap.embed.embedding_dim
    pidx, tidx = (b_in.to(device), t_in.to(device)), (b_y.to(device), t_y.to(device))
    with tap.capture(prompt_index=pidx, target_index=tidx, hidden_size=d, device=device) as cap:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False)
    target_logits = out.logits[tidx]
    labels = batch["input_ids"][tidx[0], tidx[1] + 1]
    tok_loss = F.cross_entropy(target_logits.float(), labels, reduction="none")
    sample_loss = torch.zeros(prompt_len.numel(), device=device).index_add_(
        0, tidx[0], tok_loss.detach()) / target_len.to(device)
    return PilotStep(
        loss=tok_loss.mean(), sample_loss=sample_loss, target_logits=target_logits,
        labels=labels, x_tilde=cap.x_tilde, pooled=cap.pooled, prompt_len=prompt_len,
        target_len=target_len,
    )
