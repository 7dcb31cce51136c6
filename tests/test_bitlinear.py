"""Tests for labutils.bitlinear: the forward formula, the STE, the eval cache, quantize_, warm-up, LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from models_support import tiny_bert

from labutils import bitlinear as bl
from labutils import quant
from labutils.bitlinear import (
    BitLinear,
    BitNetConfig,
    GradientMismatch,
    LoRA,
    add_lora_,
    gradient_mismatch,
    linear_warmup_lambda,
    quant_strength_context,
    quantize_,
    set_quant_strength,
)

EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster and gives the same numbers on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- reference formulas


def ref_weight(w: torch.Tensor, bits: float, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) written out from the BitNet papers, independently of labutils.quant."""
    reduce = dict(dim=1, keepdim=True) if per_channel else {}
    if bits == 1.58:
        gamma = w.abs().mean(**reduce)
        return torch.round(torch.clamp(w / (gamma + EPS), -1, 1)), gamma
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0), w.abs().mean(**reduce)
    qp = 2 ** (int(bits) - 1) - 1
    scale = w.abs().amax(**reduce) / qp
    return torch.round(w / scale), scale


def ref_forward(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """norm -> per-token absmax codes -> integer matmul -> rescale once -> + bias."""
    cfg = layer.config
    if cfg.norm is not None:
        if cfg.norm == "rms":
            normed = x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.eps) * layer.norm.weight
        else:  # "layer", SubLN
            centered = x - x.mean(-1, keepdim=True)
            normed = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + cfg.eps)
            normed = normed * layer.norm.weight + layer.norm.bias
        torch.testing.assert_close(layer.norm(x), normed, rtol=1e-6, atol=1e-6)
        # go on from the layer's own norm output: a 1-ulp difference can flip an activation code
        # that lands on a rounding tie (x / s = k + 0.5), which would test float luck, not the formula
        x = layer.norm(x).detach()
    w_codes, w_scale = ref_weight(layer.weight.detach(), cfg.weight_bits, cfg.per_channel)
    if cfg.act_bits is None:
        return F.linear(x, w_codes) * w_scale.reshape(-1) + layer.bias
    if cfg.act_bits == 1:  # binary activations: sign (0 -> +1) times mean|x| per token
        x_scale = x.abs().mean(-1, keepdim=True)
        x_codes = torch.where(x >= 0, 1.0, -1.0)
    else:
        qp = 2 ** (cfg.act_bits - 1) - 1
        x_scale = x.abs().amax(-1, keepdim=True).clamp_min(cfg.eps) / qp
        x_codes = torch.clamp(torch.round(x / x_scale), -qp, qp)
    return (x_codes @ w_codes.T) * x_scale * w_scale.reshape(-1) + layer.bias


def make_layer(
    config: BitNetConfig, in_features: int = 24, out_features: int = 10, seed: int = 0
) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(in_features, out_features, config=config)
    if layer.norm is not None:  # a non-trivial norm gain, so the test sees it
        with torch.no_grad():
            layer.norm.weight.uniform_(0.5, 1.5)
    return layer


