"""The Copilot's attention: rotary positions, grouped-query heads, a head width of its own.

Shapes (d the Copilot width, H query heads, H_kv key/value heads, hd the head width):
q_proj d -> H*hd, k_proj/v_proj d -> H_kv*hd, o_proj H*hd -> d. H_kv divides H and query head j
reads key/value head j // (H / H_kv), the convention of transformers' `repeat_kv`, so a GQA
decoder's projections (LLaMA-3.2, Qwen2.5) copy in as they are (docs/method.md §8). hd need not be
d / H: FLAN-T5-small has 6 heads of 64 on a 512-wide model.

Keys/values are returned, and cached by incremental decoding, at H_kv heads (the memory saving
is the point of GQA); they are widened to H only inside the attention call. With the defaults
(H_kv = H, hd = d / H) the parameters, their names and shapes and the outputs are those of the
plain multi-head attention the Copilot had before, so older saved Copilots load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


class Rotary(nn.Module):
    """cos, sin of shape (B, 1, T, head_dim) for positions (B, T) (HF LLaMA convention).

    The inverse frequencies default to `theta ** (-2i / head_dim)` and can be replaced by a
    pretrained decoder's (`set_frequencies`), with its post-scaling of cos/sin (YaRN).

    They travel in the state dict as *extra state* (one float64 tensor: [scaling, *inv_freq]),
    not as a buffer: DeepSpeed's bf16/fp16 engines cast every floating buffer, and bf16
    frequencies put tokens a few hundred positions apart at visibly wrong angles. A state dict
    saved before this state existed loads with the `theta` default, which is what such a
    Copilot used.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._state = self._pack(self.default_frequencies(), 1.0)
        self._on: tuple[torch.device, torch.Tensor] | None = None

    def default_frequencies(self) -> torch.Tensor:
        """(head_dim/2,) the plain-RoPE inverse frequencies, computed in fp32 as HF does."""
        i = torch.arange(0, self.head_dim, 2).float()
        return 1.0 / (self.theta ** (i / self.head_dim))

    def _pack(self, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
        if inv_freq.shape != (self.head_dim // 2,):
            raise ValueError(f"rotary frequencies of shape {tuple(inv_freq.shape)}; the Copilot "
                             f"rotates whole heads of {self.head_dim} (needs "
                             f"({self.head_dim // 2},): partial rotary embeddings are not "
                             "supported)")
        return torch.cat([torch.tensor([scaling], dtype=torch.float64),
                          inv_freq.detach().cpu().double()])

    def set_frequencies(self, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        """Use a pretrained decoder's inverse frequencies (head_dim/2,) and cos/sin scaling."""
        self._state, self._on = self._pack(inv_freq, scaling), None

    @property
    def inv_freq(self) -> torch.Tensor:
        """(head_dim/2,) float64 on the CPU."""
        return self._state[1:]

    @property
    def scaling(self) -> float:
        return float(self._state[0])

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._on is None or self._on[0] != pos.device:  # one small copy per device
            self._on = (pos.device, self.inv_freq.float().to(pos.device))
        freqs = pos.float()[..., None] * self._on[1]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos, sin

    def get_extra_state(self) -> torch.Tensor:
        return self._state.clone()

    def set_extra_state(self, state: torch.Tensor) -> None:
        state = state.detach().cpu().double()
        self.set_frequencies(state[1:], float(state[0]))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # Copilots saved before the frequencies were state used plain RoPE with rope_theta.
        state_dict.setdefault(prefix + "_extra_state",
                              self._pack(self.default_frequencies(), 1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def enable_bias(linear: nn.Linear) -> None:
    """Give a bias-free Linear a zero bias (sources such as Qwen2 have q/k/v biases)."""
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype))


def adopt_saved_biases(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Before `module` loads `state_dict`: every child Linear whose saved bias is present gets
    one, so a Copilot built from its config loads a Copilot initialised from a biased source."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and f"{prefix}{name}.bias" in state_dict:
            enable_bias(child)


def rotate(x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding of x (B, heads, T, hd) with cos, sin (B, 1, T, hd) (HF's half split)."""
    cos, sin = cs
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, Tq, hd) over k, v (B, H_kv, Tk, hd).

    `mask` broadcasts to (B, H, Tq, Tk) and is the same for every head (size 1 in dim 1).
    """
    B, H, Tq, hd = q.shape
    rep = H // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if Tq == 1 and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)):
        # A decoding step: the rep query heads of a group become rep query rows of their
        # key/value head, so attention reads the cached heads without copying them (the mask,
        # (B, 1, 1, Tk), broadcasts over those rows).
        out = F.scaled_dot_product_attention(q.reshape(B, H // rep, rep, hd), k, v,
                                             attn_mask=mask)
        return out.reshape(B, H, 1, hd)
    # Widen k/v per call (transient) rather than pass SDPA's enable_gqa: on CUDA that flag with
    # an attention mask, which the Copilot always has here, leaves only the math kernel (which
    # materialises the scores; transformers' SDPA integration avoids it for the same reason),
    # and it needs torch >= 2.5.
    k, v = (t[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions; keys/values from `kv_src` (self or memory).

    Projections are bias-free unless a source with biases initialised them (Qwen2's q/k/v);
    loading a state dict that has a bias gives the projection one (`adopt_saved_biases`).
    """

    def __init__(self, d: int, heads: int, kv_heads: int | None = None,
                 head_dim: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.hd = head_dim or d // heads
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.kv_heads} key/value heads do not divide {heads} heads")
        # Created in this order with these shapes so that the defaults draw the same initial
        # weights from the same seed as the multi-head attention this replaces.
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, d, bias=False)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads, self.hd).transpose(1, 2)

    def keys_values(self, kv_src: torch.Tensor, k_rope: tuple) -> KV:
        """Keys (rotated to `k_rope`) and values (B, H_kv, Tk, hd) of rows kv_src (B, Tk, d)."""
        k = rotate(self._split(self.k_proj(kv_src), self.kv_heads), k_rope)
        return k, self._split(self.v_proj(kv_src), self.kv_heads)

    def forward(self, x: torch.Tensor, *, kv_src: torch.Tensor | None, q_rope: tuple,
                k_rope: tuple | None, mask: torch.Tensor | None,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """x (B, Tq, d); kv_src (B, Tk, d) rows to append to `past` keys/values (None: none).

        Returns the output (B, Tq, d) and the full (keys, values) (B, H_kv, Tk_total, hd).
        """
        q = rotate(self._split(self.q_proj(x), self.heads), q_rope)
        if kv_src is not None:
            k, v = self.keys_values(kv_src, k_rope)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        else:
            assert past is not None
            k, v = past
        out = attend(q, k, v, mask)
        B, _, Tq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, -1)), (k, v)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        adopt_saved_biases(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
