"""A character-level tokenizer built locally as a Hugging Face `PreTrainedTokenizerFast`.

The embedded default cannot download a tokenizer, and arithmetic is best learned digit by digit,
so every printable ASCII character is one token. It is a real HF tokenizer: saved with the run
and loadable with `AutoTokenizer.from_pretrained(run_dir / "tokenizer")`.
"""

from __future__ import annotations

import string
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
ALPHABET = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def token_id_differences(a: Any, b: Any) -> int:
    """How many tokens two tokenizers map to different ids (or only one of them has): 0 when a
    model trained with one can read ids produced by the other."""
    va, vb = a.get_vocab(), b.get_vocab()
    return sum(1 for t, i in va.items() if vb.get(t) != i) + sum(1 for t in vb if t not in va)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded default's tokenizer: 4 specials + one token per printable character."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Each character is its own "word"; the decoder glues them back without spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
