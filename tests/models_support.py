"""A tiny BERT classifier built from a config (no download), shared by several test modules."""

from __future__ import annotations

import torch


def tiny_bert(seed: int = 0, attn: str = "sdpa", vocab_size: int = 100):
    """``BertForSequenceClassification``: hidden 32, 2 layers, 2 heads, 2 labels, seeded init.

    ``attn="eager"`` is needed when a loss reads attention probabilities.
    """
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
        attn_implementation=attn,
    )
    return BertForSequenceClassification(config)
