"""GGUF export (labutils.export): round trip through gguf's reader; llama.cpp only when installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the GGUF export needs the `gguf` package (pip install 'labutils[deploy]')")

from labutils.engine.decoder import DecoderEngine, EngineShape  # noqa: E402
from labutils.export import export_gguf, export_random_gguf, permute_rope_rows  # noqa: E402
from labutils.lm.model import Decoder, LMConfig  # noqa: E402
from labutils.lm.tokenizer import train_tokenizer  # noqa: E402

TEXTS = [
    "This movie was great, the acting was wonderful and the story moving.",
    "A terrible film. The plot made no sense and the acting was wooden.<br />Avoid it.",
    "I loved the music, the actors and the ending; a great movie to watch twice.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320, min_frequency=1)


def make_model(tokenizer, quant: str, d_model: int = 256, kv_heads: int | None = None) -> Decoder:
    config = LMConfig(vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=4, d_model=d_model,
                      max_seq_len=64, quant=quant, n_kv_heads=kv_heads)  # fmt: skip
    model = Decoder(config, seed=1).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-trivial norm gains, so that a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    return reader.fields[key].contents()


def weight(tensors, name) -> np.ndarray:
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


def check_header(reader, tensors, model, tokenizer, arch):
    cfg = model.config
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.context_length") == cfg.max_seq_len
    assert field(reader, f"{arch}.embedding_length") == cfg.d_model
    assert field(reader, f"{arch}.block_count") == cfg.n_layer
    assert field(reader, f"{arch}.feed_forward_length") == cfg.ffn_hidden
    assert field(reader, f"{arch}.attention.head_count") == cfg.n_head
    assert field(reader, f"{arch}.attention.head_count_kv") == cfg.kv_heads
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field(reader, f"{arch}.vocab_size") == cfg.vocab_size
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    assert field(reader, "tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # the specials are CONTROL
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.bos_token_id") == 0 == field(reader, "tokenizer.ggml.eos_token_id")
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tuple(tensors["token_embd.weight"].shape) == (cfg.d_model, cfg.vocab_size)  # GGUF order: ne0 first


def test_permute_rope_rows_maps_pairs_to_adjacent():
    n_head, hd = 2, 8
    rows = np.arange(n_head * hd, dtype=np.float32)[:, None]
    out = permute_rope_rows(rows, n_head)[:, 0]
    # head 0: pairs (0, 4), (1, 5), ... become rows (0, 1), (2, 3), ...
    assert out[:hd].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert out[hd:].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("weight_type, tol, kv_heads", [("F32", 0.0, None), ("F16", 1e-3, None), ("Q8_0", 1 / 127, None),
                                                       ("F32", 0.0, 2)])  # fmt: skip
def test_full_precision_round_trip(tmp_path, tokenizer, weight_type, tol, kv_heads):
    model = make_model(tokenizer, "fp", kv_heads=kv_heads)
    cfg = model.config
    path = tmp_path / f"fp-{weight_type}.gguf"
    types = export_gguf(model, tokenizer, path, weight_type)
    reader, tensors = read(path)
    check_header(reader, tensors, model, tokenizer, "llama")
    d, h, kv = cfg.d_model, cfg.ffn_hidden, cfg.kv_heads * cfg.head_dim
    for i, block in enumerate(model.blocks):
        qkv = block.attn.qkv.weight.detach().numpy()
        gate_up = block.mlp.gate_up.weight.detach().numpy()
        expected = {
            "attn_q": permute_rope_rows(qkv[:d], cfg.n_head), "attn_k": permute_rope_rows(qkv[d : d + kv], cfg.kv_heads),
            "attn_v": qkv[d + kv :], "attn_output": block.attn.o.weight.detach().numpy(),
            "ffn_gate": gate_up[:h], "ffn_up": gate_up[h:], "ffn_down": block.mlp.down.weight.detach().numpy(),
        }  # fmt: skip
        for name, w in expected.items():
            got = weight(tensors, f"blk.{i}.{name}.weight")
            assert got.shape == w.shape
            # per-block absmax relative rounding: bound by the tensor's absmax times the step
            np.testing.assert_allclose(got, w, rtol=0, atol=tol * np.abs(w).max() + 1e-12, err_msg=name)
        np.testing.assert_array_equal(weight(tensors, f"blk.{i}.attn_norm.weight"), block.attn_norm.weight.detach().numpy())
        np.testing.assert_array_equal(weight(tensors, f"blk.{i}.ffn_norm.weight"), block.mlp_norm.weight.detach().numpy())
    assert types["blk.0.ffn_down.weight"] == weight_type  # 704 = 22 blocks of 32
    emb = model.embed.weight.detach().numpy()
    np.testing.assert_allclose(weight(tensors, "token_embd.weight"), emb, rtol=0, atol=tol * np.abs(emb).max() + 1e-12)


def test_full_precision_refuses_ternary_types(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="ternary"):
        export_gguf(make_model(tokenizer, "fp"), tokenizer, tmp_path / "x.gguf", "TQ2_0")


@pytest.mark.parametrize("weight_type, kv_heads", [("TQ2_0", None), ("TQ1_0", None), ("F16", None), ("TQ2_0", 1)])
def test_ternary_round_trip_is_exact(tmp_path, tokenizer, weight_type, kv_heads):
    model = make_model(tokenizer, "w1.58a8", d_model=768, kv_heads=kv_heads)  # ffn 2048: rows fill TQ blocks of 256
    cfg = model.config
    kv = cfg.kv_heads * cfg.head_dim
    path = tmp_path / f"t-{weight_type}.gguf"
    with pytest.raises(ValueError, match="approximate_norms"):
        export_gguf(model, tokenizer, path, weight_type)
    with pytest.warns(UserWarning, match="folded approximately"):
        types = export_gguf(model, tokenizer, path, weight_type, approximate_norms=True)
    reader, tensors = read(path)
    check_header(reader, tensors, model, tokenizer, "bitnet")
    d, h = cfg.d_model, cfg.ffn_hidden
    for i, block in enumerate(model.blocks):
        layers = {"qkv": block.attn.qkv, "o": block.attn.o, "gate_up": block.mlp.gate_up, "down": block.mlp.down}
        q = {k: layer.quantized_weight() for k, layer in layers.items()}
        wq = {k: (c.float() * s).numpy() for k, (c, s) in q.items()}
        expected = {
            "attn_q": ("qkv", wq["qkv"][:d]), "attn_k": ("qkv", wq["qkv"][d : d + kv]), "attn_v": ("qkv", wq["qkv"][d + kv :]),
            "attn_output": ("o", wq["o"]), "ffn_gate": ("gate_up", wq["gate_up"][:h]),
            "ffn_up": ("gate_up", wq["gate_up"][h:]), "ffn_down": ("down", wq["down"]),
        }  # fmt: skip
        for name, (key, w) in expected.items():
            assert types[f"blk.{i}.{name}.weight"] == weight_type
            codes = weight(tensors, f"blk.{i}.{name}.weight")
            assert set(np.unique(codes)) <= {-1.0, 0.0, 1.0}
            scale = weight(tensors, f"blk.{i}.{name}.scale")
            assert scale.size == 1 and scale.item() == q[key][1].item()  # float32, no fp16 rounding
            np.testing.assert_array_equal(codes * scale.item(), w, err_msg=name)  # exact
        for name, layer in (("attn_sub_norm", block.attn.o), ("ffn_sub_norm", block.mlp.down)):
            np.testing.assert_array_equal(weight(tensors, f"blk.{i}.{name}.weight"), layer.norm.weight.detach().numpy())
        g1, gq = block.attn_norm.weight.detach().numpy(), block.attn.qkv.norm.weight.detach().numpy()
        folded = gq * g1 / np.sqrt(np.mean(g1.astype(np.float64) ** 2))
        np.testing.assert_allclose(weight(tensors, f"blk.{i}.attn_norm.weight"), folded, rtol=1e-6)


def test_ternary_fold_is_exact_for_uniform_block_gain_and_falls_back_for_odd_rows(tmp_path, tokenizer):
    model = make_model(tokenizer, "w1.58a8", d_model=256)  # ffn 704: ffn_down rows are not 256-blocks
    with torch.no_grad():
        for block in model.blocks:
            block.attn_norm.weight.fill_(1.5)
            block.mlp_norm.weight.fill_(0.5)
    types = export_gguf(model, tokenizer, tmp_path / "u.gguf", "TQ2_0")  # no warning, no error
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "TQ2_0"
    _, tensors = read(tmp_path / "u.gguf")
    block = model.blocks[0]
    for name, layer in (("attn_norm", block.attn.qkv), ("ffn_norm", block.mlp.gate_up)):  # uniform gain: exact fold
        np.testing.assert_allclose(weight(tensors, f"blk.0.{name}.weight"), layer.norm.weight.detach().numpy(), rtol=1e-6)
    codes, scale = block.mlp.down.quantized_weight()
    got = weight(tensors, "blk.0.ffn_down.weight") * weight(tensors, "blk.0.ffn_down.scale").item()
    np.testing.assert_array_equal(got, (codes.float() * scale).numpy())


RANDOM = EngineShape(vocab_size=400, n_layer=2, n_head=4, n_kv_head=2, d_model=256, ffn_hidden=512, max_seq_len=32)


def test_random_engine_export_holds_its_codes_and_pads_the_vocabulary(tmp_path, tokenizer):
    engine = DecoderEngine.random(RANDOM, seed=3)
    path = tmp_path / "random-TQ2_0.gguf"
    types = export_random_gguf(engine, tokenizer, path)
    reader, tensors = read(path)
    assert field(reader, "bitnet.attention.head_count_kv") == 2 and field(reader, "bitnet.vocab_size") == 400
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 400 and tokens[319] == tokenizer.id_to_token(319) and tokens[320] == "<|unused_0|>"
    codes = DecoderEngine.layer_codes(RANDOM, 3, 1)
    assert np.array_equal(weight(tensors, "blk.1.attn_k.weight"), codes["qkv"][256:384])
    assert np.array_equal(weight(tensors, "blk.1.ffn_down.weight"), codes["down"])
    assert weight(tensors, "blk.1.ffn_down.scale").item() == engine.scales["down"][1, 0]
    assert set(types.values()) == {"TQ2_0", "F32", "F16"}
    np.testing.assert_allclose(weight(tensors, "token_embd.weight"), engine.embedding(), atol=1e-4)
    with pytest.raises(ValueError, match="DecoderEngine.random"):
        export_random_gguf(DecoderEngine.from_decoder(make_model(tokenizer, "w1.58a8")), tokenizer, path)


def test_llama_cpp_runs_the_grouped_query_export_as_the_engine_does(tmp_path, tokenizer):
    """llama.cpp reads head_count_kv and the k, v rows as the engine does: its logits (Q8_K
    activations, fp16 embedding) stay within 10 % of the largest of the engine's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    engine = DecoderEngine.random(RANDOM, seed=4)
    path = tmp_path / "random-TQ2_0.gguf"
    export_random_gguf(engine, tokenizer, path)
    ids = [0, *tokenizer.encode("the movie was great and the acting").ids]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    ours = engine.forward(np.array(ids), logits="all")
    assert np.abs(theirs - ours).max() <= 0.1 * np.abs(ours).max()


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_llama_cpp_generates(tmp_path, tokenizer, kv_heads):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional: it compiles llama.cpp for minutes)"
    )
    model = make_model(tokenizer, "fp", kv_heads=kv_heads)
    path = tmp_path / "fp-f32.gguf"
    export_gguf(model, tokenizer, path, "F32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    prompt = tokenizer.encode("the movie was").ids
    tokens = [0, *prompt]
    llm.eval(tokens)
    ours = model(torch.tensor([tokens]))[0].detach().numpy()
    theirs = np.asarray(llm.scores[: len(tokens)])
    np.testing.assert_allclose(theirs, ours, atol=1e-3 * np.abs(ours).max())
