"""A byte-level BPE tokenizer trained on IMDb reviews (Hugging Face ``tokenizers``).

Byte-level BPE (GPT-2's scheme, Sennrich et al., 2016 / Radford et al., 2019): text is first
mapped to bytes, so every string has an encoding and decoding is exact; merges learned on the
training reviews build a vocabulary of ``vocab_size`` tokens. Three special tokens:

- ``<|endoftext|>`` (id 0) separates reviews in the training stream and starts every prompt;
- ``<pos>`` / ``<neg>`` (ids 1, 2) ask for a positive / negative review (the LoRA task).

IMDb's HTML line breaks (``<br />``) become newlines before training and encoding
(:func:`clean_review`), so the model never spends tokens on markup.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SPECIAL_TOKENS", "EOS", "POS", "NEG", "clean_review", "train_tokenizer", "load_tokenizer"]

EOS, POS, NEG = "<|endoftext|>", "<pos>", "<neg>"
SPECIAL_TOKENS = (EOS, POS, NEG)
_BREAK = re.compile(r"<br\s*/?>", flags=re.IGNORECASE)


def clean_review(text: str) -> str:
    """A review with ``<br />`` tags as newlines and surrounding whitespace stripped."""
    return _BREAK.sub("\n", text).strip()


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts`` (cleaned here).

    The special tokens get ids 0, 1, 2. Deterministic for the same texts in the same order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((clean_review(t) for t in texts), trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with ``tokenizer.save(path)`` (a ``tokenizer.json``); checks its specials."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path} is not a tokenizers JSON file: {error}") from error
    for i, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != i:
            raise ValueError(f"{path}: special token {token!r} must have id {i}")
    return tokenizer