BERT_LINEARS = [
    f"bert.encoder.layer.{i}.{name}"
    for i in range(2)
    for name in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    )
]


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("bits", [1, 1.58])
@pytest.mark.parametrize("act_bits", [8, 1, None])
@pytest.mark.parametrize("norm", ["rms", "layer", None])
@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_equals_reference_formula(bits, act_bits, norm, per_channel):
    layer = make_layer(BitNetConfig(weight_bits=bits, act_bits=act_bits, norm=norm, per_channel=per_channel))
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), ref_forward(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_k_bit_forward_equals_reference_formula(bits):
    layer = make_layer(BitNetConfig(weight_bits=bits, act_bits=8, norm="rms"))
    x = torch.randn(7, 24)
    torch.testing.assert_close(layer(x), ref_forward(layer, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(1, 9),
    in_features=st.integers(1, 17),
    bits=st.sampled_from([1, 1.58, 3]),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantized_weight_is_what_forward_uses(out_features, in_features, bits, per_channel, seed):
    layer = make_layer(
        BitNetConfig(weight_bits=bits, act_bits=None, norm=None, per_channel=per_channel),
        in_features,
        out_features,
        seed,
    )
    codes, scale = layer.quantized_weight()
    assert codes.dtype == torch.int8 and codes.shape == (out_features, in_features)
    assert scale.dtype == torch.float32
    assert scale.shape == ((out_features, 1) if per_channel else ())
    allowed = {1: {-1, 1}, 1.58: {-1, 0, 1}, 3: set(range(-3, 4))}[bits]
    assert set(codes.unique().tolist()) <= allowed
    x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(layer(x), F.linear(x, codes.float() * scale, layer.bias), rtol=0, atol=0)


def test_forward_keeps_dtype_and_leading_dims():
    layer = make_layer(BitNetConfig()).to(torch.bfloat16)
    y = layer(torch.randn(2, 3, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 10)


def test_eval_forward_matches_train_forward():
    layer = make_layer(BitNetConfig(weight_bits=1.58, act_bits=8))
    x = torch.randn(6, 24)
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    y_eval_again = layer(x)
    assert torch.equal(y_train, y_eval) and torch.equal(y_eval, y_eval_again)


# --------------------------------------------------------------------------- the STE


@pytest.mark.parametrize("bits", [1, 1.58])
@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_weight_gradient_is_the_ste_rule(bits, ste):
    layer = make_layer(BitNetConfig(weight_bits=bits, act_bits=8, norm="rms", ste=ste))
    x = torch.randn(5, 24)
    grad_out = torch.randn(5, 10)
    layer(x).backward(grad_out)

    # the quantized activations that reach F.linear, and dL/dW_q = grad_out^T x_q
    x_n = F.rms_norm(x, (24,), layer.norm.weight.detach(), eps=EPS)
    codes, scale = quant.quantize_activations_absmax(x_n, 8, eps=EPS)
    grad_wq = grad_out.T @ (codes.float() * scale)
    w = layer.weight.detach()
    _, w_scale = ref_weight(w, bits, per_channel=False)
    keep = (w.abs() <= w_scale).float() if ste == "clipped" else torch.ones_like(w)
    torch.testing.assert_close(layer.weight.grad, grad_wq * keep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0))
    if ste == "clipped":  # the mask really zeroes something: weights with |W| > mean|W| exist
        assert 0 < int((keep == 0).sum()) < keep.numel()


def test_input_gradient_passes_the_activation_quantizer_unchanged():
    layer = make_layer(BitNetConfig(weight_bits=1.58, act_bits=8, norm="rms"))
    x = torch.randn(4, 24, requires_grad=True)
    grad_out = torch.randn(4, 10)
    layer(x).backward(grad_out)
    codes, scale = layer.quantized_weight()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(F.rms_norm(x_ref, (24,), layer.norm.weight.detach(), eps=EPS), codes.float() * scale).backward(
        grad_out
    )
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_clipped_ste_equals_identity_for_k_bit_absmax():
    grads = []
    for ste in ("identity", "clipped"):
        layer = make_layer(BitNetConfig(weight_bits=4, ste=ste))
        layer(torch.randn(3, 24, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append(layer.weight.grad)
    assert torch.equal(grads[0], grads[1])


def test_straight_through_value_and_gradient():
    x = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    x_q = torch.tensor([0.0, -1.0, 1.0])
    keep = torch.tensor([1.0, 1.0, 0.0])
    y = bl.straight_through(x, x_q, 1.0, keep)
    assert torch.equal(y.detach(), x_q)
    y.sum().backward()
    assert torch.equal(x.grad, keep)


# --------------------------------------------------------------------------- eval cache


def _count_calls(monkeypatch, name: str) -> list:
    calls = []
    original = getattr(quant, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(quant, name, counting)
    return calls


def test_eval_mode_quantizes_the_weight_once(monkeypatch):
    calls = _count_calls(monkeypatch, "ternarize_absmean")
    layer = make_layer(BitNetConfig(weight_bits=1.58)).eval()
    x = torch.randn(2, 24)
    y = layer(x)
    for _ in range(3):
        assert torch.equal(layer(x), y)
    layer.quantized_weight()
    assert len(calls) == 1

    with torch.no_grad():  # an in-place update bumps weight._version: the cache is stale
        layer.weight.mul_(-1)
    y_flipped = layer(x)
    assert torch.equal(layer(x), y_flipped) and len(calls) == 2
    assert not torch.equal(y_flipped, y)

    layer.load_state_dict(make_layer(BitNetConfig(), seed=0).state_dict())
    assert torch.equal(layer(x), y) and len(calls) == 3

    layer.train()
    layer(x)
    layer(x)
    assert len(calls) == 5  # in training, every step quantizes the changing weight


def test_writes_through_weight_data_need_invalidate_cache(monkeypatch):
    layer = make_layer(BitNetConfig()).eval()
    x = torch.randn(2, 24)
    y = layer(x)
    layer.weight.data.mul_(-1)  # .data bypasses the version counter
    assert torch.equal(layer(x), y)
    layer.invalidate_cache()
    assert not torch.equal(layer(x), y)


def test_optimizer_step_in_eval_mode_refreshes_the_cache():
    layer = make_layer(BitNetConfig(weight_bits=1)).eval()
    x = torch.randn(8, 24)
    optimizer = torch.optim.SGD(layer.parameters(), lr=10.0)
    before = layer.quantized_weight()[0].clone()
    layer(x).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.quantized_weight()[0], before)
    assert torch.equal(
        layer.quantized_weight()[0], ref_weight(layer.weight.detach(), 1, False)[0].to(torch.int8)
    )


# --------------------------------------------------------------------------- quantize_


def test_quantize_replaces_exactly_the_encoder_linears_of_bert():
    model = tiny_bert()
    original = copy.deepcopy(model)
    report = quantize_(model, BitNetConfig())

    assert report.replaced == BERT_LINEARS
    assert report.skipped == ["bert.pooler.dense", "classifier"]
    bit_names = [n for n, m in model.named_modules() if isinstance(m, BitLinear)]
    assert bit_names == BERT_LINEARS
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert report.replaced_params == sum(
        original.get_submodule(n).weight.numel() + original.get_submodule(n).bias.numel()
        for n in BERT_LINEARS
    )
    assert report.norm_params == sum(original.get_submodule(n).in_features for n in BERT_LINEARS)
    assert report.total_params == sum(p.numel() for p in model.parameters())

    new_state, old_state = model.state_dict(), original.state_dict()
    for key, value in old_state.items():  # every old tensor is kept, replaced linears included
        assert torch.equal(new_state[key], value), key
    extra = set(new_state) - set(old_state)
    assert extra == {f"{n}.norm.weight" for n in BERT_LINEARS}

    text = str(report)
    assert "12 nn.Linear -> BitLinear" in text and "1.58-bit" in text
    assert "classifier (kept in full precision)" in text


def test_quantize_include_skip_and_filter():
    model = tiny_bert()
    report = quantize_(model, BitNetConfig(), include="attention.self.*")
    assert report.replaced == [n for n in BERT_LINEARS if ".self." in n]

    model = tiny_bert()
    report = quantize_(model, BitNetConfig(weight_bits=1), filter_fn=lambda m, name: m.out_features == 64)
    assert report.replaced == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.1.intermediate.dense",
    ]

    model = tiny_bert()
    report = quantize_(model, skip=())
    assert report.replaced == BERT_LINEARS + ["bert.pooler.dense", "classifier"] and report.skipped == []


def test_quantized_bert_trains():
    model = tiny_bert()
    quantize_(model, BitNetConfig(weight_bits=1.58, act_bits=8))
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 100, (16, 12), generator=gen)
    labels = (input_ids < 50).sum(1).gt(6).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(40):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    # the latent weights moved: gradients reached them through the STE
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is None  # zeroed
    assert not torch.equal(
        model.bert.encoder.layer[0].attention.self.query.weight,
        tiny_bert().bert.encoder.layer[0].attention.self.query.weight,
    )


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [0, 1.5, 3.5, 9, 16, -1])
def test_unsupported_weight_bits(bits):
    with pytest.raises(ValueError, match="weight_bits"):
        BitNetConfig(weight_bits=bits)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight_bits="1.58"), TypeError, "weight_bits"),
        (dict(weight_bits=True), TypeError, "weight_bits"),
        (dict(act_bits=0), ValueError, "act_bits"),
        (dict(act_bits=32), ValueError, "act_bits"),
        (dict(act_bits=8.0), TypeError, "act_bits"),
        (dict(norm="batch"), ValueError, "norm"),
        (dict(ste="tanh"), ValueError, "ste"),
        (dict(per_channel=1), TypeError, "per_channel"),
        (dict(eps=0), ValueError, "eps"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        BitNetConfig(**kwargs)


def test_quantize_errors():
    with pytest.raises(TypeError, match="Embedding"):
        quantize_(tiny_bert(), include="bert.embeddings.word_embeddings")
    with pytest.raises(TypeError, match="LayerNorm"):
        quantize_(tiny_bert(), include=["attention.self.query", "attention.output.LayerNorm"])
    with pytest.raises(ValueError, match="matches no module"):
        quantize_(tiny_bert(), include="decoder")
    with pytest.raises(ValueError, match="nothing to replace"):
        quantize_(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()))
    model = tiny_bert()
    quantize_(model)
    with pytest.raises(ValueError, match="12 already BitLinear"):
        quantize_(model)
    with pytest.raises(ValueError, match="from_linear"):
        quantize_(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="config"):
        quantize_(tiny_bert(), {"weight_bits": 1})
    with pytest.raises(TypeError, match="model"):
        quantize_("bert")
    with pytest.raises(ValueError, match=r"\[\.\.\., 24\]"):
        make_layer(BitNetConfig())(torch.randn(2, 23))
    with pytest.raises(ValueError, match="x must be finite"):
        make_layer(BitNetConfig(norm=None))(torch.full((1, 24), float("nan")))


