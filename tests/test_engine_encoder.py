"""The compiled encoder (labutils.engine.encoder) against the fake-quantized model it packs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from labutils import kernels as K  # noqa: E402
from labutils.bitlinear import BitNetConfig, quantize_  # noqa: E402
from labutils.engine.encoder import ENGINE_SECTIONS, EncoderEngine, engine_profile  # noqa: E402

SCHEMES = {"w1.58a8": (1.58, 8), "w1a8": (1, 8), "w1a1": (1, 1)}
# How far the logits may be from the fake-quantized model's, as a share of its largest logit.
# Integer dots are exact; float rounding (LayerNorm, softmax, GELU summed in another order) can
# move an activation across a code boundary: one int8 step (A8), or across 0, a sign flip that
# moves a W1A1 dot by 2 of its K. The packed layers (PackedBitLinear) differ from the fake-quantized
# W1A1 model by as much (1.0 % on this model; test_the_engine_equals_the_packed_layers).
TOLERANCE = {"w1.58a8": 2e-3, "w1a8": 2e-3, "w1a1": 2.5e-2}


def _student(scheme: str, seed: int = 0, binarizer: str = "sign_mean", **config) -> torch.nn.Module:
    """A small BERT classifier (2 layers, hidden 128, 4 heads, FFN 512) whose encoder linears are
    BitLinear of ``scheme``; the classifier scaled up so the logits are of order 1 (a random
    head's are ~0.05, which would hide errors)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                     max_position_embeddings=64, num_labels=3, **config)  # fmt: skip
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    weight_bits, act_bits = SCHEMES[scheme]
    options = {"act_binarizer": binarizer} if act_bits == 1 else {}
    quantize_(model, BitNetConfig(weight_bits, act_bits, per_channel=True, norm=None, **options))
    return model.eval()


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Four sequences of 37 tokens: one full, two right-padded, one left-padded (its first
    token, which the pooler reads, masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (4, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    mask[3, :9] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("path", K.available_paths())
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_logits_equal_the_fake_quantized_model(scheme, path):
    """Held to the BitLinear model's logits on every kernel path this CPU runs, with padding,
    within ``TOLERANCE`` of the largest logit; the predicted class is the same."""
    model = _student(scheme)
    batch = _batch()
    with torch.no_grad():
        want = model(**batch).logits
    engine = EncoderEngine.from_model(model)
    with K.use(path):
        got = engine(**batch).logits
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float(want.abs().max()) > 0.3  # logits of order 1: the comparison means something
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE[scheme] * float(want.abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("path", K.available_paths())
def test_padding_changes_nothing(path):
    """A padded sequence gets the logits it gets alone and unpadded: its padding never becomes a
    row, and every compiled step is per token or per sequence (so its hidden states are the same
    bits); only the torch head's matmul may round differently for another batch size."""
    engine = EncoderEngine.from_model(_student("w1.58a8", seed=3))
    batch = _batch(seed=4)
    with K.use(path):
        together = engine(**batch).logits
        for i, keep in enumerate(batch["attention_mask"].bool()):
            if not keep[0]:
                continue  # left padding: alone, its first token would be a real one
            alone = engine(input_ids=batch["input_ids"][i : i + 1, keep]).logits
            torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_the_engine_equals_the_packed_layers(scheme):
    """The same packed weights run layer by layer (PackedBitLinear between torch ops) give the
    same logits to float rounding: the engine changes where the steps run, not what they compute."""
    model = _student(scheme, seed=5)
    packed = K.pack_model(model)
    batch = _batch(seed=6)
    with torch.no_grad():
        want = packed(**batch).logits
    got = EncoderEngine(packed)(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))


@pytest.mark.skipif(not K.amx.available(), reason="needs AMX-INT8 (Sapphire Rapids or later) and the OS's tile state")
@pytest.mark.parametrize("scheme", ["w1.58a8", "w1a8"])
def test_amx_tasks_give_the_vnni_tasks_logits_bit_for_bit(scheme, monkeypatch):
    """On an AMX CPU the avx512 path's A8 steps run their tiles on AMX: exact int32 dots, so the
    logits are those of the VNNI tasks bit for bit; the binary scheme and short inputs keep VNNI."""
    engine = EncoderEngine.from_model(_student(scheme, seed=7))
    batch = _batch(seed=8)
    with K.use("avx512"):
        assert engine._entry_path(16) == "amx" and engine._entry_path(8) == "avx512"
        on_amx = engine(**batch).logits
        monkeypatch.setattr(engine, "_entry_path", lambda block: "avx512")
        on_vnni = engine(**batch).logits
    assert torch.equal(on_amx, on_vnni)
    assert EncoderEngine.from_model(_student("w1a1", seed=7))._entry_path(16) != "amx"


def test_bad_inputs_and_models_are_refused():
    engine = EncoderEngine.from_model(_student("w1.58a8"))
    ids = torch.randint(5, 300, (2, 10))
    with pytest.raises(ValueError, match="at least one real token"):
        engine(input_ids=ids, attention_mask=torch.tensor([[1] * 10, [0] * 10]))
    with pytest.raises(ValueError, match="positions"):
        engine(input_ids=torch.randint(5, 300, (1, 65)))
    with pytest.raises(ValueError, match="shape"):
        engine(input_ids=ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        engine(input_ids=ids.float())
    with pytest.raises(ValueError, match="hidden_act"):
        EncoderEngine.from_model(_student("w1.58a8", hidden_act="relu"))
    elastic = _student("w1a1", binarizer="elastic")
    with torch.no_grad():
        elastic(**_batch())  # BiT's α is set by the first batch
    with pytest.raises(ValueError, match="elastic"):
        EncoderEngine.from_model(elastic)
    with pytest.raises(TypeError, match="BERT-style"):
        EncoderEngine(torch.nn.Linear(3, 3))


def test_the_profile_adds_up_and_reports_its_own_cost():
    engine = EncoderEngine.from_model(_student("w1.58a8"))
    found = engine_profile(engine, _batch(), repeat=3)
    assert set(ENGINE_SECTIONS) <= set(found)
    # The sections come from one pass and never overlap, so they never exceed its total; the
    # rest is the time between marks that no section claims.
    assert sum(found[s] for s in ENGINE_SECTIONS) <= found["total"]
    assert found["outside_sections"] == pytest.approx(found["total"] - sum(found[s] for s in ENGINE_SECTIONS))
    assert found["profiler_overhead"] == pytest.approx(found["total"] - found["total_unmarked"])
    assert all(found[s] >= 0 for s in ENGINE_SECTIONS)


def _grouped(weight: torch.Tensor, bits: int, group: int = 32) -> K.layer.PackedEmbedding:
    """A PackedEmbedding of ``weight`` [rows, dim]: absmax codes of ``bits`` per group of ``group``."""
    qmax = 2 ** (bits - 1) - 1
    groups = weight.detach().reshape(weight.shape[0], -1, group)
    scale = groups.abs().amax(-1).clamp_min(1e-8) / qmax
    codes = (groups / scale[..., None]).round().clamp(-qmax - 1, qmax).reshape(weight.shape).to(torch.int8)
    return K.layer.PackedEmbedding(codes, scale)


@pytest.mark.parametrize("tables", ["int4", "int8", "mixed"])
def test_embeddings_are_read_where_each_table_lies(tables):
    """Word, token-type and position rows dequantized in the compiled lookup equal the packed
    tables' own rows: the engine's logits match the model running the same PackedEmbedding modules."""
    model = _student("w1.58a8")
    emb = model.bert.embeddings
    bits = {"int4": (4, 4, 4), "int8": (8, 8, 8), "mixed": (4, None, 8)}[tables]  # None: a float table stays
    for name, b in zip(("word_embeddings", "token_type_embeddings", "position_embeddings"), bits):
        if b is not None:
            setattr(emb, name, _grouped(getattr(emb, name).weight, b))
    batch = {**_batch(), "token_type_ids": (torch.arange(37) >= 20).long().expand(4, 37)}
    with torch.no_grad():
        want = model(**batch).logits
    got = EncoderEngine.from_model(model)(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE["w1.58a8"] * float(want.abs().max()))
    with pytest.raises(IndexError, match="input_ids out of range"):
        EncoderEngine.from_model(model)(input_ids=torch.full((1, 4), 300))
    with pytest.raises(IndexError, match="token_type_ids out of range"):
        EncoderEngine.from_model(model)(input_ids=torch.ones(1, 4, dtype=torch.long), token_type_ids=torch.full((1, 4), 2))
