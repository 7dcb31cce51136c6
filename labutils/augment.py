"""Data augmentation for distillation: reviews with words swapped for their embedding neighbours.

A distilled student learns from the teacher's outputs, not from labels, so any text the teacher
can score is training data. TinyBERT (Jiao et al., 2020, §3.3) grows the task data this way:
each single-piece word is replaced, with probability ``p_t = 0.4``, by one of its ``K = 15``
most similar words (BERT's masked-LM guesses for single-piece words, GloVe neighbours for the
others), ``N_a = 20`` copies per example. BiBERT and BiT distil their binary students on such
data. Offline, with no masked LM or GloVe at hand, the neighbours here come from the model's own
input embeddings (cosine similarity between word-piece embedding rows), which needs nothing but
the checkpoint the student is made from::

    neighbours = embedding_neighbours(word_embeddings, whole_words(tokenizer), k=15)
    augmented = augment_ids(input_ids, neighbours, whole_words(tokenizer), continuation_pieces(tokenizer))

Only whole-word tokens are swapped (no ``##`` continuation follows them, and they are not
special tokens or punctuation), and only for other whole words, so the review stays a sequence
of real words of the same length (its attention mask is unchanged).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["AugmentedReviews", "augment_ids", "continuation_pieces", "embedding_neighbours", "whole_words"]


def whole_words(tokenizer: Any) -> torch.Tensor:
    """bool ``[vocab]``: the word pieces that are whole alphabetic words (``"movie"``, not
    ``"##ing"``, ``"[CLS]"``, ``","`` or ``"1999"``) of a WordPiece tokenizer."""
    vocab = tokenizer.get_vocab()
    mask = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for piece, index in vocab.items():
        mask[index] = piece.isalpha() and len(piece) > 1 and piece not in special
    return mask


@torch.no_grad()
def embedding_neighbours(embeddings: torch.Tensor, candidates: torch.Tensor, k: int = 15, chunk: int = 4096) -> torch.Tensor:
    """For every candidate row of ``embeddings`` (float ``[vocab, dim]``), the ``k`` candidate
    rows most similar by cosine, itself excluded: int64 ``[vocab, k]`` (rows of non-candidates
    are -1). Computed in chunks of ``chunk`` rows, so the full similarity matrix is never held."""
    if embeddings.ndim != 2 or candidates.shape != embeddings.shape[:1]:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and candidates {tuple(candidates.shape)} do not match")
    if not 1 <= k < int(candidates.sum()):
        raise ValueError(f"k must be in [1, {int(candidates.sum()) - 1}], got {k}")
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    pool = candidates.nonzero().squeeze(1)
    out = torch.full((embeddings.shape[0], k), -1, dtype=torch.int64)
    for start in range(0, pool.numel(), chunk):
        rows = pool[start : start + chunk]
        similarity = unit[rows] @ unit[pool].T
        similarity[torch.arange(rows.numel()), start + torch.arange(rows.numel())] = -2.0  # not itself
        out[rows] = pool[similarity.topk(k, dim=1).indices]
    return out


def continuation_pieces(tokenizer: Any) -> torch.Tensor:
    """bool ``[vocab]``: the WordPiece continuation pieces (``"##ing"``), which end a word begun
    by the token before them."""
    vocab = tokenizer.get_vocab()
    mask = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    for piece, index in vocab.items():
        mask[index] = piece.startswith("##")
    return mask


def augment_ids(input_ids: torch.Tensor, neighbours: torch.Tensor, words: torch.Tensor, continuation: torch.Tensor,
                prob: float = 0.4, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """A copy of ``input_ids`` (int64 ``[n, length]``) in which every single-piece whole word
    (``words[id]`` and no ``continuation`` piece after it) is replaced with probability ``prob``
    by one of its ``neighbours`` (int64 ``[vocab, k]``), drawn uniformly with a generator seeded
    by ``seed``; every other token (special, punctuation, pieces of longer words) is kept."""
    if not 0 <= prob <= 1:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    generator = torch.Generator().manual_seed(seed)
    ids = input_ids.clone()
    continued = torch.zeros_like(ids, dtype=torch.bool)
    continued[:, :-1] = continuation[ids[:, 1:]]
    chosen = words[ids] & ~continued & (torch.rand(ids.shape, generator=generator) < prob)
    replacement = neighbours[ids, torch.randint(0, neighbours.shape[1], ids.shape, generator=generator)]
    chosen &= replacement >= 0
    ids[chosen] = replacement[chosen]
    return ids


class AugmentedReviews(torch.utils.data.Dataset):
    """Tokenized reviews held as tensors (``input_ids``, ``attention_mask``, ``label``, each
    ``[n, ...]``), yielding the same dicts as a torch-format ``datasets.Dataset`` row, so it can be
    concatenated with one (``torch.utils.data.ConcatDataset``)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, label: torch.Tensor) -> None:
        if not (input_ids.shape == attention_mask.shape and label.shape == input_ids.shape[:1]):
            raise ValueError("input_ids, attention_mask [n, length] and label [n] must match")
        self.input_ids, self.attention_mask, self.label = input_ids, attention_mask, label

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "label": self.label[i]}
