"""Small builders shared by tests."""

from __future__ import annotations

import torch

from tcp.config import ArchConfig, CopilotConfig
from tcp.data.tokenizer import build_char_tokenizer
from tcp.models.copilot import Copilot
from tcp.models.pilot import build_llama


def tiny_pilot(seed: int = 0, d: int = 32, layers: int = 2):
    tok = build_char_tokenizer()
    arch = ArchConfig(hidden_size=d, intermediate_size=2 * d, num_layers=layers, num_heads=4)
    model = build_llama(arch, vocab_size=len(tok), pad_id=tok.pad_token_id,
                        bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, seed=seed)
    return model.eval(), tok


def tiny_copilot(vocab: int, d_pilot: int, *, d: int = 24, layers: int = 4,
                 randomize_head: bool = False) -> Copilot:
    cfg = CopilotConfig(hidden_size=d, intermediate_size=2 * d, num_layers=layers, num_heads=4,
                        init_from="none")
    cop = Copilot(cfg, vocab_size=vocab, pilot_hidden=d_pilot).eval()
    if randomize_head:
        with torch.no_grad():
            cop.head.weight.normal_(0, 0.5)
            cop.head.bias.normal_(0, 0.1)
    return cop


def fake_entries(step: int, *, n: int = 4, d: int = 16, k: int = 3, vocab: int = 100,
                 rank: int = 0, seed: int = 0):
    """A deterministic MistakeBatch for `step` (ragged lengths, realistic value ranges)."""
    from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths

    g = torch.Generator().manual_seed(seed * 100_003 + step * 31 + rank)
    xl = torch.randint(1, 7, (n,), generator=g)
    yl = torch.randint(1, 6, (n,), generator=g)
    nx, nt = int(xl.sum()), int(yl.sum())
    probs = torch.rand(nt, vocab, generator=g).pow(8).softmax(-1)
    top_p, top_i = probs.topk(k, -1)
    return MistakeBatch(
        x_tilde=torch.randn(nx, d, generator=g), x_offsets=offsets_from_lengths(xl),
        h=torch.randn(nt, d, generator=g), y_offsets=offsets_from_lengths(yl),
        labels=torch.randint(vocab, (nt,), generator=g), topk_ids=top_i, topk_probs=top_p,
        residual=1 - top_p.sum(-1), step=torch.full((n,), step, dtype=torch.long),
        sample_id=torch.arange(n) + 1000 * step, rank=torch.full((n,), rank, dtype=torch.long),
        loss=torch.rand(n, generator=g))
