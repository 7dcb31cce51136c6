"""Export the chapter 8 decoder (:class:`labutils.lm.model.Decoder`) as a GGUF file for llama.cpp.

``export_gguf(model, tokenizer, path, weight_type)`` writes the model with the PyPI ``gguf``
package (``pip install labutils[deploy]``). Which llama.cpp architecture, and how exact:

**Full precision (``quant="fp"``) -> architecture ``llama``.** Tensors map one to one: the fused
``qkv`` [(H + 2 H_kv) d_h, d] is split into ``attn_q``/``attn_k``/``attn_v`` (rows 0:d, then H_kv d_h
each: grouped-query attention writes ``head_count_kv`` = H_kv, as llama.cpp reads it) and
``gate_up`` [2h, d] into ``ffn_gate``/``ffn_up``; the tied embedding is written once as
``token_embd`` (llama.cpp uses it as the output matrix when ``output.weight`` is absent). The
decoder rotates pairs (i, i + d_h/2) like Hugging Face Llama, while llama.cpp's ``llama``
architecture rotates adjacent pairs (rope type NORM), so q and k rows are permuted within each
head exactly as llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) does; since q and k
get the same permutation, q·k is unchanged. ``weight_type`` F32 is exact, F16 and Q8_0 round
(Q8_0: blocks of 32 along a row, one fp16 scale = absmax/127 each).

**Ternary (``quant="w1.58a8"``) -> architecture ``bitnet``.** llama.cpp's ``llama`` graph has no
place for BitNet's SubLN (the RMSNorm each BitLinear applies to its input), so that model cannot
be exported exactly as ``llama``; llama.cpp's ``bitnet`` graph (src/models/bitnet.cpp) has it:

- ``attn_sub_norm`` before ``attn_output`` = the ``o`` BitLinear's norm (exact);
- ``ffn_sub_norm`` between ``silu(gate) * up`` and ``ffn_down`` = the ``down`` BitLinear's norm
  (exact; ``bitnet`` defaults to SiLU, as here);
- rope type NEOX (pairs offset by d_h/2, the decoder's own convention: no permutation);
- optional per-tensor ``*.scale`` tensors ({1}, F32) that multiply a projection's output.

Weights are written as the ternary *codes* {-1, 0, +1} (q, k, v share the qkv layer's scale,
gate and up the gate_up layer's) with the per-tensor absmean scale in the ``.scale`` tensor, in
float32. TQ2_0 / TQ1_0 store blocks of 256 weights with one fp16 scale d = max|w| of the block:
for codes, d = 1 (exactly representable) in every block with a nonzero code and 0 for an
all-zero block, so the exported weight equals codes * scale **exactly** (no fp16 rounding of
BitNet's scale, which lives in float32 in the ``.scale`` tensor). That is where GGUF's per-block
absmax scale and BitNet's per-tensor absmean scale meet: the block absmax of the dequantized
ternary weight is the tensor's scale itself, so baking codes * scale into TQ would also be exact
up to the fp16 rounding of the scale; the separate scale tensor removes even that. (Per-row
scales, ``per_channel=True``, have no scale tensor in llama.cpp: they are baked into the weights,
exact up to fp16 rounding of each row's scale.)

One thing is *not* exact: the decoder's qkv and gate_up BitLinears normalize an input that the
block's ``attn_norm`` / ``mlp_norm`` has already normalized, ``rms(g_q * rms(x))`` with two gains,
while ``bitnet`` has a single ``attn_norm`` / ``ffn_norm`` there. With ``n = x / rms(x)``::

    RMSNorm_q(g_1 * n) = g_q * g_1 * n / rms(g_1 * n)

which equals one RMSNorm with gain ``g_q * g_1 / rms(g_1)`` exactly when the block gain g_1 is
uniform (then ``rms(g_1 * n) = |c| rms(n)``; up to the eps terms), and approximately otherwise
(``rms(g_1 * n) ≈ rms(g_1)`` when n² is uncorrelated with g_1²). The exporter folds the two
gains that way; it raises ``ValueError`` for a non-uniform block gain unless
``approximate_norms=True`` (a trained model needs it; measure the logit difference).

Also outside the file: llama.cpp multiplies TQ1_0/TQ2_0 weights with activations quantized to
Q8_K (8 bits, one scale per block of 256 values), not BitNet's one absmax scale per token, so
its logits differ from the book's W1.58A8 path by that activation rounding even for an exact file.

Row lengths (``in_features``) that are not a multiple of the type's block (256 for TQ, 32 for
Q8_0) cannot use it: such a tensor falls back to F16 (ternary codes stay exact in F16) or F32,
and :func:`export_gguf` returns which type each tensor got.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = ["WEIGHT_TYPES", "TERNARY_TYPES", "export_gguf", "export_random_gguf", "permute_rope_rows"]

WEIGHT_TYPES = ("F32", "F16", "Q8_0", "TQ2_0", "TQ1_0")
TERNARY_TYPES = ("TQ2_0", "TQ1_0")


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q or k projection [n_head * d_h, d] from rotary pairs (i, i + d_h/2) to llama.cpp's
    adjacent pairs (2i, 2i + 1), as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf():
    try:
        import gguf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("export_gguf needs the `gguf` package: pip install 'labutils[deploy]'") from error
    return gguf


def _qtype(gguf, name: str):
    return getattr(gguf.GGMLQuantizationType, name)


def _fit_type(gguf, wanted: str, row_len: int, ternary_codes: bool) -> str:
    """``wanted`` if rows of ``row_len`` fill whole blocks of it, else the closest that does."""
    block = gguf.GGML_QUANT_SIZES[_qtype(gguf, wanted)][0]
    if row_len % block == 0:
        return wanted
    if wanted in TERNARY_TYPES or ternary_codes:
        return "F16"  # codes are exact in F16; Q8_0 would round 1 to 127 * fp16(1/127)
    q8_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if wanted == "Q8_0" and row_len % q8_block:
        return "F16"
    return wanted


def _add(writer, gguf, name: str, array: np.ndarray, type_name: str, types: dict) -> None:
    array = np.ascontiguousarray(array, dtype=np.float32)
    if type_name == "F32":
        writer.add_tensor(name, array)
    elif type_name == "F16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qtype = _qtype(gguf, type_name)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    types[name] = type_name


def _tokenizer_fields(tokenizer, vocab_size: int | None = None) -> tuple[list[str], list[int], list[str], int]:
    """tokens by id, token types, merges ("a b"), and the end-of-text id of a ``tokenizers`` BPE;
    ``vocab_size`` larger than the tokenizer's: padded with unused control tokens ``<|unused_i|>``
    (a benchmark model shaped like a larger vocabulary, ids the tokenizer never emits)."""
    from labutils.lm.tokenizer import EOS, SPECIAL_TOKENS

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for token, i in vocab.items():
        tokens[i] = token
    if any(t == "" for t in tokens):
        raise ValueError("the tokenizer's ids are not contiguous")
    specials = set(SPECIAL_TOKENS) | {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    types = [3 if t in specials else 1 for t in tokens]  # gguf.TokenType.CONTROL / NORMAL
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers export as gpt2, got {model.get('type')!r}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    extra = max(0, (vocab_size or n) - n)
    tokens += [f"<|unused_{i}|>" for i in range(extra)]
    types += [3] * extra
    return tokens, types, merges, tokenizer.token_to_id(EOS)


def export_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    weight_type: str = "F16",
    *,
    embed_type: str | None = None,
    approximate_norms: bool = False,
    name: str = "labutils-decoder",
) -> dict[str, str]:
    """Write ``model`` (a :class:`labutils.lm.model.Decoder`) and ``tokenizer`` to the GGUF ``path``.

    Args:
        weight_type: the projections' type, one of :data:`WEIGHT_TYPES`; TQ2_0 / TQ1_0 only for
            the ternary model (``quant="w1.58a8"``).
        embed_type: the tied embedding's type (default: F32 for F32, Q8_0 for Q8_0, else F16).
        approximate_norms: ternary model only: fold the block norm into the BitLinear norm even
            when the block gain is not uniform (see the module docstring); else that raises.
        name: ``general.name``.

    Returns:
        {tensor name: type written}, with the fallbacks where a row length did not fit a block.
    """
    gguf = _gguf()
    from labutils.bitlinear import BitLinear

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    cfg = model.config
    ternary = cfg.quant == "w1.58a8"
    if weight_type in TERNARY_TYPES and not ternary:
        raise ValueError(f"{weight_type} holds ternary weights only; export the w1.58a8 model, or use F16/Q8_0")
    if embed_type is None:
        embed_type = {"F32": "F32", "Q8_0": "Q8_0"}.get(weight_type, "F16")
    if embed_type not in ("F32", "F16", "Q8_0"):
        raise ValueError(f"embed_type must be F32, F16 or Q8_0, got {embed_type!r}")

    d, h, n_head, n_kv = cfg.d_model, cfg.ffn_hidden, cfg.n_head, getattr(cfg, "kv_heads", cfg.n_head)
    writer = _writer(gguf, path, "bitnet" if ternary else "llama", tokenizer, weight_type, name=name,
                     n_layer=cfg.n_layer, d_model=d, ffn_hidden=h, n_head=n_head, n_kv_head=n_kv,
                     max_seq_len=cfg.max_seq_len, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                     vocab_size=cfg.vocab_size, pad_vocab=False)  # fmt: skip

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    types: dict[str, str] = {}
    _add(writer, gguf, "token_embd.weight", f32(model.embed.weight), _fit_type(gguf, embed_type, d, False), types)
    _add(writer, gguf, "output_norm.weight", f32(model.norm.weight), "F32", types)

    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        layers = {"qkv": block.attn.qkv, "o": block.attn.o, "gate_up": block.mlp.gate_up, "down": block.mlp.down}
        if ternary != all(isinstance(layer, BitLinear) for layer in layers.values()):
            raise ValueError(f"block {i}: expected {'only BitLinear' if ternary else 'no BitLinear'} projections")
        weights, scales = {}, {}
        for key, layer in layers.items():
            if ternary:
                codes, scale = layer.quantized_weight()
                codes = f32(codes)
                scale = f32(scale)
                if scale.size == 1:
                    weights[key], scales[key] = codes, np.float32(scale.reshape(()))
                else:  # per-row scales: no llama.cpp tensor for them, bake them in
                    weights[key], scales[key] = codes * scale.reshape(-1, 1), None
            else:
                weights[key], scales[key] = f32(layer.weight), None
        q, k, v = np.split(weights["qkv"], [d, d + n_kv * cfg.head_dim], axis=0)  # GQA: k, v have n_kv heads
        gate, up = np.split(weights["gate_up"], 2, axis=0)
        if not ternary:  # HF pairs (i, i + d_h/2) -> llama.cpp's adjacent pairs
            q, k = permute_rope_rows(q, n_head), permute_rope_rows(k, n_kv)
        projections = [
            ("attn_q", q, "qkv"), ("attn_k", k, "qkv"), ("attn_v", v, "qkv"), ("attn_output", weights["o"], "o"),
            ("ffn_gate", gate, "gate_up"), ("ffn_up", up, "gate_up"), ("ffn_down", weights["down"], "down"),
        ]  # fmt: skip
        for tname, w, key in projections:
            codes_only = scales[key] is not None
            _add(writer, gguf, p + tname + ".weight", w, _fit_type(gguf, weight_type, w.shape[1], codes_only), types)
            if codes_only:
                _add(writer, gguf, p + tname + ".scale", np.array([scales[key]], np.float32), "F32", types)

        g_attn, g_mlp = f32(block.attn_norm.weight), f32(block.mlp_norm.weight)
        if ternary:
            norms = {key: layer.norm for key, layer in layers.items()}
            if any(not isinstance(n, torch.nn.RMSNorm) for n in norms.values()):
                raise ValueError(f"block {i}: llama.cpp's bitnet graph needs BitLinear norm='rms' on every projection")
            g_attn = fold_norm_gains(g_attn, f32(norms["qkv"].weight), approximate_norms, f"blk.{i}.attn_norm")
            g_mlp = fold_norm_gains(g_mlp, f32(norms["gate_up"].weight), approximate_norms, f"blk.{i}.ffn_norm")
            _add(writer, gguf, p + "attn_sub_norm.weight", f32(norms["o"].weight), "F32", types)
            _add(writer, gguf, p + "ffn_sub_norm.weight", f32(norms["down"].weight), "F32", types)
        _add(writer, gguf, p + "attn_norm.weight", g_attn, "F32", types)
        _add(writer, gguf, p + "ffn_norm.weight", g_mlp, "F32", types)

    _close(writer, path)
    return types


def _writer(gguf, path, arch: str, tokenizer, weight_type: str, *, name: str, n_layer: int, d_model: int,
            ffn_hidden: int, n_head: int, n_kv_head: int, max_seq_len: int, rope_theta: float, norm_eps: float,
            vocab_size: int, pad_vocab: bool):  # fmt: skip
    """A GGUFWriter with the model's hyperparameters and the tokenizer written (the tensors follow)."""
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_name(name)
    writer.add_context_length(max_seq_len)
    writer.add_embedding_length(d_model)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(ffn_hidden)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv_head)
    writer.add_rope_dimension_count(d_model // n_head)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if weight_type == "F32" else f"MOSTLY_{weight_type}"))

    tokens, token_types, merges, eos = _tokenizer_fields(tokenizer, vocab_size if pad_vocab else None)
    if len(tokens) != vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, the model {vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)  # the book starts every prompt with <|endoftext|>
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    return writer


def _close(writer, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_random_gguf(engine, tokenizer, path: str | os.PathLike, weight_type: str = "TQ2_0", *,
                       embed_type: str = "F16", name: str = "labutils-random-ternary") -> dict[str, str]:  # fmt: skip
    """Write a random ternary engine (:meth:`labutils.engine.DecoderEngine.random`) as a ``bitnet``
    GGUF holding the same model: the codes regenerated layer by layer from the engine's seed
    (``layer_codes``), its per-tensor scales, unit norm gains, its embedding (as ``embed_type``).
    The tokenizer's tokens are padded with unused control tokens up to the engine's vocabulary.
    Returns {tensor name: type written}. Only the projections of one layer are in memory at once
    beyond what the writer keeps (the written file's tensors)."""
    gguf = _gguf()
    from labutils.engine.decoder import DecoderEngine

    if weight_type not in TERNARY_TYPES + ("F16",):
        raise ValueError(f"weight_type must be one of {TERNARY_TYPES + ('F16',)}, got {weight_type!r}")
    seed = getattr(engine, "random_seed", None)
    if seed is None:
        raise ValueError("export_random_gguf takes an engine built by DecoderEngine.random (its codes come from its seed)")
    s = engine.shape
    writer = _writer(gguf, path, "bitnet", tokenizer, weight_type, name=name, n_layer=s.n_layer, d_model=s.d_model,
                     ffn_hidden=s.ffn_hidden, n_head=s.n_head, n_kv_head=s.n_kv_head, max_seq_len=s.max_seq_len,
                     rope_theta=s.rope_theta, norm_eps=s.norm_eps, vocab_size=s.vocab_size, pad_vocab=True)  # fmt: skip
    types: dict[str, str] = {}
    _add(writer, gguf, "token_embd.weight", engine.embedding(), _fit_type(gguf, embed_type, s.d_model, False), types)
    _add(writer, gguf, "output_norm.weight", engine.final_gain, "F32", types)
    q_rows, kv_rows = s.d_model, s.n_kv_head * s.head_dim
    for i in range(s.n_layer):
        p = f"blk.{i}."
        codes = DecoderEngine.layer_codes(s, seed, i)
        q, k, v = np.split(codes["qkv"], [q_rows, q_rows + kv_rows], axis=0)
        gate, up = np.split(codes["gate_up"], 2, axis=0)
        projections = [("attn_q", q, "qkv"), ("attn_k", k, "qkv"), ("attn_v", v, "qkv"), ("attn_output", codes["o"], "o"),
                       ("ffn_gate", gate, "gate_up"), ("ffn_up", up, "gate_up"), ("ffn_down", codes["down"], "down")]  # fmt: skip
        for tname, w, key in projections:
            _add(writer, gguf, p + tname + ".weight", w, _fit_type(gguf, weight_type, w.shape[1], True), types)
            scale = engine.scales[key][i]
            if not np.all(scale == scale[0]):
                raise ValueError(f"{p}{key}: llama.cpp's .scale tensor holds one scale, the engine has per-row scales")
            _add(writer, gguf, p + tname + ".scale", scale[:1], "F32", types)
        g = engine.gains
        _add(writer, gguf, p + "attn_norm.weight", fold_norm_gains(g["attn"][i], g["qkv"][i], False, f"{p}attn_norm"), "F32", types)
        _add(writer, gguf, p + "ffn_norm.weight", fold_norm_gains(g["mlp"][i], g["gate_up"][i], False, f"{p}ffn_norm"), "F32", types)
        _add(writer, gguf, p + "attn_sub_norm.weight", g["o"][i], "F32", types)
        _add(writer, gguf, p + "ffn_sub_norm.weight", g["down"][i], "F32", types)
    _close(writer, path)
    return types


def fold_norm_gains(g_block: np.ndarray, g_layer: np.ndarray, approximate: bool, where: str) -> np.ndarray:
    """One RMSNorm gain for RMSNorm_layer(RMSNorm_block(x)): ``g_layer * g_block / rms(g_block)``
    (float32 ``[dim]`` from two ``[dim]`` gains); exact only for a uniform ``g_block``: else
    ValueError naming ``where``, or a warning and the approximate fold if ``approximate``."""
    rms = float(np.sqrt(np.mean(g_block.astype(np.float64) ** 2)))
    if rms == 0:
        raise ValueError(f"{where}: the block norm's gain is all zeros")
    spread = float(np.max(np.abs(g_block - g_block.mean())))
    if spread > 1e-6 * max(1.0, abs(float(g_block.mean()))):
        message = (
            f"{where}: the block RMSNorm gain is not uniform (spread {spread:.3g}), so the block norm and the "
            "BitLinear norm do not fold into llama.cpp's single bitnet norm exactly"
        )
        if not approximate:
            raise ValueError(message + "; pass approximate_norms=True to fold them as g_layer * g_block / rms(g_block)")
        warnings.warn(message + "; folded approximately", stacklevel=3)
    return (g_layer * g_block / rms).astype(np.float32)
