"""The Copilot (docs/method.md §4): predicts the Pilot's token-level error f_i ~ ell_i.

Decoder-only variant. Input at position i is the previous error ell_{i-1} (teacher-forced: the
sparse logged error; at inference: the Copilot's own dense f_{i-1}) projected V -> d_C. Odd layers
(1st, 3rd, ...) are causal self-attention blocks; even layers replace self-attention by the
*modified cross-attention*: queries from the Copilot, keys/values from the concatenation
[X~ ; h] projected from the Pilot width d_P. Causality: query i sees all of X~, pooled states h_j
for j <= i, and errors < i. The output head is zero-initialised: an untrained Copilot is a no-op.

Blocks mirror LLaMA's (RMSNorm, rotary attention, SwiGLU) with the same parameter names, so a
same-family pretrained decoder or a T5 can initialise them (`init_copilot_from`, in
copilot_init.py). Attention (attention.py) is grouped-query when copilot.num_kv_heads < num_heads,
with heads copilot.head_dim wide; decoding caches keys/values at num_kv_heads.

Rotary positions are the Pilot's: X~ rows sit at prompt positions 0..P-1, h_j and query j at
P-1+j (the position that produced p_hat_j).

Every parameter is used inside its owning submodule's `forward`, and every entry point goes
through `Copilot.forward`, so DeepSpeed ZeRO-3 gathers partitioned weights in all modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tcp.config import CopilotConfig
from tcp.kernels.copilot_loss import copilot_rmse_loss, fused_copilot_rmse_loss
from tcp.mistake_log.record import MistakeBatch
from tcp.models.attention import KV, Attention, Rotary, adopt_saved_biases
from tcp.models.copilot_inputs import CopilotInputs


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm (fp32 statistics)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU MLP (LLaMA names)."""

    def __init__(self, d: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        adopt_saved_biases(self, state_dict, prefix)  # e.g. a LLaMA with mlp_bias=True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Block(nn.Module):
    """Pre-norm block of one of three kinds (LLaMA parameter names where LLaMA has them):

    - 'self':  causal self-attention over the Copilot's positions (decoder-only, odd layers);
    - 'cross': the modified cross-attention to [X~ ; h] *instead of* self-attention
      (decoder-only, even layers; its attention keeps the name `self_attn` so LLaMA weights load);
    - 'both':  self-attention, then cross-attention to [X~ ; h] (`cross_attn`), as in a T5
      decoder block (the encoder-decoder Copilot, every layer).
    """

    def __init__(self, cfg: CopilotConfig, *, kind: str) -> None:
        super().__init__()
        assert kind in ("self", "cross", "both")
        self.kind = kind
        self.cross = kind == "cross"
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)  # None: multi-head, d / heads
        self.input_layernorm = RMSNorm(cfg.hidden_size)
        self.self_attn = Attention(cfg.hidden_size, *heads)  # named as in LLaMA
        if kind == "both":
            self.cross_layernorm = RMSNorm(cfg.hidden_size)
            self.cross_attn = Attention(cfg.hidden_size, *heads)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def attends_memory(self) -> bool:
        return self.kind != "self"

    def forward(self, x: torch.Tensor, *, mem_new: torch.Tensor | None, q_rope: tuple,
                k_rope: tuple | None, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None, past_self: KV | None = None,
                past_mem: KV | None = None) -> tuple[torch.Tensor, KV | None, KV | None]:
        """Returns the output and the full (keys, values) of the self- and memory attention
        (None for the one this kind lacks); `past_*` are extended by this call's rows."""
        kv_self = kv_mem = None
        hx = self.input_layernorm(x)
        if self.kind == "cross":
            a, kv_mem = self.self_attn(hx, kv_src=mem_new, q_rope=q_rope, k_rope=k_rope,
                                       mask=cross_mask, past=past_mem)
            x = x + a
        else:
            a, kv_self = self.self_attn(hx, kv_src=hx, q_rope=q_rope, k_rope=q_rope,
                                        mask=self_mask, past=past_self)
            x = x + a
        if self.kind == "both":
            a, kv_mem = self.cross_attn(self.cross_layernorm(x), kv_src=mem_new, q_rope=q_rope,
                                        k_rope=k_rope, mask=cross_mask, past=past_mem)
            x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv_self, kv_mem


