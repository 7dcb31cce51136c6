"""labutils.lm: the decoder against Hugging Face's Llama, the KV cache, the tokenizer, the packed
round trip, LoRA on frozen ternary weights, and the ``ci`` preset end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from labutils.bitlinear import BitLinear, add_lora_
from labutils.lm import experiment
from labutils.lm.model import Decoder, KVCache, LMConfig, apply_rope, generate, rope_tables
from labutils.lm.tokenizer import EOS, NEG, POS, clean_review, load_tokenizer, train_tokenizer

TINY = dict(vocab_size=97, n_layer=2, n_head=2, d_model=32, max_seq_len=24)


def tokens(batch: int, length: int, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_forward_equals_hugging_face_llama(kv_heads):
    """Same weights in transformers' LlamaForCausalLM give the same logits: RMSNorm, RoPE
    (rotate-half pairs), SwiGLU, causal SDPA, grouped-query attention and the tied head are Llama's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = Decoder(LMConfig(**{**TINY, "n_head": 4}, n_kv_heads=kv_heads), seed=3).eval()
    cfg = ours.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
    )).eval()  # fmt: skip
    d, h, kv = cfg.d_model, cfg.ffn_hidden, cfg.kv_heads * cfg.head_dim
    state = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight}
    for i, block in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        qkv, gate_up = block.attn.qkv.weight, block.mlp.gate_up.weight
        state |= {
            p + "self_attn.q_proj.weight": qkv[:d], p + "self_attn.k_proj.weight": qkv[d : d + kv],
            p + "self_attn.v_proj.weight": qkv[d + kv :], p + "self_attn.o_proj.weight": block.attn.o.weight,
            p + "mlp.gate_proj.weight": gate_up[:h], p + "mlp.up_proj.weight": gate_up[h:],
            p + "mlp.down_proj.weight": block.mlp.down.weight,
            p + "input_layernorm.weight": block.attn_norm.weight, p + "post_attention_layernorm.weight": block.mlp_norm.weight,
        }  # fmt: skip
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    x = tokens(2, 17)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("quant, kv_heads", [("fp", None), ("w1.58a8", None), ("fp", 1)])
def test_kv_cache_decoding_equals_the_full_forward(quant, kv_heads):
    """Prefill 5 tokens, then 4 at once (the masked past>0 path), then one at a time."""
    model = Decoder(LMConfig(**TINY, quant=quant, n_kv_heads=kv_heads), seed=1).eval()
    x = tokens(3, 20)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 3, dtype=torch.float32, device="cpu")
        parts = [model(x[:, :5], cache), model(x[:, 5:9], cache)]
        parts += [model(x[:, t : t + 1], cache) for t in range(9, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_eager_attention_equals_sdpa():
    sdpa = Decoder(LMConfig(**TINY), seed=2).eval()
    eager = Decoder(LMConfig(**TINY, attention="eager"), seed=2).eval()
    x = tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(eager(x), sdpa(x), atol=1e-5, rtol=1e-5)


def test_causal_mask_future_tokens_do_not_change_the_past():
    model = Decoder(LMConfig(**TINY), seed=0).eval()
    x, y = tokens(1, 12), tokens(1, 12, seed=9)
    y[:, :6] = x[:, :6]
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :6], model(y)[:, :6])


def test_rope_is_a_rotation_and_position_zero_is_identity():
    cos, sin = rope_tables(8, 16, 10000.0)
    x = torch.randn(1, 1, 16, 8)
    rotated = apply_rope(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rotated[..., 0, :], x[..., 0, :])
    # Relative: <R_m q, R_n k> depends only on m - n.
    q, k = torch.randn(8), torch.randn(8)
    qs = apply_rope(q.expand(1, 1, 16, 8), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, 16, 8), cos, sin)[0, 0]
    assert torch.allclose(qs[5] @ ks[3], qs[12] @ ks[10], atol=1e-5)


def test_generate_is_seeded_greedy_is_argmax_and_stops():
    model = Decoder(LMConfig(**TINY), seed=0)
    prompt = tokens(2, 3)
    a = generate(model, prompt, 8, temperature=1.0, seed=5)
    assert torch.equal(a, generate(model, prompt, 8, temperature=1.0, seed=5))
    greedy = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        for t in range(3, 9):
            assert torch.equal(model(greedy[:, :t])[:, -1].argmax(-1), greedy[:, t])
    stop = int(greedy[0, 3])
    stopped = generate(model, prompt[:1], 6, temperature=0, stop_token=stop)
    assert stopped.shape[1] == 4  # stops once every row has emitted the stop token
    assert generate(model, tokens(1, 20), 50).shape[1] == TINY["max_seq_len"]  # capped by the context


