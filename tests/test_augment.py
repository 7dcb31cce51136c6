"""labutils.augment: embedding-neighbour word swaps for distillation data."""

from __future__ import annotations

import pytest
import torch

from labutils import augment
from labutils.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_whole_words_and_continuations(tokenizer):
    vocab = tokenizer.get_vocab()
    words, pieces = augment.whole_words(tokenizer), augment.continuation_pieces(tokenizer)
    assert words[vocab["movie"]] and not words[vocab["[CLS]"]] and not words[vocab[","]]
    assert pieces[vocab["##ing"]] and not words[vocab["##ing"]] and not pieces[vocab["movie"]]


def test_neighbours_are_the_most_similar_other_candidates():
    torch.manual_seed(0)
    emb = torch.randn(50, 8)
    emb[7] = emb[3] * 2 + 0.01  # 7 points the same way as 3
    candidates = torch.ones(50, dtype=torch.bool)
    candidates[10] = False
    nb = augment.embedding_neighbours(emb, candidates, k=4, chunk=16)
    assert nb.shape == (50, 4) and nb[3, 0] == 7 and nb[7, 0] == 3
    assert (nb[10] == -1).all() and not (nb == 10).any()
    assert not (nb == torch.arange(50)[:, None]).any()  # never itself
    with pytest.raises(ValueError, match="k must be"):
        augment.embedding_neighbours(emb, candidates, k=49)


def test_only_single_piece_words_are_swapped_and_only_for_words(tokenizer):
    text = ["a wonderful movie, although the screenwriting was unimaginative [SEP]"]
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    words, pieces = augment.whole_words(tokenizer), augment.continuation_pieces(tokenizer)
    neighbours = torch.full((words.numel(), 3), -1, dtype=torch.int64)
    neighbours[words] = torch.tensor([tokenizer.get_vocab()[w] for w in ("film", "great", "story")])
    out = augment.augment_ids(ids, neighbours, words, pieces, prob=1.0, seed=0)
    assert out.shape == ids.shape
    changed = (out != ids)[0]
    for i, (old, new) in enumerate(zip(ids[0].tolist(), out[0].tolist())):
        starts_multi_piece = i + 1 < ids.shape[1] and bool(pieces[ids[0, i + 1]])
        if changed[i]:
            assert words[old] and words[new] and not starts_multi_piece
        elif words[old] and not starts_multi_piece:
            raise AssertionError(f"single-piece word {tokenizer.convert_ids_to_tokens(old)!r} kept with prob=1")
    assert torch.equal(augment.augment_ids(ids, neighbours, words, pieces, prob=1.0, seed=0), out)  # seeded
    assert torch.equal(augment.augment_ids(ids, neighbours, words, pieces, prob=0.0), ids)


def test_augmented_reviews_yield_dataset_rows():
    ds = augment.AugmentedReviews(torch.zeros(3, 5, dtype=torch.int64), torch.ones(3, 5, dtype=torch.int64), torch.tensor([0, 1, 0]))
    assert len(ds) == 3 and set(ds[1]) == {"input_ids", "attention_mask", "label"} and int(ds[1]["label"]) == 1
    with pytest.raises(ValueError, match="must match"):
        augment.AugmentedReviews(torch.zeros(3, 5), torch.ones(3, 4), torch.tensor([0, 1, 0]))