class ErrorProjection(nn.Module):
    """Linear V -> d_C on the error; sparse inputs become a weighted sum of k+1 rows.

    `weight` is (V, d_C) like an embedding table, so row v is the image of onehot(v).
    """

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, d) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d))
        self.start = nn.Parameter(torch.zeros(d))
        """Added at position 0, which has no previous error."""

    def forward(self, *, ids: torch.Tensor | None = None, vals: torch.Tensor | None = None,
                dense: torch.Tensor | None = None, is_start: torch.Tensor) -> torch.Tensor:
        """Sparse: ids/vals (..., k+1); dense: (..., V). is_start (...) bool. Returns (..., d)."""
        if dense is not None:
            out = dense.to(self.weight.dtype) @ self.weight
        else:
            assert ids is not None and vals is not None
            # One weighted bag of k+1 rows per position: (..., d) out, never the (..., k+1, d)
            # gather (5 GiB at paper sizes, twice with its gradient).
            k1 = ids.shape[-1]
            out = F.embedding_bag(ids.reshape(-1, k1), self.weight, mode="sum",
                                  per_sample_weights=vals.reshape(-1, k1).to(self.weight.dtype),
                                  ).view(*ids.shape[:-1], self.weight.shape[1])
        return out + self.bias + is_start[..., None].to(out.dtype) * self.start


class MemoryProjection(nn.Module):
    """[X~ ; h] from the Pilot width d_P to d_C, then RMSNorm (shared by all cross layers)."""

    def __init__(self, d_pilot: int, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_pilot, d, bias=False)
        self.norm = RMSNorm(d)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(m.to(self.proj.weight.dtype)))


@dataclass
class ErrorTarget:
    """The teacher-forced loss target, flat over the real target tokens (grouped by entry)."""

    labels: torch.Tensor
    """(N,) y_i."""
    topk_ids: torch.Tensor
    """(N, k) the Pilot's top-k token ids."""
    topk_probs: torch.Tensor
    """(N, k) their probabilities."""
    seq_index: torch.Tensor
    """(N,) entry of each token, non-decreasing."""
    num_seqs: int
    fused: bool = True
    """Fused head + RMSE (no (N, V) matrix) or the eager path (dense f)."""
    impl: str | None = "auto"
    """Kernel backend of the fused path: auto | torch | triton."""
    chunk_mib: float = 64.0
    """Chunk buffer size of the fused path."""

    @classmethod
    def from_batch(cls, batch: MistakeBatch, device: torch.device | str,
                   **options: object) -> ErrorTarget:
        """The target of every token of `batch`, in `build_inputs`' q_valid order."""
        seq = torch.repeat_interleave(torch.arange(batch.num_entries),
                                      batch.target_lens.cpu()).to(device)
        return cls(labels=batch.labels.to(device), topk_ids=batch.topk_ids.to(device),
                   topk_probs=batch.topk_probs.to(device), seq_index=seq,
                   num_seqs=batch.num_entries, **options)  # type: ignore[arg-type]