def test_bitnet_variant_has_bitlinear_projections_and_float_head():
    model = Decoder(LMConfig(**TINY, quant="w1.58a8"))
    names = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert names == {f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")}
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.embed.weight
    codes, _ = model.blocks[0].attn.qkv.quantized_weight()
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=30, n_head=4), "heads of even size"),
        (dict(d_model=36, n_head=4), "heads of even size"),
        (dict(quant="w2a8"), "quant must be"),
        (dict(attention="flash"), "attention must be"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(n_kv_heads=0), "n_kv_heads must be a positive int"),
        (dict(ffn_dim=1.5), "ffn_dim must be a positive int"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**{**TINY, **kwargs})


def test_input_errors():
    model = Decoder(LMConfig(**TINY))
    with pytest.raises(ValueError, match="int64/int32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model(tokens(1, 25))
    cache = KVCache(model.config, 1, dtype=torch.float32, device="cpu")
    model(tokens(1, 20), cache)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model(tokens(1, 5), cache)


# --------------------------------------------------------------------------- tokenizer

TEXTS = [
    "A wonderful film.<br /><br />The acting is superb and the story moves.",
    "Terrible. I want my two hours back!<br />Avoid.",
    "Not bad, not great: a film you forget by Tuesday — ünïcödé too.",
] * 20


def test_tokenizer_round_trips_and_fixes_special_ids(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300)
    assert [tok.token_to_id(t) for t in (EOS, POS, NEG)] == [0, 1, 2]
    for text in TEXTS[:3] + ["never seen: zebra 42 ∑"]:
        clean = clean_review(text)
        assert tok.decode(tok.encode(clean).ids) == clean
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(clean_review(TEXTS[0])).ids == tok.encode(clean_review(TEXTS[0])).ids
    assert "<br" not in clean_review(TEXTS[0]) and "\n" in clean_review(TEXTS[0])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a tokenizers JSON"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)


# --------------------------------------------------------------------------- packed file, LoRA


def test_packed_ternary_model_gives_the_same_logits(tmp_path):
    preset = experiment.PRESETS["ci"]
    model = experiment.Decoder(experiment.row_config("w1.58a8-xs", preset, 97), seed=4).eval()
    path = experiment.save_row(model, tmp_path, "w1.58a8-xs")
    loaded = experiment.load_row(tmp_path, "w1.58a8-xs", preset, 97)
    with torch.no_grad():
        model.embed.weight.copy_(model.embed.weight.half().float())  # the file stores it in fp16
        for block in model.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.copy_(norm.weight.half().float())
        x = tokens(2, 16)
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    for (_, a), (_, b) in zip(experiment._bitlinears(model), experiment._bitlinears(loaded)):
        assert torch.equal(a.quantized_weight()[0], b.quantized_weight()[0])
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in model.parameters())


