"""Both models' decoding state for fused decoding (docs/method.md §6): KV caches, positions and the
Copilot's previous prediction, for decoder-only and encoder-decoder Pilots.

`tcp.evaluation.decoding` drives it (greedy, sampling, beam search); `tcp.evaluation.rectification`
steps it one token at a time. Kept apart from the decoding loops so each file has one job.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from tcp.models.copilot import CopilotCache
from tcp.models.lm_head import logits_at
from tcp.models.pilot import PilotTap

FEEDBACK = ("prediction", "realised")
"""`DecodeOptions.copilot_feedback` values."""


def _pad(prompts: Sequence[Sequence[int]], pad_id: int, *, left: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ragged prompts, padded on the left (decoder-only) or the right (encoder)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for r, p in enumerate(prompts):
        cols = slice(P - len(p), P) if left else slice(0, len(p))
        ids[r, cols] = torch.tensor(list(p), dtype=torch.long)
        mask[r, cols] = 1
    return ids, mask


class _NoCapture:
    pooled = None


def cache_keyword(pilot: torch.nn.Module) -> str:
    """The keyword the Pilot's HF `forward` takes its KV cache by: `cache` in the transformers
    releases that renamed it (the old `past_key_values` still works there, with a deprecation
    warning), `past_key_values` before. Looked up on the HF model itself, under any DeepSpeed
    engine or peft wrapper (whose own `forward` takes **kwargs)."""
    model = getattr(pilot, "module", pilot)
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The KV cache an HF forward returned, under either name."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


class FusedState:
    """Both models' decoding state for R rows: caches, positions, the Copilot's previous f.

    `start` runs the prompts, `advance` feeds one token per row; both return (z, f) for the next
    token, (R, V) fp32. With `copilot=None` f is zero and the Copilot costs nothing (Pilot-only
    decoding, for baselines and benchmarks). `FusedState.create` picks the decoder-only or the
    encoder-decoder variant for the Pilot. `feedback` ('prediction' | 'realised',
    `DecodeOptions.copilot_feedback`) is what the Copilot reads as the previous error: its own f,
    or onehot(the token `advance` feeds) - the Pilot's p_hat that chose it.
    """

    def __init__(self, pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module | None,
                 device: torch.device, feedback: str = "prediction") -> None:
        self.pilot, self.tap, self.copilot, self.device = pilot, tap, copilot, device
        assert feedback in FEEDBACK, feedback
        self.realised = feedback == "realised" and copilot is not None
        self.p_hat: torch.Tensor | None = None
        """(R, V) the Pilot's distribution for the next token (kept for 'realised' feedback)."""
        self.d = tap.embed.embedding_dim
        self.past: Any = None
        self.cache_kw = cache_keyword(pilot)
        """The Pilot's forward keyword for its KV cache (`cache`, or `past_key_values` before
        transformers renamed it)."""
        self.pos: torch.Tensor | None = None
        """(R,) rotary position of the Copilot's current query (= the Pilot position that
        produced the current z in decoder-only Pilots)."""
        self.prev_f: torch.Tensor | None = None
        self.cache: CopilotCache | None = None
        self.vocab = self.rows = 0

    @staticmethod
    def create(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module | None,
               device: torch.device, feedback: str = "prediction") -> FusedState:
        cls = Seq2SeqFusedState if tap.encoder_decoder else DecoderOnlyFusedState
        return cls(pilot, tap, copilot, device, feedback)

    def start(self, prompts: Sequence[Sequence[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def advance(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _start_copilot(self, z: torch.Tensor, cap: Any, valid: torch.Tensor,
                       x_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Copilot's prefix (X~ rows at `valid`) and its first step, after the Pilot's."""
        self.vocab, self.rows = z.shape[-1], z.shape[0]
        if self.copilot is not None:
            R, P = valid.shape
            x_tilde = torch.zeros(R, P, self.d, dtype=cap.x_tilde.dtype, device=self.device)
            x_tilde[valid] = cap.x_tilde
            self.cache = self.copilot(prefix=(x_tilde, valid, x_pos))
        return z, self._copilot_step(cap.pooled, z)

    def _feed_back(self, tokens: torch.Tensor) -> None:
        """With 'realised' feedback: the previous error is onehot(`tokens`) - p_hat, the error the
        Pilot made on the tokens being fed (training's ell with the emitted token as label)."""
        if self.realised:
            assert self.p_hat is not None
            err = -self.p_hat
            err[torch.arange(err.shape[0], device=err.device), tokens] += 1.0
            self.prev_f = err

    def _copilot_step(self, pooled: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        if self.copilot is None:
            if self.prev_f is None:  # one zero f, shared by every step
                self.prev_f = torch.zeros(self.rows, self.vocab, device=self.device)
            return self.prev_f
        assert pooled is not None
        f = self.copilot(cache=self.cache, prev_f=self.prev_f, h_new=pooled, pos=self.pos).float()
        self.prev_f = f
        if self.realised:
            self.p_hat = torch.softmax(z.float(), dim=-1)
        return f

    def _capture_step(self, R: int) -> Any:
        """Capture the pooled state of one new token per row (nothing without a Copilot)."""
        if self.copilot is None:
            return contextlib.nullcontext(_NoCapture())
        dev = self.device
        step_idx = (torch.arange(R, device=dev), torch.zeros(R, dtype=torch.long, device=dev))
        empty = (torch.zeros(0, dtype=torch.long, device=dev),) * 2
        return self.tap.capture(prompt_index=empty, target_index=step_idx, hidden_size=self.d,
                                device=dev)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order): beam search's parent selection."""
        self.past.reorder_cache(index)
        assert self.pos is not None
        self.pos = self.pos[index]
        if self.cache is not None:
            self.cache.reorder(index)
        if self.prev_f is not None:
            self.prev_f = self.prev_f[index]
        if self.p_hat is not None:
            self.p_hat = self.p_hat[index]


class DecoderOnlyFusedState(FusedState):
    """Causal-LM Pilot: left-padded prompts, one growing sequence per row."""

    mask: torch.Tensor

    def start(self, prompts: Sequence[Sequence[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        ids, mask = _pad(prompts, pad_id, left=True)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        R, P = ids.shape
        valid = mask.bool()
        last = (torch.arange(R, device=dev), torch.full((R,), P - 1, device=dev))
        with self.tap.capture(prompt_index=valid.nonzero(as_tuple=True), target_index=last,
                              hidden_size=self.d, device=dev) as cap, \
                logits_at(self.pilot, last) as last_only:  # (R, V), not (R, P, V)
            out = self.pilot(input_ids=ids, attention_mask=mask, position_ids=pos,
                             use_cache=True)
        self.past, self.mask, self.pos = _returned_cache(out), mask, pos[:, -1]
        z = out.logits if last_only else out.logits[:, -1]
        return self._start_copilot(z.float(), cap, valid, pos)

    def advance(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R, dev = tokens.shape[0], self.device
        assert self.pos is not None
        self._feed_back(tokens)
        self.mask = torch.cat([self.mask, torch.ones(R, 1, dtype=self.mask.dtype, device=dev)],
                              dim=1)
        self.pos = self.pos + 1
        with self._capture_step(R) as cap:
            out = self.pilot(input_ids=tokens[:, None], attention_mask=self.mask,
                             position_ids=self.pos[:, None], use_cache=True,
                             **{self.cache_kw: self.past})
        self.past = _returned_cache(out)
        z = out.logits[:, -1].float()
        return z, self._copilot_step(cap.pooled, z)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.mask = self.mask[index]


class Seq2SeqFusedState(FusedState):
    """Encoder-decoder Pilot (T5): the encoder runs once on the (right-padded) prompts, X~ is
    its output; the decoder starts from the decoder start token with a self/cross KV cache."""

    enc_out: torch.Tensor
    enc_mask: torch.Tensor

    def start(self, prompts: Sequence[Sequence[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        ids, mask = _pad(prompts, pad_id, left=False)
        ids, mask = ids.to(dev), mask.to(dev)
        R = ids.shape[0]
        valid = mask.bool()
        conf = getattr(self.pilot, "module", self.pilot).config
        dec = torch.full((R, 1), conf.decoder_start_token_id, dtype=torch.long, device=dev)
        first = (torch.arange(R, device=dev), torch.zeros(R, dtype=torch.long, device=dev))
        with self.tap.capture(prompt_index=valid.nonzero(as_tuple=True), target_index=first,
                              hidden_size=self.d, device=dev) as cap:
            out = self.pilot(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                             use_cache=True)
        self.past, self.enc_out, self.enc_mask = (_returned_cache(out),
                                                  out.encoder_last_hidden_state, mask)
        self.pos = mask.sum(-1) - 1  # the Copilot's query positions follow the training layout
        x_pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return self._start_copilot(out.logits[:, -1].float(), cap, valid, x_pos)

    def advance(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # heavy: transformers loads only where a model is built
        from transformers.modeling_outputs import BaseModelOutput

        assert self.pos is not None
        self._feed_back(tokens)
        self.pos = self.pos + 1
        with self._capture_step(tokens.shape[0]) as cap:
            out = self.pilot(encoder_outputs=BaseModelOutput(last_hidden_state=self.enc_out),
                             attention_mask=self.enc_mask, decoder_input_ids=tokens[:, None],
                             use_cache=True, **{self.cache_kw: self.past})
        self.past = _returned_cache(out)
        z = out.logits[:, -1].float()
        return z, self._copilot_step(cap.pooled, z)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.enc_out, self.enc_mask = self.enc_out[index], self.enc_mask[index]
