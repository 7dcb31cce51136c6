"""Tests for labutils.sensitivity: one-layer quantization, plans, bit accounting, pooling, probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models_support import tiny_bert

from labutils import quant
from labutils.models import linear_layer_weights
from labutils.sensitivity import (
    SUPPORTED_BITS,
    average_bits,
    block_and_kind,
    fit_logistic_probe,
    layer_bits,
    layer_sensitivity,
    mean_pooled_embeddings,
    mixed_precision_plan,
    precision,
    quantize_to,
)


@pytest.fixture
def encoder():
    return tiny_bert(seed=0).base_model.eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (6, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    return ids * mask, mask


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- quantize_to, bits


def test_quantize_to_uses_the_book_quantizers():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quantize_to(w, 1.58), torch.mul(*quant.ternarize_absmean(w)))
    assert torch.equal(quantize_to(w, 8), quant.fake_quantize(w, 8, granularity="channel"))
    assert torch.equal(quantize_to(w, 32), w)
    # three levels per tensor; int8 with one scale per row: at most 255 levels per row
    assert quantize_to(w, 1.58).unique().numel() == 3
    row_scales = w.abs().amax(1, keepdim=True) / 127
    codes = quantize_to(w, 8) / row_scales
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4


@pytest.mark.parametrize("bits", [1, 2, 4, 16, 1.5, True, "8", None])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_to(torch.randn(4, 4), bits)


def test_quantize_to_needs_a_matrix():
    with pytest.raises(ValueError, match="2-d"):
        quantize_to(torch.randn(8), 1.58)


def test_layer_and_average_bits():
    assert layer_bits((384, 384), 32) == 32
    assert layer_bits((384, 384), 1.58) == pytest.approx(math.log2(3) + 32 / 384**2)
    assert layer_bits((1536, 384), 8) == pytest.approx(8 + 32 / 384)  # one float32 scale per row
    shapes = {"a": (10, 10), "b": (30, 10)}
    # a in int8 (100 weights), b ternary (300 weights): the average is weighted by size
    want = (100 * (8 + 32 * 10 / 100) + 300 * (math.log2(3) + 32 / 300)) / 400
    assert average_bits(shapes, {"a": 8, "b": 1.58}) == pytest.approx(want)
    assert average_bits(shapes, {}) == 32  # missing layers count as float32
    with pytest.raises(KeyError, match="lacks"):
        average_bits(shapes, {"c": 8})
    with pytest.raises(ValueError):
        layer_bits((10, 0), 8)


def test_block_and_kind():
    assert block_and_kind("encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert block_and_kind("encoder.layer.11.output.dense") == (11, "output.dense")
    assert block_and_kind("layers.0.mlp") == (0, "mlp")
    with pytest.raises(ValueError, match="no numbered block"):
        block_and_kind("classifier")


# --------------------------------------------------------------------------- precision


def test_one_layer_changes_only_that_weight_and_is_restored(encoder):
    before = snapshot(encoder)
    name = "encoder.layer.1.intermediate.dense"
    with precision(encoder, {name: 1.58}) as model:
        assert model is encoder
        during = snapshot(encoder)
    changed = [k for k in before if not torch.equal(before[k], during[k])]
    assert changed == [f"{name}.weight"]
    assert torch.equal(during[f"{name}.weight"], quantize_to(before[f"{name}.weight"], 1.58))
    after = snapshot(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_are_restored_after_an_exception(encoder):
    before = snapshot(encoder)
    with pytest.raises(RuntimeError, match="boom"):
        with precision(encoder, {n: 1.58 for n in linear_layer_weights(encoder)}):
            raise RuntimeError("boom")
    after = snapshot(encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_precision_bad_input(encoder):
    with pytest.raises(KeyError, match="no layer"):
        with precision(encoder, {"encoder.layer.9.output.dense": 1.58}):
            pass
    with pytest.raises(TypeError, match="not an nn.Linear"):
        with precision(encoder, {"embeddings.word_embeddings": 1.58}):
            pass
    with pytest.raises(ValueError, match="bits must be one of"):
        with precision(encoder, {"encoder.layer.0.output.dense": 4}):
            pass
    with pytest.raises(TypeError, match="mapping"):
        with precision(encoder, ["encoder.layer.0.output.dense"]):
            pass


# --------------------------------------------------------------------------- plans


def test_mixed_precision_plan():
    names = ["a", "b", "c", "d"]
    assert mixed_precision_plan(names, []) == {n: 1.58 for n in names}
    assert mixed_precision_plan(names, names) == {n: 8 for n in names}
    assert mixed_precision_plan(names, ["c", "a"]) == {"a": 8, "b": 1.58, "c": 8, "d": 1.58}
    assert mixed_precision_plan(names, ["b"], low=8, high=32) == {"a": 8, "b": 32, "c": 8, "d": 8}
    with pytest.raises(ValueError, match="not in names"):
        mixed_precision_plan(names, ["e"])
    with pytest.raises(ValueError, match="repeats"):
        mixed_precision_plan(names, ["a", "a"])
    with pytest.raises(ValueError, match="bits must be one of"):
        mixed_precision_plan(names, ["a"], high=4)


def test_k0_is_all_ternary_and_all_kept_is_all_int8(encoder, batch):
    names = list(linear_layer_weights(encoder))
    with precision(encoder, {n: 1.58 for n in names}):
        ternary = mean_pooled_embeddings(encoder, *batch)
    with precision(encoder, mixed_precision_plan(names, [])):
        k0 = mean_pooled_embeddings(encoder, *batch)
    with precision(encoder, mixed_precision_plan(names, names)):
        all_int8 = mean_pooled_embeddings(encoder, *batch)
    reference = mean_pooled_embeddings(encoder, *batch)
    assert torch.equal(k0, ternary)
    cos = lambda a: float(torch.cosine_similarity(a, reference, dim=-1).mean())  # noqa: E731
    # a tiny random BERT barely notices (LayerNorm, small init), but int8 is far closer than ternary
    assert 1 - cos(all_int8) < (1 - cos(ternary)) / 10


# --------------------------------------------------------------------------- layer_sensitivity


def test_layer_sensitivity_quantizes_one_layer_per_call(encoder, batch):
    names = list(linear_layer_weights(encoder))
    original = {n: w.clone() for n, w in linear_layer_weights(encoder).items()}
    seen = []

    def evaluate(model):
        current = linear_layer_weights(model)
        changed = [n for n in names if not torch.equal(current[n], original[n])]
        seen.append(changed)
        return {"n_changed": len(changed)}

    results = layer_sensitivity(encoder, evaluate, names)
    assert list(results) == names
    assert seen == [[n] for n in names]
    assert all(r == {"n_changed": 1.0} for r in results.values())
    assert all(torch.equal(w, original[n]) for n, w in linear_layer_weights(encoder).items())


def test_layer_sensitivity_is_deterministic(encoder, batch):
    names = list(linear_layer_weights(encoder))
    reference = mean_pooled_embeddings(encoder, *batch)

    def evaluate(model):
        emb = mean_pooled_embeddings(model, *batch)
        return {"cosine": torch.cosine_similarity(emb, reference, dim=-1).mean()}

    first = layer_sensitivity(encoder, evaluate, names)
    second = layer_sensitivity(encoder, evaluate, names)
    assert first == second
    assert all(0 < r["cosine"] <= 1 + 1e-6 for r in first.values())
    assert min(r["cosine"] for r in first.values()) < 1


def test_layer_sensitivity_checks_names_before_evaluating(encoder):
    calls = []
    with pytest.raises(KeyError, match="no layer"):
        layer_sensitivity(encoder, lambda m: calls.append(1) or {}, ["encoder.layer.0.output.dense", "nope"])
    assert calls == []
    with pytest.raises(ValueError, match="distinct"):
        layer_sensitivity(encoder, lambda m: {}, ["encoder.layer.0.output.dense"] * 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        layer_sensitivity(encoder, lambda m: {}, ["encoder.layer.0.output.dense"], bits=2)


# --------------------------------------------------------------------------- pooling, probe


def test_mean_pooling_ignores_padding_and_batching(encoder, batch):
    ids, mask = batch
    emb = mean_pooled_embeddings(encoder, ids, mask, batch_size=4)
    assert emb.shape == (6, 32) and emb.dtype == torch.float32
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    manual = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(6)])
    assert torch.allclose(emb, manual, atol=1e-5)
    assert torch.allclose(emb, mean_pooled_embeddings(encoder, ids, mask, batch_size=1), atol=1e-5)
    with pytest.raises(ValueError, match="at least one token"):
        mean_pooled_embeddings(encoder, ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        mean_pooled_embeddings(encoder, ids, mask[:, :5])


def test_probe_separates_separable_data_deterministically():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 8, generator=gen)
    x[:, 3] += 4 * (2 * y - 1)  # the label is written in feature 3
    probe = fit_logistic_probe(x, y)
    assert probe.accuracy(x, y) == 1.0
    assert probe.predict(x).dtype == torch.int64
    again = fit_logistic_probe(x, y)
    assert torch.equal(probe.weight, again.weight) and torch.equal(probe.bias, again.bias)
    assert int(probe.weight.abs().argmax()) == 3


def test_probe_bad_input():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic_probe(x, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="0 and 1"):
        fit_logistic_probe(x, torch.arange(10))
    with pytest.raises(ValueError, match="shape"):
        fit_logistic_probe(x, torch.arange(9) % 2)
    with pytest.raises(ValueError, match="l2"):
        fit_logistic_probe(x, torch.arange(10) % 2, l2=-1)
    probe = fit_logistic_probe(x, torch.arange(10) % 2)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        probe.predict(torch.randn(4, 5))


def test_supported_bits_are_the_documented_ones():
    assert SUPPORTED_BITS == (1.58, 8, 32)
