"""`MistakeBatch`: a ragged batch of Mistake Log entries in flat, token-major layout.

One entry = one sample at one Pilot step (docs/method.md §3). Per-token arrays of all entries are
concatenated along the token axis and `*_offsets` (B+1,) mark where each entry starts, the layout
the on-disk store uses too (a Zarr array per field, chunked along tokens).

The error ell_i = onehot(y_i) - p_hat_i is stored sparsely as the label y_i, the top-k (ids,
probs) of p_hat_i and the residual mass 1 - sum(top-k).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

PER_TOKEN = ("h", "labels", "topk_ids", "topk_probs", "residual")
PER_ENTRY = ("step", "sample_id", "rank", "loss")


@dataclass
class MistakeBatch:
    """A ragged batch of entries. Shapes: B entries, Nx prompt tokens, N target tokens."""

    x_tilde: torch.Tensor
    """(Nx, d_P) input representation X~ (prompt embeddings)."""
    x_offsets: torch.Tensor
    """(B+1,) int64 row offsets into x_tilde."""
    h: torch.Tensor
    """(N, d_P) layer-mean pooled rationale states."""
    y_offsets: torch.Tensor
    """(B+1,) int64 row offsets into the per-token arrays."""
    labels: torch.Tensor
    """(N,) int64 target tokens y_i."""
    topk_ids: torch.Tensor
    """(N, k) int64 top-k token ids of p_hat_i."""
    topk_probs: torch.Tensor
    """(N, k) float32 top-k probabilities of p_hat_i."""
    residual: torch.Tensor
    """(N,) float32 mass outside the top-k, 1 - sum(topk_probs)."""
    step: torch.Tensor
    """(B,) int64 Pilot step that produced the entry."""
    sample_id: torch.Tensor
    """(B,) int64 dataset index of the sample."""
    rank: torch.Tensor
    """(B,) int64 data-parallel rank that produced the entry."""
    loss: torch.Tensor
    """(B,) float32 the sample's Pilot cross-entropy at that step."""

    # ------------------------------------------------------------------ sizes
    @property
    def num_entries(self) -> int:
        """B."""
        return self.step.numel()

    @property
    def num_tokens(self) -> int:
        """N (target tokens)."""
        return self.labels.numel()

    @property
    def prompt_lens(self) -> torch.Tensor:
        """(B,) rows of X~ per entry."""
        return self.x_offsets[1:] - self.x_offsets[:-1]

    @property
    def target_lens(self) -> torch.Tensor:
        """(B,) target tokens per entry."""
        return self.y_offsets[1:] - self.y_offsets[:-1]

    def __post_init__(self) -> None:
        B, N = self.step.numel(), self.labels.numel()
        assert self.x_offsets.numel() == B + 1 and self.y_offsets.numel() == B + 1
        if self.labels.device.type == "meta":  # shapes only: meta tensors hold no values
            return
        assert int(self.y_offsets[-1]) == N and int(self.x_offsets[-1]) == self.x_tilde.shape[0]
        assert self.h.shape[0] == N and self.topk_ids.shape == self.topk_probs.shape

    # ------------------------------------------------------------------ transforms
    def to(self, device: torch.device | str) -> MistakeBatch:
        """Copy to a device (self when every field is already there)."""
        dev = torch.device(device)
        if all(getattr(self, f.name).device == dev for f in fields(self)):
            return self
        return MistakeBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, entries: torch.Tensor | list[int]) -> MistakeBatch:
        """The sub-batch of the given entry indices, in that order."""
        idx = torch.as_tensor(entries, dtype=torch.long)
        xo, yo = self.x_offsets.cpu(), self.y_offsets.cpu()
        x_rows = _rows(xo, idx)
        y_rows = _rows(yo, idx)
        dev = self.labels.device
        x_rows, y_rows, idx_d = x_rows.to(dev), y_rows.to(dev), idx.to(dev)
        return MistakeBatch(
            x_tilde=self.x_tilde[x_rows],
            x_offsets=_offsets(self.prompt_lens.cpu()[idx]).to(dev),
            h=self.h[y_rows],
            y_offsets=_offsets(self.target_lens.cpu()[idx]).to(dev),
            labels=self.labels[y_rows],
            topk_ids=self.topk_ids[y_rows],
            topk_probs=self.topk_probs[y_rows],
            residual=self.residual[y_rows],
            step=self.step[idx_d],
            sample_id=self.sample_id[idx_d],
            rank=self.rank[idx_d],
            loss=self.loss[idx_d],
        )

    def by_step(self) -> list[MistakeBatch]:
        """One sub-batch per step held, in step order (entries keep their order in each)."""
        return [self.select((self.step == s).nonzero().flatten().cpu())
                for s in self.step.unique().tolist()]

    def at_step(self, step: int) -> MistakeBatch:
        """The same entries (CPU), all at `step`: a recorded step replayed under a new number."""
        return MistakeBatch(**{**self.state_dict(), "step": torch.full_like(self.step.cpu(), step)})

    @property
    def device(self) -> torch.device:
        """Where the per-token tensors live (every field is moved together by `to`)."""
        return self.labels.device

    @staticmethod
    def cat(batches: list[MistakeBatch], *, device: torch.device | str) -> MistakeBatch:
        """Concatenate entries of several batches on `device`.

        The batches may come from different places (the current step's entries on the compute
        device, replayed ones read from the store on the host), so each is moved to `device`
        *before* the concatenation: this is the one place replayed entries join the current
        ones, and the result is on the compute device whatever the inputs were.
        """
        batches = [b.to(device) for b in batches]
        if len(batches) == 1:
            return batches[0]
        out = {}
        for f in fields(MistakeBatch):
            if f.name in ("x_offsets", "y_offsets"):
                continue
            out[f.name] = torch.cat([getattr(b, f.name) for b in batches])
        out["x_offsets"] = _offsets(torch.cat([b.prompt_lens for b in batches]))
        out["y_offsets"] = _offsets(torch.cat([b.target_lens for b in batches]))
        return MistakeBatch(**out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors by field name (CPU)."""
        return {f.name: getattr(self, f.name).cpu() for f in fields(self)}

    @staticmethod
    def from_state_dict(state: dict[str, torch.Tensor]) -> MistakeBatch:
        """Inverse of `state_dict`."""
        return MistakeBatch(**state)

    def dense_errors(self, vocab_size: int) -> torch.Tensor:
        """(N, V) the reconstructed ell_i = onehot(y_i) - topk(p_hat_i) (tests, diagnostics)."""
        ell = torch.zeros(self.num_tokens, vocab_size, dtype=torch.float32,
                          device=self.labels.device)
        ell.scatter_add_(1, self.topk_ids, -self.topk_probs.float())
        ell[torch.arange(self.num_tokens, device=ell.device), self.labels] += 1.0
        return ell


def _offsets(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0)
    return out


def _rows(offsets: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    starts, ends = offsets[:-1][idx].numpy(), offsets[1:][idx].numpy()
    return torch.from_numpy(ranges_to_rows(starts, ends - starts))


def ranges_to_rows(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated aranges [s, s + n) without a Python loop (int64)."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return offs + np.arange(total, dtype=np.int64)


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """(B+1,) offsets from (B,) lengths."""
    return _offsets(lengths)
