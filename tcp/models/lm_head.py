"""The Pilot's LM head, swapped in so the loss, top-k or the logits of chosen rows are computed
inside the head's own forward (where DeepSpeed ZeRO-3 has gathered its weight) and the model
never builds (B, T, V) logits it does not need.

`use_fused_head` installs `FusedLMHead` before the engine is built; outside a request it is the
Linear it replaced (same parameters, so ties and state-dict keys survive). `pilot_forward`
(tcp.models.pilot) asks it for the fused cross-entropy + top-k (`HeadOptions`); `logits_at`
asks it for the logits of some (batch, position) rows only (evaluation, decoding prefill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tcp.kernels.pilot_loss import CEResult, fused_linear_cross_entropy


@dataclass
class HeadOptions:
    """How `pilot_forward` computes the loss: fused in the LM head, or from full logits."""

    topk: int
    """Top-k probabilities per target token for the Mistake Log (0: none)."""
    fused: bool = True
    """Fused cross-entropy in `FusedLMHead` (no (N, V) logits); False: eager, from logits."""
    impl: str | None = "auto"
    """Kernel backend of the fused path (tcp.kernels.dispatch)."""
    chunk_mib: float = 64.0
    """Chunk buffer size of the fused path."""


@dataclass
class _HeadRequest:
    rows: tuple[torch.Tensor, torch.Tensor]
    labels: torch.Tensor | None
    options: HeadOptions | None
    """None: return the logits at `rows` only ((N, V), not the model's (B, T, V))."""
    result: CEResult | None = None


class FusedLMHead(nn.Linear):
    """The Pilot's LM head. Outside `request(...)` it is the Linear it replaced; inside, its
    forward takes the (B, T, d) final hidden states, keeps the target rows and returns the fused
    cross-entropy (scalar, with grad), leaving token losses and top-k on the request."""

    @classmethod
    def replacing(cls, linear: nn.Linear) -> FusedLMHead:
        """A head that shares `linear`'s parameters (ties to the embedding survive)."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.weight = linear.weight
        head.bias = linear.bias  # a Parameter or None (registered either way)
        head._request = None
        return head

    @contextlib.contextmanager
    def request(self, req: _HeadRequest) -> Iterator[_HeadRequest]:
        self._request = req
        try:
            yield req
        finally:
            self._request = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        req: _HeadRequest | None = self._request
        if req is None:
            return super().forward(x)
        o = req.options
        if o is None:
            return super().forward(x[req.rows])
        assert req.labels is not None
        req.result = fused_linear_cross_entropy(x[req.rows], self.weight, req.labels,
                                                topk=o.topk, bias=self.bias, impl=o.impl,
                                                chunk_mib=o.chunk_mib)
        return req.result.loss


@contextlib.contextmanager
def logits_at(model: nn.Module, rows: tuple[torch.Tensor, torch.Tensor]) -> Iterator[bool]:
    """Within it, a forward of `model` (an HF model or its engine) computes logits at `rows`
    (batch, position) only, (R, V) instead of (B, T, V), when its head is a `FusedLMHead`;
    yields whether it does (if not, the model returns its usual (B, T, V) logits)."""
    head = getattr(model, "module", model).get_output_embeddings()
    if not isinstance(head, FusedLMHead):
        yield False
        return
    with head.request(_HeadRequest(rows=rows, labels=None, options=None)):
        yield True


def use_fused_head(model: nn.Module, *, required: bool = True) -> FusedLMHead | None:
    """Swap an HF causal LM's output layer for a `FusedLMHead` (before DeepSpeed wraps it).

    An output layer that is not a Linear cannot be swapped: with `required` (the fused loss
    needs it) that is an error, otherwise the model keeps its head (None; `logits_at` then
    falls back to the model's own logits)."""
    head = model.get_output_embeddings()
    if isinstance(head, FusedLMHead):
        return head
    if not isinstance(head, nn.Linear):
        if not required:
            return None
        raise RuntimeError(f"{type(model).__name__}'s output layer is a {type(head).__name__}, "
                           "not a Linear; set kernels.fused=false to use its logits")
    fused = FusedLMHead.replacing(head)
    model.set_output_embeddings(fused)
    return fused