def test_lora_trains_and_leaves_ternary_weights_bit_identical():
    model = Decoder(LMConfig(**TINY, quant="w1.58a8"), seed=0)
    before = [m.quantized_weight()[0].clone() for _, m in experiment._bitlinears(model)]
    latent = [m.weight.detach().clone() for _, m in experiment._bitlinears(model)]
    model.requires_grad_(False)
    wrapped = add_lora_(model, rank=2, alpha=4.0)
    assert len(wrapped) == 8
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = tokens(4, 16)
    first = None
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < first
    after = [m.quantized_weight()[0] for _, m in experiment._bitlinears(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(a, m.weight) for a, (_, m) in zip(latent, experiment._bitlinears(model)))


def test_tagged_batches_mask_the_tag_and_padding():
    tok = train_tokenizer(TEXTS, vocab_size=300)
    x, y = experiment._tagged_batches(tok, ["good film", "bad"], [1, 0], 8)
    assert x.shape == y.shape == (2, 8)
    assert x[0, 0] == 0 and x[0, 1] == tok.token_to_id(POS) and x[1, 1] == tok.token_to_id(NEG)
    assert y[0, 0] == -100  # the tag is given, not predicted
    ids = tok.encode("bad").ids
    assert y[1, 1 : 1 + len(ids)].tolist() == ids and y[1, 1 + len(ids)] == 0  # then EOS, then masked
    assert (y[1, 2 + len(ids) :] == -100).all()


def test_learning_rate_schedule():
    preset = experiment.LMPreset(name="t", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [experiment.learning_rate(s, 1.0, preset) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_preset_and_row_errors():
    with pytest.raises(ValueError, match="sizes must be among"):
        experiment.LMPreset(name="t", sizes=("huge",))
    with pytest.raises(ValueError, match="a row is"):
        experiment.row_config("int4-s", experiment.PRESETS["ci"], 100)


def test_ci_preset_end_to_end(tmp_path, monkeypatch):
    """Tokenizer, both rows and the attention stage on the embedded sample, a few steps."""
    from labutils.bench import main

    monkeypatch.delenv("LABBOOK_IMDB_DIR", raising=False)
    args = ["lm", "--preset", "ci", "--stage", "tokenizer,train,attention", "--out", str(tmp_path), "--device", "cpu", "--quiet",
            "--set", "steps=6", "--set", "warmup_steps=2", "--set", "eval_every=3", "--set", "seq_len=32",
            "--set", "vocab_size=400", "--set", "attention_lengths=[32]"]  # fmt: skip
    assert main(args) == 0
    for row in ("fp-xs", "w1.58a8-xs"):
        result = json.loads((tmp_path / f"train_{row}.json").read_text())
        assert result["preset"]["steps"] == 6 and len(result["history"]) == 2
        assert math.isfinite(result["test_ppl"]) and result["test_ppl"] < 400 * 2
        assert result["provenance"]["commit"] is None or len(result["provenance"]["commit"]) == 40
    assert "test_ppl_packed" in json.loads((tmp_path / "train_w1.58a8-xs.json").read_text())
    # The curve is on disk while training (a killed run keeps it) and matches the final one.
    for row in ("fp-xs", "w1.58a8-xs"):
        progress = json.loads((tmp_path / f"progress_{row}.json").read_text())
        assert progress["history"] == json.loads((tmp_path / f"train_{row}.json").read_text())["history"]
    # The eval stage re-reads the weights files: the same perplexities as training measured.
    assert main(["lm", "--preset", "ci", "--stage", "eval", *args[5:]]) == 0
    for row, key in (("fp-xs", "test_ppl"), ("w1.58a8-xs", "test_ppl_packed")):
        evaluated = json.loads((tmp_path / f"eval_{row}.json").read_text())
        trained = json.loads((tmp_path / f"train_{row}.json").read_text())
        assert evaluated["test_ppl"] == pytest.approx(trained[key], rel=1e-5)
        assert evaluated["holdout_ppl"] == pytest.approx(trained["holdout_ppl"], rel=1e-3)
    attention = json.loads((tmp_path / "attention_cpu.json").read_text())
    assert {r["attention"] for r in attention["rows"]} == {"eager", "sdpa"}
    # Resumable: a second run finds every file and trains nothing.
    resume = list(args)
    resume[4] = "train"
    assert main(resume) == 0


def test_bad_stage_and_override_are_usage_errors(tmp_path):
    from labutils.bench import main

    with pytest.raises(SystemExit) as exit_info:
        main(["lm", "--stage", "fly", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["lm", "--set", "nonsense=1", "--out", str(tmp_path)])


def test_packed_decoder_equals_the_fake_quantized_decoder():
    """pack_model swaps every BitLinear for the CPU kernels' PackedBitLinear: same logits, also
    when decoding token by token with the KV cache."""
    from labutils.kernels import pack_model

    model = Decoder(LMConfig(**TINY, quant="w1.58a8"), seed=6).eval()
    packed = pack_model(model)
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), atol=1e-4, rtol=1e-4)
        cache = KVCache(packed.config, 2, dtype=torch.float32, device="cpu")
        steps = [packed(x[:, t : t + 1], cache) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(x), atol=1e-4, rtol=1e-4)


def test_decode_stage_reports_tokens_per_second_and_weight_bytes(tmp_path):
    preset = experiment.LMPreset(name="t", decode_sizes=("xs",), decode_prompt=8, decode_tokens=4, decode_repeat=2)
    result = experiment.run_decode(preset, tmp_path, 97, quiet=True)
    (size,) = result["sizes"]
    assert set(size["rows"]) == set(experiment.DECODE_ROWS)
    for row in size["rows"].values():
        assert row["tg_tokens_per_s"] > 0 and row["pp_tokens_per_s"] > 0 and len(row["tg_samples"]) == 2
    rows = size["rows"]
    assert rows["fp32"]["tg_vs_fp32"]["median"] == 1.0
    # Packed ternary projections: 2 bits per weight instead of 32 (embeddings and norms stay float).
    assert rows["w1.58a8"]["weights_bytes"] < rows["fp32"]["weights_bytes"]
    assert json.loads((tmp_path / "decode_cpu.json").read_text())["kernel_path"] in ("avx512", "avx2", "generic")


def test_load_lora_restores_the_adapters_and_rejects_ones_that_do_not_fit(tmp_path):
    """load_lora = load_row + add_lora_ + the saved adapters: the same logits as the tuned model."""
    preset = dataclasses.replace(experiment.PRESETS["ci"], lora_rank=2)
    model = Decoder(experiment.row_config(f"w1.58a8-{preset.lora_size}", preset, 64), seed=3).eval()
    experiment.save_row(model, tmp_path, f"w1.58a8-{preset.lora_size}")
    tuned = experiment.load_row(tmp_path, f"w1.58a8-{preset.lora_size}", preset, 64)
    add_lora_(tuned, rank=preset.lora_rank, alpha=preset.lora_alpha, seed=preset.seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    adapters = {n: p.detach() for n, p in tuned.named_parameters() if ".lora_" in n}
    experiment._save_tensors(adapters, tmp_path / "lora_adapters.safetensors")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(experiment.load_lora(tmp_path, preset, 64)(x), tuned(x), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        experiment.load_lora(tmp_path, dataclasses.replace(preset, lora_rank=3), 64)