# --------------------------------------------------------------------------- warm-up, LoRA, mismatch


def test_quant_warmup_blends_and_keeps_the_ste_gradient():
    cfg = BitNetConfig(weight_bits=1.58, act_bits=8, norm=None)
    layer = make_layer(cfg)
    x = torch.randn(5, 24)
    w = layer.weight.detach()
    codes, scale = layer.quantized_weight()
    w_q = codes.float() * scale
    a_codes, a_scale = quant.quantize_activations_absmax(x, 8)
    x_q = a_codes.float() * a_scale

    layer.quant_strength = 0.0
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=0, atol=0)
    layer.quant_strength = 0.25
    x_used, w_used = x + 0.25 * (x_q - x), w + 0.25 * (w_q - w)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x_used, w_used, layer.bias), rtol=1e-6, atol=1e-6)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, grad_out.T @ x_used, rtol=1e-5, atol=1e-6)

    model = nn.Sequential(layer, nn.ReLU(), make_layer(cfg, 10, 3))
    with quant_strength_context(model, 0.5):
        assert [m.quant_strength for m in model if isinstance(m, BitLinear)] == [0.5, 0.5]
    assert [m.quant_strength for m in model if isinstance(m, BitLinear)] == [0.25, 1.0]
    assert set_quant_strength(model, 1.0) == 2
    with pytest.raises(ValueError, match="strength"):
        set_quant_strength(model, 1.5)
    assert [linear_warmup_lambda(s, 4) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert linear_warmup_lambda(0, 0) == 1.0


def test_gradient_mismatch_matches_the_two_gradients():
    torch.manual_seed(0)
    cfg = BitNetConfig(weight_bits=1.58, act_bits=None, norm=None)
    model = nn.Sequential(BitLinear(6, 5, config=cfg), nn.Tanh(), BitLinear(5, 2, config=cfg))
    x, target = torch.randn(32, 6), torch.randn(32, 2)

    def loss_fn(m, batch):
        return F.mse_loss(m(batch[0]), batch[1])

    model.train()
    result = gradient_mismatch(model, (x, target), loss_fn)
    assert [r.name for r in result] == ["0", "2"] and all(isinstance(r, GradientMismatch) for r in result)
    assert model.training and all(p.grad is None for p in model.parameters())

    # by hand: the STE gradient is dL/dW_q of the quantized net; the full-precision one dL/dW of the float net
    def grads(weights):
        ws = [w.clone().requires_grad_(True) for w in weights]
        h = torch.tanh(F.linear(x, ws[0], model[0].bias))
        F.mse_loss(F.linear(h, ws[1], model[2].bias), target).backward()
        return [w.grad for w in ws]

    quantized = [c.float() * s for c, s in (model[0].quantized_weight(), model[2].quantized_weight())]
    g_ste, g_fp = grads(quantized), grads([model[0].weight.detach(), model[2].weight.detach()])
    for r, g, gf in zip(result, g_ste, g_fp):
        assert r.cosine == pytest.approx(
            float(F.cosine_similarity(g.flatten(), gf.flatten(), dim=0)), abs=1e-5
        )
        assert r.norm_ratio == pytest.approx(float(g.norm() / gf.norm()), rel=1e-5)
        assert r.relative_error == pytest.approx(float((g - gf).norm() / gf.norm()), rel=1e-5)

    with pytest.raises(ValueError, match="BitLinear"):
        gradient_mismatch(nn.Linear(2, 2), x, loss_fn)


def test_gradient_mismatch_shrinks_with_more_bits():
    x = torch.randn(64, 24)

    def cosine(bits):
        torch.manual_seed(0)
        model = nn.Sequential(
            BitLinear(24, 16, config=BitNetConfig(weight_bits=bits, act_bits=None)),
            nn.GELU(),
            BitLinear(16, 4, config=BitNetConfig(weight_bits=bits, act_bits=None)),
        )
        return gradient_mismatch(model, x, lambda m, b: m(b).pow(2).mean())[0].cosine

    c1, c8 = cosine(1), cosine(8)
    assert c8 > 0.99 and c1 < c8


def test_lora_on_frozen_ternary_weights(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    quantize_(model, BitNetConfig(), skip=())
    x = torch.randn(64, 8)
    target = torch.sin(x.sum(1, keepdim=True))
    before = model(x).detach()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}

    names = add_lora_(model, rank=4, alpha=8.0)
    calls = _count_calls(monkeypatch, "ternarize_absmean")
    assert names == ["0", "2"] and isinstance(model[0], LoRA) and model[0].scaling == 2.0
    assert torch.equal(model(x), before)  # B = 0: the adapters start as the identity
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = F.mse_loss(model(x), target).item()
    for _ in range(60):
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.7 * first
    assert len(calls) == 2  # one quantization per frozen layer, cached for all 62 forwards
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n.replace("base.", "")])

    with pytest.raises(ValueError, match="rank"):
        LoRA(BitLinear(4, 4), rank=0)
    with pytest.raises(ValueError, match="no BitLinear"):
        add_lora_(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------- quantized embeddings


def test_group_quant_embedding_looks_up_the_k_bit_table_and_packs_exactly(tmp_path):
    from labutils import quant
    from labutils.bitlinear import GroupQuantEmbedding, quantize_embeddings_
    from labutils.packfile import load_packed, save_packed
    from models_support import tiny_bert

    model = tiny_bert(seed=0)
    word = model.bert.embeddings.word_embeddings
    names = quantize_embeddings_(model, bits=4, group_size=16)
    assert "bert.embeddings.word_embeddings" in names
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, GroupQuantEmbedding) and emb.weight is word.weight
    ids = torch.tensor([[1, 5, 7], [2, 2, 9]])
    table = quant.dequantize(quant.quantize(emb.weight.detach(), 4, granularity="group", axis=0, group_size=16))
    torch.testing.assert_close(emb(ids), table[ids], rtol=0, atol=0)
    emb(ids).sum().backward()  # straight-through: the latent table gets the gradient
    assert emb.weight.grad is not None and emb.weight.grad[5].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    save_packed(model, tmp_path / "m.packed", embeddings="int4", group_size=16)
    reloaded = load_packed(tmp_path / "m.packed", tiny_bert(seed=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=0)


def test_group_quant_embedding_bag_pools_the_k_bit_table_with_a_straight_through_gradient():
    from labutils import quant
    from labutils.bitlinear import GroupQuantEmbeddingBag, quantize_embeddings_
    from labutils.models import BagOfEmbeddings

    model = BagOfEmbeddings(50, dim=16, depth=1, seed=0)
    bag = model.embed
    assert quantize_embeddings_(model, bits=4, group_size=8) == ["embed"]
    emb = model.embed
    assert isinstance(emb, GroupQuantEmbeddingBag) and emb.weight is bag.weight
    assert (emb.mode, emb.padding_idx, emb.group_size) == ("mean", 0, 8)
    ids = torch.tensor([[3, 7, 7, 0, 0], [1, 2, 3, 4, 5]])  # 0 = padding, left out of the mean
    table = quant.dequantize(quant.quantize(emb.weight.detach(), 4, granularity="group", axis=0, group_size=8))
    expected = torch.stack([table[[3, 7, 7]].mean(0), table[[1, 2, 3, 4, 5]].mean(0)])
    torch.testing.assert_close(emb(ids), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(table, emb.weight.detach())  # 4 bits really round the table
    emb(ids).sum().backward()  # straight-through: the latent rows that were read get the gradient
    grad = emb.weight.grad
    assert grad[7].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[9].abs().sum() == 0
    with pytest.raises(ValueError, match="divide"):
        GroupQuantEmbeddingBag(10, 12, group_size=5)


def test_group_quant_embedding_errors():
    from labutils.bitlinear import GroupQuantEmbedding, quantize_embeddings_

    with pytest.raises(ValueError, match="bits"):
        GroupQuantEmbedding(10, 8, bits=1)
    with pytest.raises(ValueError, match="divide"):
        GroupQuantEmbedding(10, 12, group_size=5)
    with pytest.raises(ValueError, match="no nn.Embedding or nn.EmbeddingBag"):
        quantize_embeddings_(nn.Sequential(nn.Linear(2, 2)))


# --------------------------------------------------------------------------- empty batches, pins (issue 13)


@pytest.mark.parametrize("act_bits", [None, 1, 8])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 3, 8)])
def test_empty_batches_behave_like_nn_linear(act_bits, shape):
    torch.manual_seed(0)
    layer = BitLinear(8, 4, config=BitNetConfig(act_bits=act_bits))
    reference = nn.Linear(8, 4)
    x = torch.empty(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == reference(x).shape == (*shape[:-1], 4)
    y.sum().backward()  # gradients exist (zeros), as for nn.Linear
    assert x.grad.shape == x.shape and layer.weight.grad is not None
    assert torch.count_nonzero(layer.weight.grad) == 0


@pytest.mark.parametrize("bits", [1, 1.58, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_pinned_weights_are_used_exactly_until_trained(bits, per_channel):
    config = BitNetConfig(weight_bits=bits, per_channel=per_channel)
    source = make_layer(config).to(torch.bfloat16)
    codes, scale = source.quantized_weight()
    layer = make_layer(config, seed=5).to(torch.bfloat16)
    layer.load_state_dict(source.state_dict())  # same norm and bias; the weight is replaced next
    layer.pin_quantized_weight(codes, scale)
    assert layer.pinned and not torch.equal(layer.weight, source.weight)
    got_codes, got_scale = layer.quantized_weight()
    assert torch.equal(got_codes, codes) and torch.equal(got_scale, scale)
    # The latent weight quantizes back to the same codes, so training resumes where it was.
    assert torch.equal(_unpinned(layer).quantized_weight()[0], codes)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    assert torch.equal(layer.eval()(x), source.eval()(x))
    with torch.no_grad():
        layer.weight.mul_(1.5)  # a change of the latent weight ends the pin
    assert not layer.pinned


def _unpinned(layer: BitLinear) -> BitLinear:
    twin = copy.deepcopy(layer)
    twin._pin = None
    return twin


def test_pin_rejects_bad_codes_and_scales_without_changing_anything():
    layer = make_layer(BitNetConfig(weight_bits=4, per_channel=True))
    weight = layer.weight.detach().clone()
    codes = torch.zeros(10, 24, dtype=torch.int8)
    for bad_codes, bad_scale, error, match in [
        (codes.float(), torch.ones(10, 1), TypeError, "integer"),
        (codes[:, :3], torch.ones(10, 1), ValueError, r"shape \[10, 24\]"),
        (codes - 8, torch.ones(10, 1), ValueError, r"\[-7, 7\]"),
        (codes, torch.ones(()), ValueError, r"\[out_features, 1\]"),
        (codes, torch.full((10, 1), float("nan")), ValueError, "finite"),
        (codes, -torch.ones(10, 1), ValueError, ">= 0"),
    ]:
        with pytest.raises(error, match=match):
            layer.pin_quantized_weight(bad_codes, bad_scale)
        assert torch.equal(layer.weight, weight) and not layer.pinned
    binary = make_layer(BitNetConfig(weight_bits=1))
    with pytest.raises(ValueError, match="-1 or \\+1"):
        binary.pin_quantized_weight(codes, torch.ones(()))


# --------------------------------------------------------------------------- BiT elastic binary activations

ELASTIC = BitNetConfig(weight_bits=1, act_bits=1, per_channel=True, norm=None, act_binarizer="elastic")


def _elastic_case():
    """A hand-computed case: u = x - β = [[0.4, 0.0, 1.0], [-1.1, 0.5, -0.5]], α = 0.8."""
    x = torch.tensor([[0.5, -0.2, 1.5], [-1.0, 0.3, 0.0]], requires_grad=True)
    alpha = torch.tensor(0.8, requires_grad=True)
    beta = torch.tensor([0.1, -0.2, 0.5], requires_grad=True)
    return x, alpha, beta


def test_elastic_config_validation_and_default_unchanged():
    assert BitNetConfig().act_binarizer == "sign_mean"
    assert "elastic" not in BitNetConfig(1, 1).describe()
    assert "elastic" in ELASTIC.describe()
    with pytest.raises(ValueError, match="act_binarizer must be one of"):
        BitNetConfig(1, 1, act_binarizer="xnor")
    for bits in (8, 2, None):
        with pytest.raises(ValueError, match="needs act_bits=1"):
            BitNetConfig(1, bits, act_binarizer="elastic")
    assert not any("act_" in n for n, _ in BitLinear(4, 3, config=BitNetConfig(1, 1)).named_parameters())


def test_elastic_forward_is_alpha_sign_of_x_minus_beta_zero_to_plus_one():
    x, alpha, beta = _elastic_case()
    y = bl.ElasticBinarize.apply(x, alpha, beta, EPS)
    codes = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])  # u = 0 -> +1
    assert torch.equal(y, 0.8 * codes)
    tiny = bl.ElasticBinarize.apply(x, torch.tensor(-3.0), beta, EPS)  # α floored at eps, as BiT
    assert torch.equal(tiny, torch.tensor(EPS) * codes)


def test_elastic_gradients_match_bit_formulas_hand_computed():
    x, alpha, beta = _elastic_case()
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    bl.ElasticBinarize.apply(x, alpha, beta, EPS).backward(g)
    # inside = |u| <= α: [[1, 1, 0], [0, 1, 1]]
    assert torch.equal(x.grad, torch.tensor([[1.0, 2.0, 0.0], [0.0, 5.0, 6.0]]))
    assert torch.equal(beta.grad, torch.tensor([-1.0, -7.0, -6.0]))  # -Σ_tokens g·inside
    # Σ g·sign(u) / sqrt(numel) = (1 + 2 + 3 - 4 + 5 - 6) / sqrt(6)
    assert torch.allclose(alpha.grad, torch.tensor(1.0 / 6**0.5))


def test_elastic_bitlinear_forward_init_and_gradients():
    torch.manual_seed(0)
    layer = BitLinear(6, 4, config=ELASTIC)
    assert {"act_alpha", "act_beta"} <= {n for n, _ in layer.named_parameters()}
    assert not bool(layer.act_alpha_initialized)
    x = torch.randn(2, 5, 6)
    y = layer(x)
    assert bool(layer.act_alpha_initialized)
    assert torch.allclose(layer.act_alpha.detach(), 2 * x.abs().mean())  # BiT's init, β = 0
    codes, scale = layer.quantized_weight()
    x_hat = layer.act_alpha.detach() * torch.where(x - layer.act_beta.detach() >= 0, 1.0, -1.0)
    assert torch.allclose(y, F.linear(x_hat, codes.float() * scale, layer.bias), atol=1e-6)
    with torch.no_grad():
        layer.act_alpha.fill_(0.3)
        layer.act_beta.copy_(torch.linspace(-0.5, 0.5, 6))
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert float(layer.act_alpha.detach()) == pytest.approx(0.3), "α is initialized once only"
    u = x - layer.act_beta.detach()
    g_hat = (codes.float() * scale).sum(dim=0)  # dL/dx̂ of sum(linear) for every token
    inside = (u.abs() <= 0.3).float()
    assert torch.allclose(xg.grad, g_hat * inside, atol=1e-6)
    assert torch.allclose(layer.act_beta.grad, -(g_hat * inside).sum(dim=(0, 1)), atol=1e-5)
    want_alpha = (g_hat * torch.where(u >= 0, 1.0, -1.0)).sum() / x.numel() ** 0.5
    assert torch.allclose(layer.act_alpha.grad, want_alpha, atol=1e-5)


def test_elastic_warmup_blend_and_bf16_autocast():
    torch.manual_seed(1)
    layer = BitLinear(8, 3, config=ELASTIC)
    x = torch.randn(4, 8)
    layer.quant_strength = 0.0
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))
    assert not bool(layer.act_alpha_initialized), "λ = 0 uses no α: nothing to initialize"
    layer.quant_strength = 1.0
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.requires_grad_(True))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.act_alpha.grad is not None and layer.act_beta.grad.dtype == torch.float32
    assert torch.allclose(y.float(), y32, atol=0.1, rtol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_elastic_on_cuda_matches_cpu():
    torch.manual_seed(2)
    layer = BitLinear(16, 5, config=ELASTIC)
    x = torch.randn(3, 16)
    y = layer(x)
    gpu = copy.deepcopy(layer).cuda()
    assert torch.allclose(gpu(x.cuda()).cpu(), y, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu(x.cuda()).float().sum().backward()
    assert gpu.act_alpha.grad is not None and gpu.act_beta.grad is not None


def test_elastic_state_dict_round_trip():
    torch.manual_seed(3)
    layer = BitLinear(6, 4, config=ELASTIC)
    x = torch.randn(5, 6)
    layer(x)
    with torch.no_grad():
        layer.act_beta.normal_()
        layer.act_alpha.fill_(0.7)
    state = layer.state_dict()
    assert {"act_alpha", "act_beta", "act_alpha_initialized"} <= set(state)
    fresh = BitLinear(6, 4, config=ELASTIC)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(3 * x), layer(3 * x)), "a loaded α is kept, not re-initialized from the data"
    assert float(fresh.act_alpha.detach()) == pytest.approx(0.7)
    with pytest.raises(RuntimeError, match="act_alpha"):
        BitLinear(6, 4, config=BitNetConfig(1, 1, per_channel=True, norm=None)).load_state_dict(state)


def test_elastic_packed_layer_and_file_equal_the_fake_quantized_layer(tmp_path):
    from labutils.kernels import PackedBitLinear, pack_model
    from labutils.packfile import load_packed, save_packed

    torch.manual_seed(4)
    model = nn.Sequential(BitLinear(130, 40, config=ELASTIC), nn.GELU(), BitLinear(40, 7, config=ELASTIC))
    x = torch.randn(3, 9, 130)
    model(x)  # initializes α
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.act_beta.normal_(0, 0.3)
    model.eval()
    y = model(x)
    packed = pack_model(model)
    assert all(isinstance(m, PackedBitLinear) and m.act_shift is not None for m in (packed[0], packed[2]))
    assert torch.allclose(packed(x), y, atol=1e-5, rtol=1e-5)
    save_packed(model, tmp_path / "m.packed")
    fresh = nn.Sequential(BitLinear(130, 40, config=ELASTIC), nn.GELU(), BitLinear(40, 7, config=ELASTIC))
    loaded = load_packed(tmp_path / "m.packed", fresh).eval()
    assert torch.equal(loaded(x), y)
    with pytest.raises(ValueError, match="not initialized"):
        pack_model(BitLinear(8, 4, config=ELASTIC))