class HeadRequest(Protocol):
    """A computation on f = x W^T + b run inside the head's forward (ZeRO-3 gathered W)."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> Any: ...


class ErrorHead(nn.Linear):
    """The output layer f = W h + b. Given a target, its forward returns the loss instead of f,
    so the loss runs where DeepSpeed ZeRO-3 has gathered W (fused: without the (N, V) f)."""

    def forward(self, x: torch.Tensor, target: ErrorTarget | HeadRequest | None = None
                ) -> Any:
        if target is None:
            return super().forward(x)
        if not isinstance(target, ErrorTarget):
            # Another request computed where W is gathered
            # (tcp.evaluation.diagnostics.DiagnosticsTarget): it reads f in row chunks, never as
            # a whole (N, V).
            return target(x, self.weight, self.bias)
        t = target
        if t.fused:
            return fused_copilot_rmse_loss(x, self.weight, self.bias, t.labels, t.topk_ids,
                                           t.topk_probs, t.seq_index, t.num_seqs, impl=t.impl,
                                           chunk_mib=t.chunk_mib)
        return copilot_rmse_loss(super().forward(x), t.labels, t.topk_ids, t.topk_probs,
                                 t.seq_index, t.num_seqs)


@dataclass
class CopilotCache:
    """Per-layer keys/values for incremental decoding."""

    kv: list[KV | None] = field(default_factory=list)
    """Self-attention keys/values of the Copilot's own positions, (B, num_kv_heads, T, head_dim)
    each (None: the layer has none yet)."""
    mem_kv: list[KV | None] = field(default_factory=list)
    """Memory attention keys/values of [X~ ; h_<=i] (None: the layer does not attend it)."""
    mem_valid: torch.Tensor | None = None
    """(B, M) bool validity of the cross memory so far (X~ may be left-padded)."""
    steps: int = 0
    """Decoding steps taken."""

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search / finished-row pruning)."""
        def pick(kv: KV | None) -> KV | None:
            return None if kv is None else (kv[0][index], kv[1][index])

        self.kv = [pick(kv) for kv in self.kv]
        self.mem_kv = [pick(kv) for kv in self.mem_kv]
        if self.mem_valid is not None:
            self.mem_valid = self.mem_valid[index]


