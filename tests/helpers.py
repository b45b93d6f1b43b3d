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
