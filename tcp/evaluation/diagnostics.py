"""Teacher-forced Copilot diagnostics (docs/method.md §7) without vocabulary-sized intermediates.

The Copilot reads the same sparse errors it trained on (the Pilot's top-k of p̂ and the label,
k = `mistake_log.topk`), and its output f is compared with the *exact* error
ell_i = onehot(y_i) - p̂_i. Every (tokens, V) quantity — f, p̂, ell, the fused scores — exists
only for one chunk of rows at a time, inside the Copilot head's forward (where ZeRO-3 has
gathered its weight), so the peak above the Pilot's logits is a few chunks of `chunk_mib` MiB
whatever V is. The Pilot's logits are computed at the target rows only (`FusedLMHead`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tcp.data.collate import TokenizedSample, collate
from tcp.evaluation.shards import shard_batches
from tcp.kernels.chunking import rows_per_chunk
from tcp.kernels.copilot_loss import per_sequence_rmse
from tcp.models.copilot_inputs import build_inputs
from tcp.models.lm_head import HeadOptions
from tcp.models.log_entries import collect
from tcp.models.pilot import PilotTap, pilot_forward
from tcp.runtime.collective import sum_across_ranks


@dataclass
class DiagnosticsTarget:
    """Per-token statistics of f against the exact error, computed in row chunks.

    Called by the Copilot's `ErrorHead` with x (N, d_C) (the normalised final states of the
    real target positions, in entry order), its weight (V, d_C) and bias (V,). Returns (N,)
    tensors: `sq` ||f - ell||², `zero_sq` ||ell||², `cos` cos(f, ell), `pilot_ok` argmax p̂ = y,
    and `fused_ok` (L, N) argmax of the fused scores = y per lambda.
    """

    logits: torch.Tensor
    """(N, V) the Pilot's logits at the same rows."""
    labels: torch.Tensor
    """(N,) y_i."""
    lambdas: list[float]
    fusion: str
    """'probs' (p̂ + λf) or 'logits' (z + λf)."""
    chunk_mib: float = 64.0
    """Size of one (rows, V) fp32 buffer."""

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
        N, V = self.logits.shape
        dev = x.device
        out = {k: torch.empty(N, dtype=torch.float32, device=dev)
               for k in ("sq", "zero_sq", "cos")}
        out["pilot_ok"] = torch.empty(N, dtype=torch.bool, device=dev)
        out["fused_ok"] = torch.empty(len(self.lambdas), N, dtype=torch.bool, device=dev)
        step = rows_per_chunk(V, self.chunk_mib)
        for r0 in range(0, N, step):
            r = slice(r0, min(N, r0 + step))
            y = self.labels[r]
            f = F.linear(x[r], weight, bias).float()
            z = self.logits[r].float()
            p = torch.softmax(z, dim=-1)
            out["pilot_ok"][r] = p.argmax(-1) == y
            for li, lam in enumerate(self.lambdas):
                base = p if self.fusion == "probs" else z
                out["fused_ok"][li, r] = torch.add(base, f, alpha=lam).argmax(-1) == y
            del z
            ell = p.neg_()  # reuse p's buffer: ell = onehot(y) - p̂
            ell[torch.arange(ell.shape[0], device=dev), y] += 1.0
            out["zero_sq"][r] = ell.pow(2).sum(-1)
            out["cos"][r] = F.cosine_similarity(f, ell, dim=-1, eps=1e-12)
            out["sq"][r] = (f - ell).pow_(2).sum(-1)
        return out


@torch.no_grad()
def teacher_forced_diagnostics(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module,
                               samples: list[TokenizedSample], *, pad_id: int, topk: int,
                               lambdas: list[float], fusion: str, batch_size: int, rank: int,
                               world: int, device: torch.device,
                               chunk_mib: float = 64.0) -> dict[str, Any]:
    """Copilot RMSE vs the zero baseline, cos(f_i, ell_i), fixes/breaks per lambda (docs/method.md
    §7), on `samples` sharded over ranks. Collective under ZeRO-3.

    The Copilot's inputs are the sparse top-`topk` errors, as in training; the targets are
    the exact dense errors, one chunk of rows at a time.
    """
    L = len(lambdas)
    acc = {"rmse": 0.0, "zero": 0.0, "seqs": 0.0, "cos": 0.0, "tokens": 0.0,
           "pilot_correct": 0.0}
    fixes, breaks = [0.0] * L, [0.0] * L
    for items, n_real in shard_batches(samples, rank=rank, world=world, batch_size=batch_size):
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        out = pilot_forward(pilot, tap, batch,
                            head=HeadOptions(topk=topk, fused=False, chunk_mib=chunk_mib))
        entries = collect(out, topk=topk, step=0, rank=rank, sample_id=batch["sample_id"],
                          device=device)
        assert out.target_logits is not None
        stats = copilot(build_inputs(entries, device),
                        target=DiagnosticsTarget(logits=out.target_logits, labels=entries.labels,
                                                 lambdas=list(lambdas), fusion=fusion,
                                                 chunk_mib=chunk_mib))
        if n_real == 0:  # a throw-away batch that kept this rank in step
            continue
        seq = torch.repeat_interleave(torch.arange(entries.num_entries, device=device),
                                      entries.target_lens.to(device))
        real = seq < n_real
        rmse = per_sequence_rmse(stats["sq"][real], seq[real], n_real)
        zero = per_sequence_rmse(stats["zero_sq"][real], seq[real], n_real)
        acc["rmse"] += float(rmse.sum())
        acc["zero"] += float(zero.sum())
        acc["seqs"] += n_real
        acc["cos"] += float(stats["cos"][real].sum())
        acc["tokens"] += float(real.sum())
        pilot_ok = stats["pilot_ok"][real]
        acc["pilot_correct"] += float(pilot_ok.sum())
        for li in range(L):
            fused_ok = stats["fused_ok"][li][real]
            fixes[li] += float((fused_ok & ~pilot_ok).sum())
            breaks[li] += float((~fused_ok & pilot_ok).sum())
    keys = list(acc)
    tot = sum_across_ranks([acc[k] for k in keys] + fixes + breaks, device)
    s = dict(zip(keys, tot[:len(keys)], strict=True))
    fx, br = tot[len(keys):len(keys) + L], tot[len(keys) + L:]
    seqs, toks = max(s["seqs"], 1), max(s["tokens"], 1)
    rmse_m, zero_m = s["rmse"] / seqs, s["zero"] / seqs
    return {
        "copilot_rmse": rmse_m,
        "zero_rmse": zero_m,
        "rmse_ratio": rmse_m / zero_m if zero_m > 0 else float("nan"),
        "cosine": s["cos"] / toks,
        "pilot_token_accuracy": s["pilot_correct"] / toks,
        "tokens": int(s["tokens"]),
        "copilot_input_topk": topk,
        "fixes": {str(lv): int(x) for lv, x in zip(lambdas, fx, strict=True)},
        "breaks": {str(lv): int(x) for lv, x in zip(lambdas, br, strict=True)},
    }