class Copilot(nn.Module):
    """The Copilot: decoder-only (alternating self / modified cross-attention layers) or, for
    encoder-decoder Pilots, a decoder whose every layer cross-attends to [X~ ; h]."""

    def __init__(self, cfg: CopilotConfig, *, vocab_size: int, pilot_hidden: int,
                 encoder_decoder: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.encoder_decoder = encoder_decoder
        d = cfg.hidden_size
        self.err_proj = ErrorProjection(vocab_size, d)
        self.mem_proj = MemoryProjection(pilot_hidden, d)
        # Decoder-only: layer 1, 3, ... (index 0, 2, ...) self-attend; 2, 4, ... cross-attend.
        kinds = ["both"] * cfg.num_layers if encoder_decoder else \
            ["cross" if i % 2 == 1 else "self" for i in range(cfg.num_layers)]
        self.layers = nn.ModuleList(Block(cfg, kind=k) for k in kinds)
        self.norm = RMSNorm(d)
        # Plain RoPE with rope_theta unless a pretrained source sets its own frequencies.
        self.rotary = Rotary(cfg.head_dim or d // cfg.num_heads, cfg.rope_theta)
        self.head = ErrorHead(d, vocab_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if pilot_hidden == d:
            with torch.no_grad():
                self.mem_proj.proj.weight.copy_(torch.eye(d))

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(pos)

    def forward(self, inputs: CopilotInputs | None = None, *, target: ErrorTarget | None = None,
                cache: CopilotCache | None = None, prev_f: torch.Tensor | None = None,
                h_new: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                prefix: tuple | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | CopilotCache:
        """Four modes, all through forward so ZeRO-3 gathers parameters:

        - teacher-forced: `forward(inputs)` -> f (B, n, V);
        - training: `forward(inputs, target=)` -> (RMSE loss, zero-baseline RMSE), fused by
          default (`target.fused`): f is never materialised;
        - start decoding: `forward(prefix=(x_tilde (B,P,d_P), x_valid (B,P), x_pos (B,P)))`
          -> a `CopilotCache` holding the X~ part of every cross layer's memory;
        - one decoding step: `forward(cache=, prev_f=(B,V) or None, h_new=(B,d_P), pos=(B,))`
          -> f_i (B, V); appends to the cache.
        """
        if inputs is not None:
            return self._teacher_forced(inputs, target)
        if prefix is not None:
            return self._start(*prefix)
        assert cache is not None and h_new is not None and pos is not None
        return self._step(cache, prev_f, h_new, pos)

    def _teacher_forced(self, x: CopilotInputs, target: ErrorTarget | None
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, T = x.q_pos.shape
        is_start = torch.zeros(B, T, dtype=torch.bool, device=x.q_pos.device)
        is_start[:, 0] = True
        hid = self.err_proj(ids=x.err_ids, vals=x.err_vals, is_start=is_start)
        mem = self.mem_proj(x.mem)
        q_rope, k_rope = self._rope(x.q_pos), self._rope(x.mem_pos)
        qi = torch.arange(T, device=hid.device)
        causal = (qi[None, :] <= qi[:, None])[None, None]  # (1, 1, T, T)
        self_mask = causal & x.q_valid[:, None, None, :]
        visible = x.mem_first_query[:, None, :] <= qi[None, :, None]  # h_j only from query j on
        cross_mask = (x.mem_valid[:, None, :] & visible)[:, None]  # (B, 1, T, M)
        # Recompute each block in the backward (cfg.gradient_checkpointing) only where a
        # backward follows; decoding (_start/_step) never checkpoints. Non-reentrant: it takes
        # keyword arguments, and ZeRO-3's known recompute failure needs frozen parameters,
        # which the (fully trained) Copilot does not have.
        ckpt = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        kw = dict(mem_new=mem, q_rope=q_rope, k_rope=k_rope, self_mask=self_mask,
                  cross_mask=cross_mask)
        for layer in self.layers:
            if ckpt:
                hid, _, _ = checkpoint(layer, hid, use_reentrant=False, **kw)
            else:
                hid, _, _ = layer(hid, **kw)
        if target is not None:
            return self.head(self.norm(hid)[x.q_valid], target)
        return self.head(self.norm(hid))

    def _start(self, x_tilde: torch.Tensor, x_valid: torch.Tensor, x_pos: torch.Tensor
               ) -> CopilotCache:
        mem = self.mem_proj(x_tilde)
        k_rope = self._rope(x_pos)
        cache = CopilotCache(mem_valid=x_valid.bool())
        for layer in self.layers:
            cache.kv.append(None)
            if layer.attends_memory:
                att = layer.cross_attn if layer.kind == "both" else layer.self_attn
                cache.mem_kv.append(att.keys_values(mem, k_rope))  # at num_kv_heads
            else:
                cache.mem_kv.append(None)
        return cache

    def _step(self, cache: CopilotCache, prev_f: torch.Tensor | None, h_new: torch.Tensor,
              pos: torch.Tensor) -> torch.Tensor:
        B = h_new.shape[0]
        dev = h_new.device
        first = prev_f is None
        is_start = torch.full((B, 1), first, dtype=torch.bool, device=dev)
        dense = torch.zeros(B, 1, self.vocab_size, device=dev) if first else prev_f[:, None]
        hid = self.err_proj(dense=dense, is_start=is_start)
        q_rope = self._rope(pos[:, None])
        mem_new = self.mem_proj(h_new[:, None])
        assert cache.mem_valid is not None
        cache.mem_valid = torch.cat([cache.mem_valid, torch.ones(B, 1, dtype=torch.bool,
                                                                 device=dev)], dim=1)
        cross_mask = cache.mem_valid[:, None, None, :]
        for li, layer in enumerate(self.layers):
            hid, kv, mkv = layer(hid, mem_new=mem_new, q_rope=q_rope, k_rope=q_rope,
                                 self_mask=None, cross_mask=cross_mask, past_self=cache.kv[li],
                                 past_mem=cache.mem_kv[li])
            cache.kv[li], cache.mem_kv[li] = kv, mkv
        cache.steps += 1
        return self.head(self.norm(hid))[:, 0]
