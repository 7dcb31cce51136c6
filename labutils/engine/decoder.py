"""The decode engine: a packed ternary decoder's whole forward pass as one compiled call.

``DecoderEngine.from_decoder(model)`` copies what a W1.58A8 :class:`labutils.lm.model.Decoder`
(BitLinear or packed, :func:`labutils.kernels.pack_model`) computes with into flat arrays:

- per projection kind (qkv, o, gate_up, down) the prepacked ternary tiles of every layer stacked
  ``uint8 [n_layer, T, G, 4, 64]``, their scales ``float32 [n_layer, N]`` and the gains of the
  BitLinear norms ``float32 [n_layer, K]``; the block norms' gains ``[n_layer, d]``;
- the tied embedding ``[vocab, d]`` (the head computes ``x @ embed.T`` row by row, streaming
  the table once per token; a lookup reads one row), float32, bfloat16
  (``embedding="bfloat16"``: half the bytes the head reads per token, as llama.cpp's F16 output
  matrix) or int8 codes with one scale a row (``embedding="int8"``: a quarter, about as
  llama.cpp's Q8_0 output; the row's scale multiplies its looked-up row and its logit), the
  final norm's gain, the rotary tables;
- the KV cache ``[n_layer, n_kv_head, max_len, head_dim]`` (K and V), float32 or bfloat16
  (``kv_cache="bfloat16"``: half the bytes attention reads per token, as llama.cpp's default
  fp16 cache; at batch 1 attention streams the whole cache once a token), and every scratch
  buffer a pass needs, for up to ``max_seq_len`` tokens at once, allocated once.

:meth:`DecoderEngine.forward` then runs M tokens (a prompt, or one generated token) through
every block and the head in **one** call into compiled code (``_forward``): per block RMSNorm,
per-token int8 quantization, the ternary GEMM/GEMV of chapter 6 (the kernel of the active path,
``labutils.kernels.use`` and ``LABBOOK_KERNEL_PATH`` choose it), rotary positions, attention
over the cache, SwiGLU and residual adds, with no torch, no Python and no allocation between
them: the only thread pool that runs is Numba's, entered once per kernel (and per attention).
What this removes, measured, is in ``results/engine/overhead.md`` and chapter 8.6.

A generated token reads every weight once, at about the machine's read rate, so its time is
the weights' bytes. ``gemv="lut"`` keeps a second copy of the projections as table indices
(:mod:`labutils.kernels.lut`: 1.67 bits a weight where the tiles spend 2) and runs one-token
steps on it; prompts (many tokens, where arithmetic is the bound) keep the tiled GEMM. The
int32 dot products are the same, so the logits are too.

The arithmetic is the packed layer's, in the same order where it decides an integer: the same
int8 codes (exactly, given the same normalized input), exact int32 dot products, the same
``dot * x_scale * w_scale`` rescale. Norms, softmax, SiLU and the float head sum in another
order than torch, so logits match the torch decoder to float rounding (tests: token for token).

:func:`engine_for` builds (once per model, cached) the engine ``lm.model.generate`` uses for a
packed decoder; :meth:`DecoderEngine.random` builds one with random ternary weights of any shape
(the BitNet b1.58 2B-4T-shaped benchmark model) without a torch model in memory.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from labutils.engine.ops import (
    add_,
    attend_cached,
    float_matmul_for,
    from_bfloat16,
    narrow_like,
    padded_width,
    quantize_absmax,
    rmsnorm,
    rope,
    swiglu,
    ternary_gemv_lut,
    ternary_matmul,
    to_bfloat16,
    widen,
)
from labutils.kernels.lut import LutWeights, build_tables, lut_kernel_for, pack_lut

__all__ = ["EMBEDDINGS", "GEMVS", "KV_CACHES", "EngineShape", "DecoderEngine", "engine_for", "is_packed_decoder", "quantize_table_int8"]

_JIT = {"cache": True, "boundscheck": False, "error_model": "numpy"}
# Functions that take the kernels as arguments are not cached on disk: Numba keys its cache by
# the argument types, and a dispatcher's type is the dispatcher object of this process (a cache
# lookup in another process fails, measured: KeyError then "underlying object has vanished").
_JIT_KERNEL_ARGS = {**_JIT, "cache": False}
PARALLEL_MIN_MACS = 1 << 20
"""From this many multiply-adds a projection runs on the parallel kernel (2-core crossover)."""
PROJECTIONS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class EngineShape:
    """The decoder's shape as the engine needs it (``LMConfig``'s fields, GQA included)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    ffn_hidden: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    act_eps: float = 1e-5
    act_bits: int = 8

    def __post_init__(self) -> None:
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if not 2 <= self.act_bits <= 8:
            raise ValueError(f"act_bits must be in [2, 8], got {self.act_bits}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def widths(self) -> dict[str, tuple[int, int]]:
        """(out, in) features of each projection kind."""
        d, h, hd = self.d_model, self.ffn_hidden, self.head_dim
        return {"qkv": ((self.n_head + 2 * self.n_kv_head) * hd, d), "o": (d, d), "gate_up": (2 * h, d), "down": (d, h)}

    @classmethod
    def of(cls, config: Any, act_eps: float = 1e-5, act_bits: int = 8) -> EngineShape:
        """From an ``LMConfig`` (``n_kv_heads`` None or absent: as many as ``n_head``)."""
        return cls(vocab_size=config.vocab_size, n_layer=config.n_layer, n_head=config.n_head,
                   n_kv_head=getattr(config, "n_kv_heads", None) or config.n_head, d_model=config.d_model,
                   ffn_hidden=config.ffn_hidden, max_seq_len=config.max_seq_len, rope_theta=config.rope_theta,
                   norm_eps=config.norm_eps, act_eps=act_eps, act_bits=act_bits)  # fmt: skip


@njit(**_JIT_KERNEL_ARGS)
def _project(par, ser, lut, h, m, codes, xs, rowsum, dots, w, ws, out, qp, eps, min_macs, lw, lneg, tables):  # pragma: no cover - compiled
    """out[:m] = BitLinear(h[:m]) for an already normalized h: quantize, kernel, rescale. One
    token runs the lookup kernel on ``lw`` / ``lneg`` (LutWeights) when the engine holds them."""
    quantize_absmax(h, m, qp, eps, codes, xs, rowsum)
    if m == 1 and lw.shape[0] > 0:
        ternary_gemv_lut(lut, codes, tables, lw, lneg, dots[0], xs, ws, out)
    else:
        ternary_matmul(par, ser, codes, m, w, rowsum, dots, xs, ws, out, min_macs)


@njit(**_JIT_KERNEL_ARGS)
def _forward(par, ser, lut, head, tokens, m, pos0, first_logit,
             g_attn, g_qkv, w_qkv, s_qkv, g_o, w_o, s_o, g_mlp, g_gu, w_gu, s_gu, g_down, w_down, s_down, g_final,
             l_qkv, n_qkv, l_o, n_o, l_gu, n_gu, l_down, n_down, tables,
             embed, embed_scale, cos, sin, k_cache, v_cache, n_head, n_kv, head_dim, hidden, norm_eps, act_eps, qp, min_macs,
             x, h, codes_d, codes_h, xs, rowsum, dots, qkv, att, gu, act, proj, scores, logits):  # pragma: no cover - compiled  # fmt: skip
    """Tokens [m] at positions pos0.. through every block; logits of rows first_logit..m-1 into
    logits[:m - first_logit]. Every array is preallocated (see DecoderEngine); ``embed_scale``
    holds an int8 table's row scales, and is empty for a float table; ``l_*`` / ``n_*`` the
    projections as LutWeights (data, neg_count; [L, 0, ...] when the engine holds none)."""
    d = x.shape[1]
    for r in range(m):  # embedding: one row of the table (times its scale: 1, exactly, for a float table)
        row = embed[tokens[r]]
        s = embed_scale[tokens[r]] if embed_scale.shape[0] > 0 else np.float32(1.0)
        for j in range(d):
            x[r, j] = widen(row[j]) * s
    q_width, kv_width = n_head * head_dim, n_kv * head_dim
    for layer in range(w_qkv.shape[0]):
        # attention: x += o(attn(rope(q), rope(k), v)), qkv = BitLinear(RMSNorm(x))
        rmsnorm(x, m, g_attn[layer], norm_eps, h)
        rmsnorm(h, m, g_qkv[layer], act_eps, h)
        _project(par, ser, lut, h, m, codes_d, xs, rowsum, dots, w_qkv[layer], s_qkv[layer], qkv, qp, act_eps, min_macs,
                 l_qkv[layer], n_qkv[layer], tables)
        rope(qkv, m, 0, n_head, head_dim, cos, sin, pos0)
        rope(qkv, m, q_width, n_kv, head_dim, cos, sin, pos0)
        kc, vc = k_cache[layer], v_cache[layer]
        for r in range(m):
            for hh in range(n_kv):
                for i in range(head_dim):
                    kc[hh, pos0 + r, i] = narrow_like(qkv[r, q_width + hh * head_dim + i], kc)
                    vc[hh, pos0 + r, i] = narrow_like(qkv[r, q_width + kv_width + hh * head_dim + i], vc)
        attend_cached(qkv, m, n_head, n_kv, head_dim, kc, vc, pos0, scores, att)
        rmsnorm(att, m, g_o[layer], act_eps, att)
        _project(par, ser, lut, att, m, codes_d, xs, rowsum, dots, w_o[layer], s_o[layer], proj, qp, act_eps, min_macs,
                 l_o[layer], n_o[layer], tables)
        add_(x, m, proj)
        # MLP: x += down(silu(gate) * up), gate, up = BitLinear(RMSNorm(x))
        rmsnorm(x, m, g_mlp[layer], norm_eps, h)
        rmsnorm(h, m, g_gu[layer], act_eps, h)
        _project(par, ser, lut, h, m, codes_d, xs, rowsum, dots, w_gu[layer], s_gu[layer], gu, qp, act_eps, min_macs,
                 l_gu[layer], n_gu[layer], tables)
        swiglu(gu, m, hidden, act)
        rmsnorm(act, m, g_down[layer], act_eps, act)
        _project(par, ser, lut, act, m, codes_h, xs, rowsum, dots, w_down[layer], s_down[layer], proj, qp, act_eps,
                 min_macs, l_down[layer], n_down[layer], tables)
        add_(x, m, proj)
    rows = m - first_logit
    for r in range(rows):
        for j in range(d):
            h[r, j] = x[first_logit + r, j]
    rmsnorm(h, rows, g_final, norm_eps, h)
    head(h, rows, embed, logits)
    scale_columns(logits, rows, embed_scale)


@njit(**_JIT)
def scale_columns(logits, rows, scale):  # pragma: no cover - compiled
    """logits[:rows, v] *= scale[v] (an int8 head's row scales, applied once to each dot
    product); nothing for an empty ``scale`` (a float head)."""
    if scale.shape[0] == 0:
        return
    for r in range(rows):
        for v in range(logits.shape[1]):
            logits[r, v] *= scale[v]


@njit(**_JIT_KERNEL_ARGS)
def _kernels_only(par, ser, m, w_qkv, w_o, w_gu, w_down, codes_d, codes_h, rowsum, dots, min_macs):  # pragma: no cover - compiled
    """Every ternary kernel call of a forward pass of m tokens, nothing else (same shapes,
    same parallel/serial choice, codes left as they are): the integer share of a step."""
    n_qkv, n_o, n_gu, n_down = 64 * w_qkv.shape[1], 64 * w_o.shape[1], 64 * w_gu.shape[1], 64 * w_down.shape[1]
    for layer in range(w_qkv.shape[0]):
        for w, codes, n in ((w_qkv[layer], codes_d, n_qkv), (w_o[layer], codes_d, n_o), (w_gu[layer], codes_d, n_gu)):
            if m * n * codes.shape[1] >= min_macs:
                par(codes[:m], w, rowsum[:m], dots[:m])
            else:
                ser(codes[:m], w, rowsum[:m], dots[:m])
        if m * n_down * codes_h.shape[1] >= min_macs:
            par(codes_h[:m], w_down[layer], rowsum[:m], dots[:m])
        else:
            ser(codes_h[:m], w_down[layer], rowsum[:m], dots[:m])


@njit(**_JIT_KERNEL_ARGS)
def _lut_kernels_only(lut, l_qkv, n_qkv, l_o, n_o, l_gu, n_gu, l_down, n_down, codes_d, codes_h, tables, dots):  # pragma: no cover - compiled
    """Every lookup-kernel call of one generated token (its tables included), nothing else."""
    for layer in range(l_qkv.shape[0]):
        for data, neg, codes in ((l_qkv[layer], n_qkv[layer], codes_d), (l_o[layer], n_o[layer], codes_d),
                                 (l_gu[layer], n_gu[layer], codes_d), (l_down[layer], n_down[layer], codes_h)):  # fmt: skip
            t = tables[: data.shape[1] * 8]
            build_tables(codes[0], t)
            lut(t, data, neg, dots[0])


GEMVS = ("auto", "tiles", "lut")
"""How the engine runs one token's projections: "tiles" (the GEMM's 2-bit tiles), "lut" (a
second copy of the weights as table indices, 1.67 bits a weight: fewer bytes a token), or
"auto": "lut" where the kernel path in force at build time is "avx2", else "tiles": on the
avx512 path the VNNI tiles keep up with the lookups (a 700m step 0.97-0.98x as fast on table
indices on a 2-vCPU Xeon, ``results/engine/lut-ab-xeon.jsonl``) and hold one copy of the weights,
and the generic path's lookups are plain loops, slower than its GEMV."""
EMBEDDINGS = ("float32", "bfloat16", "int8")
KV_CACHES = ("float32", "bfloat16")
_CACHE_DTYPES = {"float32": np.float32, "bfloat16": np.uint16}  # bfloat16 held as its 16 bits


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")


def _resolve_gemv(gemv: str) -> str:
    if gemv not in GEMVS:
        raise ValueError(f"gemv must be one of {GEMVS}, got {gemv!r}")
    if gemv == "auto":  # the kernel path in force (LABBOOK_KERNEL_PATH, kernels.use), as forward's kernels
        from labutils.kernels import active_path

        return "lut" if active_path() == "avx2" else "tiles"
    return gemv


def _lut_stack(per_layer: list[LutWeights]) -> tuple[np.ndarray, np.ndarray]:
    return _stack([w.data for w in per_layer]), _stack([w.neg_count for w in per_layer])


def _no_lut(n_layer: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n_layer, 0, 1, 5, 32), np.uint8), np.zeros((n_layer, 0), np.int32)


def _check_kv_cache(kv_cache: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")


def quantize_table_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [vocab, d] -> (int8 codes [vocab, d], float32 scales [vocab]): per-row absmax,
    ``scale = max|row| / 127``, ``codes = rint(row / scale)``; a row of zeros gets scale 1.
    ``codes * scale[:, None]`` is the table the engine then computes with."""
    table = np.asarray(table, dtype=np.float32)
    scale = np.abs(table).max(axis=1) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


_NO_SCALE = np.zeros(0, np.float32)  # a float table's (empty) row scales


def _table(embed: np.ndarray, embedding: str) -> tuple[np.ndarray, np.ndarray]:
    """The table as ``embedding`` holds it and its row scales (empty unless int8)."""
    if embedding == "int8":
        return quantize_table_int8(embed)
    return (to_bfloat16(embed) if embedding == "bfloat16" else embed), _NO_SCALE


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.stack(arrays))


class DecoderEngine:
    """A packed ternary decoder compiled into one call per forward pass (batch 1).

    ``forward(tokens)`` continues the cached positions (``length``) by ``tokens`` (int ids) and
    returns float32 logits, ``[vocab]`` for the last token (``logits="last"``) or ``[T, vocab]``
    (``"all"``); ``reset()`` empties the cache. Not thread-safe (one set of buffers).
    """

    def __init__(self, shape: EngineShape, weights: dict[str, np.ndarray], scales: dict[str, np.ndarray],
                 gains: dict[str, np.ndarray], embed: np.ndarray, final_gain: np.ndarray,
                 kv_cache: str = "float32", embed_scale: np.ndarray | None = None,
                 lut: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:  # fmt: skip
        """Args (``L`` = n_layer; see the module docstring for the layouts):
        shape: the decoder's EngineShape.
        weights: {projection: uint8 [L, T, G, 4, 64]} prepacked W1.58A8 tiles of every layer.
        scales: {projection: float32 [L, N]} per-output weight scales.
        gains: float32 gains {"attn", "mlp": [L, d] block norms; "qkv", "o", "gate_up", "down":
            [L, K] the BitLinear norms}.
        embed: [vocab, d], the tied embedding (and head): float32, bfloat16 held as uint16
            (``labutils.engine.ops.to_bfloat16``), or int8 codes with ``embed_scale``.
            final_gain: float32 [d].
        kv_cache: "float32" (the torch decoder's values, the default) or "bfloat16" (K and V
            rounded to nearest as they are written: half the bytes).
        embed_scale: float32 [vocab], the row scales of an int8 ``embed``
            (:func:`quantize_table_int8`); only with one.
        lut: {projection: (data uint8 [L, T, O, 5, 32], neg_count int32 [L, 32T])}, every
            layer's :class:`labutils.kernels.lut.LutWeights` of the same codes as ``weights``
            (:meth:`lut_of`), or None: one generated token then runs the lookup kernel on them.
        """
        _check_kv_cache(kv_cache)
        widths = shape.widths()
        for name, (n, k) in widths.items():
            w = weights[name]
            tiles, groups = -(-n // 64), padded_width(k) // 16
            if w.dtype != np.uint8 or w.shape != (shape.n_layer, tiles, groups, 4, 64) or not w.flags.c_contiguous:
                raise ValueError(f"{name} weights must be C-contiguous uint8 {(shape.n_layer, tiles, groups, 4, 64)}, "
                                 f"got {w.dtype} {w.shape}")  # fmt: skip
            if scales[name].shape != (shape.n_layer, n) or gains[name].shape != (shape.n_layer, k):
                raise ValueError(f"{name}: scales must be [L, {n}] and gains [L, {k}], got {scales[name].shape}, {gains[name].shape}")
        if embed.shape != (shape.vocab_size, shape.d_model) or final_gain.shape != (shape.d_model,):
            raise ValueError(f"embed must be [{shape.vocab_size}, {shape.d_model}], final_gain [{shape.d_model}]")
        if (embed.dtype == np.int8) != (embed_scale is not None and len(embed_scale) > 0):
            raise ValueError("an int8 embed needs its row scales (embed_scale), and only an int8 embed takes them")
        if embed.dtype == np.int8 and np.shape(embed_scale) != (shape.vocab_size,):
            raise ValueError(f"embed_scale must be [{shape.vocab_size}], got {np.shape(embed_scale)}")
        for name, (n, k) in widths.items() if lut is not None else ():
            data, neg = lut[name]
            expect = (shape.n_layer, -(-n // 32), -(-k // 24), 5, 32)
            if data.dtype != np.uint8 or data.shape != expect or neg.shape != (shape.n_layer, 32 * expect[1]):
                raise ValueError(f"{name} lookup weights must be uint8 {expect} and int32 [L, {32 * expect[1]}], "
                                 f"got {data.dtype} {data.shape}, {neg.shape}")  # fmt: skip
        self.shape = shape
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        self.weights = weights
        self.lut = {name: (np.ascontiguousarray(d), np.ascontiguousarray(c, dtype=np.int32)) for name, (d, c) in lut.items()} \
            if lut is not None else {name: _no_lut(shape.n_layer) for name in PROJECTIONS}  # fmt: skip
        self.scales = {k: f32(v) for k, v in scales.items()}
        self.gains = {k: f32(v) for k, v in gains.items()}
        self.embed = np.ascontiguousarray(embed) if embed.dtype in (np.uint16, np.int8) else f32(embed)
        self.embed_scale = _NO_SCALE if embed_scale is None or len(embed_scale) == 0 else f32(embed_scale)
        self.final_gain = f32(final_gain)
        hd, t = shape.head_dim, shape.max_seq_len
        angles = np.outer(np.arange(t, dtype=np.float64),
                          1.0 / shape.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))  # fmt: skip
        angles = np.concatenate([angles, angles], axis=1)
        self.cos, self.sin = f32(np.cos(angles)), f32(np.sin(angles))
        cache = (shape.n_layer, shape.n_kv_head, t, hd)
        dtype = _CACHE_DTYPES[kv_cache]
        self.k_cache, self.v_cache = np.zeros(cache, dtype), np.zeros(cache, dtype)
        d, hidden = shape.d_model, shape.ffn_hidden
        self._buffers = {
            "x": np.zeros((t, d), np.float32), "h": np.zeros((t, d), np.float32),
            "codes_d": np.zeros((t, padded_width(d)), np.int8), "codes_h": np.zeros((t, padded_width(hidden)), np.int8),
            "xs": np.zeros(t, np.float32), "rowsum": np.zeros(t, np.int32),
            "dots": np.zeros((t, 64 * -(-max(n for n, _ in widths.values()) // 64)), np.int32),
            "qkv": np.zeros((t, widths["qkv"][0]), np.float32), "att": np.zeros((t, d), np.float32),
            "gu": np.zeros((t, 2 * hidden), np.float32), "act": np.zeros((t, hidden), np.float32),
            "proj": np.zeros((t, d), np.float32), "scores": np.zeros((shape.n_head * t, t), np.float32),
        }  # fmt: skip
        triples = max(-(-k // 24) * 8 for _, k in widths.values())
        self._buffers["tables"] = np.zeros((triples if lut is not None else 0, 32), np.uint8)
        self._last_logits = np.zeros((1, shape.vocab_size), np.float32)
        self.length = 0
        self.random_seed: int | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_decoder(cls, model: Any, embedding: str = "float32", kv_cache: str = "float32", gemv: str = "tiles") -> DecoderEngine:
        """The engine of a W1.58A8 ``Decoder`` (its BitLinears, or the PackedBitLinears of
        ``pack_model``): codes, scales and gains copied (the model is not kept); the tied
        embedding (and head) kept as ``embedding``, "float32", "bfloat16" (rounded to
        nearest: the engine then computes what the model with that rounded table computes) or
        "int8" (:func:`quantize_table_int8`: likewise, for the table ``codes * scale``);
        the KV cache as ``kv_cache`` (see ``__init__``); ``gemv="lut"`` adds the weights as
        table indices for one-token steps (:data:`GEMVS`)."""
        _check_embedding(embedding)
        _check_kv_cache(kv_cache)
        gemv = _resolve_gemv(gemv)
        import torch

        from labutils.bitlinear import BitLinear
        from labutils.kernels import PackedBitLinear, prepack_w158a8

        cfg = model.config
        if getattr(cfg, "quant", None) != "w1.58a8":
            raise ValueError(f"the engine runs W1.58A8 decoders (config.quant='w1.58a8'), got {getattr(cfg, 'quant', None)!r}")
        widths = EngineShape.of(cfg).widths()
        weights: dict[str, list] = {k: [] for k in PROJECTIONS}
        scales: dict[str, list] = {k: [] for k in PROJECTIONS}
        gains: dict[str, list] = {k: [] for k in (*PROJECTIONS, "attn", "mlp")}
        act_eps = act_bits = None

        def f32(t: torch.Tensor) -> np.ndarray:
            return t.detach().to(torch.float32).cpu().numpy()

        for i, block in enumerate(model.blocks):
            layers = {"qkv": block.attn.qkv, "o": block.attn.o, "gate_up": block.mlp.gate_up, "down": block.mlp.down}
            for name, layer in layers.items():
                n = widths[name][0]
                if isinstance(layer, PackedBitLinear):
                    if layer.act != "int8" or layer.weights.scheme != "w1.58a8" or layer.bias is not None:
                        raise ValueError(f"block {i} {name}: the engine needs W1.58A8 int8 layers without bias")
                    packed, scale = layer.weights, f32(layer.weight_scale)
                    eps, bits = layer.eps, layer.act_bits
                elif isinstance(layer, BitLinear):
                    lc = layer.config
                    if lc.weight_bits != 1.58 or lc.act_bits is None or not 2 <= lc.act_bits <= 8 or layer.bias is not None:
                        raise ValueError(f"block {i} {name}: the engine needs ternary weights and 2-8 bit activations, no bias")
                    if layer.quant_strength != 1:
                        raise ValueError(f"block {i} {name}: quant_strength must be 1 (fully quantized)")
                    codes, scale = layer.quantized_weight()
                    packed, scale, eps, bits = prepack_w158a8(codes.cpu()), f32(scale), lc.eps, lc.act_bits
                else:
                    raise ValueError(f"block {i} {name}: expected a BitLinear or PackedBitLinear, got {type(layer).__name__}")
                norm = layer.norm
                if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None:
                    raise ValueError(f"block {i} {name}: the engine needs the BitLinear's RMSNorm (norm='rms')")
                if (act_eps, act_bits) not in ((None, None), (eps, bits)) or (norm.eps or 0) != eps:
                    raise ValueError(f"block {i} {name}: every projection must share one eps and act_bits")
                act_eps, act_bits = eps, bits
                weights[name].append(packed.data)
                scales[name].append(np.broadcast_to(scale.reshape(-1), (n,)))
                gains[name].append(f32(norm.weight))
            gains["attn"].append(f32(block.attn_norm.weight))
            gains["mlp"].append(f32(block.mlp_norm.weight))
        embed = model.embed
        table = embed.weight if isinstance(embed, torch.nn.Embedding) else embed(torch.arange(cfg.vocab_size))
        if model.lm_head.weight is not table and not torch.equal(model.lm_head.weight, table):
            raise ValueError("the engine needs the head tied to the embedding (Decoder's lm_head)")
        shape = EngineShape.of(cfg, act_eps=float(act_eps), act_bits=int(act_bits))
        embed, embed_scale = _table(f32(table), embedding)
        stacked = {k: _stack(v) for k, v in weights.items()}
        return cls(shape, stacked, {k: _stack(v) for k, v in scales.items()},
                   {k: _stack(v) for k, v in gains.items()}, embed, f32(model.norm.weight), kv_cache=kv_cache,
                   embed_scale=embed_scale, lut=cls.lut_of(shape, stacked) if gemv == "lut" else None)  # fmt: skip

    @staticmethod
    def lut_of(shape: EngineShape, weights: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The ``lut`` argument of ``__init__`` from the W1.58A8 tiles ``weights`` (same codes)."""
        from labutils.kernels import PackedWeights, untile_w158a8

        out = {}
        for name, (n, k) in shape.widths().items():
            layers = [pack_lut(untile_w158a8(PackedWeights("w1.58a8", n, k, w))) for w in weights[name]]
            out[name] = _lut_stack(layers)
        return out

    @classmethod
    def random(cls, shape: EngineShape, seed: int = 0, progress: bool = False, embedding: str = "float32",
               kv_cache: str = "float32", gemv: str = "tiles") -> DecoderEngine:  # fmt: skip
        """Random ternary weights (codes uniform in {-1, 0, +1}, scale 1/sqrt(in_features)),
        embedding N(0, 0.02) kept as ``embedding`` ("float32", "bfloat16" or "int8"), unit gains: a
        benchmark model of any shape, as bitnet.cpp's dummy models, built layer by layer (peak
        memory: one layer's int8 codes beyond the packed model). :meth:`layer_codes`
        regenerates the codes (for a GGUF export). ``kv_cache``: see ``__init__``; ``gemv``:
        see :meth:`from_decoder`."""
        _check_embedding(embedding)
        _check_kv_cache(kv_cache)
        gemv = _resolve_gemv(gemv)
        from tqdm.auto import tqdm

        from labutils.kernels import prepack_w158a8

        widths = shape.widths()
        weights: dict[str, np.ndarray] = {}
        for name, (n, k) in widths.items():
            weights[name] = np.empty((shape.n_layer, -(-n // 64), padded_width(k) // 16, 4, 64), np.uint8)
        luts: dict[str, list[LutWeights]] = {name: [] for name in widths}
        for layer in tqdm(range(shape.n_layer), disable=not progress, desc="random ternary layers"):
            for name, codes in cls.layer_codes(shape, seed, layer).items():
                weights[name][layer] = prepack_w158a8(codes).data
                if gemv == "lut":
                    luts[name].append(pack_lut(codes))
        scales = {name: np.full((shape.n_layer, n), 1 / math.sqrt(k), np.float32) for name, (n, k) in widths.items()}
        gains = {name: np.ones((shape.n_layer, k), np.float32) for name, (_, k) in widths.items()}
        gains |= {"attn": np.ones((shape.n_layer, shape.d_model), np.float32), "mlp": np.ones((shape.n_layer, shape.d_model), np.float32)}
        rng = np.random.default_rng(seed)
        embed = rng.standard_normal((shape.vocab_size, shape.d_model), dtype=np.float32)
        embed *= np.float32(0.02)
        table, table_scale = _table(embed, embedding)
        engine = cls(shape, weights, scales, gains, table, np.ones(shape.d_model, np.float32), kv_cache=kv_cache,
                     embed_scale=table_scale, lut={k: _lut_stack(v) for k, v in luts.items()} if gemv == "lut" else None)  # fmt: skip
        engine.random_seed = seed  # labutils.export.export_random_gguf regenerates the codes from it
        return engine

    @staticmethod
    def layer_codes(shape: EngineShape, seed: int, layer: int) -> dict[str, np.ndarray]:
        """The int8 ternary codes {projection: [N, K]} of layer ``layer`` of :meth:`random`."""
        rng = np.random.default_rng([seed, layer + 1])
        return {name: (rng.integers(0, 3, (n, k), dtype=np.int8) - np.int8(1)) for name, (n, k) in shape.widths().items()}

    # ------------------------------------------------------------------ running

    def reset(self, length: int = 0) -> None:
        """Forget the cached positions from ``length`` on (0: all)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length must be in [0, {self.length}], got {length}")
        self.length = length

    @property
    def embedding_dtype(self) -> str:
        """How the tied embedding (and head) is held: "float32", "bfloat16" or "int8"."""
        return {np.dtype(np.uint16): "bfloat16", np.dtype(np.int8): "int8"}.get(self.embed.dtype, "float32")

    @property
    def gemv(self) -> str:
        """How one generated token's projections run: "tiles" or "lut" (:data:`GEMVS`)."""
        return "lut" if self.lut["qkv"][0].shape[1] else "tiles"

    @property
    def kv_cache_dtype(self) -> str:
        """How K and V are cached: "float32" or "bfloat16"."""
        return "bfloat16" if self.k_cache.dtype == np.uint16 else "float32"

    def embedding(self) -> np.ndarray:
        """The tied embedding as float32 ``[vocab, d]`` (a bfloat16 table widened exactly, an int8
        table's codes times their row scales)."""
        if self.embed.dtype == np.int8:
            return self.embed.astype(np.float32) * self.embed_scale[:, None]
        return from_bfloat16(self.embed) if self.embed.dtype == np.uint16 else self.embed

    @property
    def nbytes(self) -> int:
        """Bytes of the weights the engine holds (tiles, lookup indices if any, scales, gains, embedding)."""
        arrays = [*self.weights.values(), *self.scales.values(), *self.gains.values(), self.embed, self.embed_scale,
                  self.final_gain, *(a for pair in self.lut.values() for a in pair)]
        return int(sum(a.nbytes for a in arrays))

    def forward(self, tokens: Any, logits: str = "last") -> np.ndarray:
        """Continue the cache by ``tokens`` (ints, or a 1-D int array) -> float32 logits
        ``[vocab]`` of the last token (``logits="last"``) or ``[T, vocab]`` (``"all"``)."""
        from labutils.kernels.dispatch import active_path, kernel_for

        ids = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        m, s = ids.shape[0], self.shape
        if m == 0:
            raise ValueError("tokens must hold at least one id")
        if self.length + m > s.max_seq_len:
            raise ValueError(f"{self.length + m} positions exceed max_seq_len={s.max_seq_len}")
        if ids.min() < 0 or ids.max() >= s.vocab_size:
            raise IndexError(f"token ids must be in [0, {s.vocab_size})")
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        first = m - 1 if logits == "last" else 0
        out = self._last_logits if logits == "last" else np.empty((m, s.vocab_size), np.float32)
        b, w, sc, g, lut = self._buffers, self.weights, self.scales, self.gains, self.lut
        path = active_path()
        _forward(kernel_for("w1.58a8"), kernel_for("w1.58a8", parallel=False), lut_kernel_for(path), float_matmul_for(path),
                 ids, m, self.length, first,
                 g["attn"], g["qkv"], w["qkv"], sc["qkv"], g["o"], w["o"], sc["o"], g["mlp"], g["gate_up"], w["gate_up"],
                 sc["gate_up"], g["down"], w["down"], sc["down"], self.final_gain,
                 *lut["qkv"], *lut["o"], *lut["gate_up"], *lut["down"], b["tables"],
                 self.embed, self.embed_scale, self.cos, self.sin,
                 self.k_cache, self.v_cache, s.n_head, s.n_kv_head, s.head_dim, s.ffn_hidden, np.float32(s.norm_eps),
                 np.float32(s.act_eps), np.float32(2 ** (s.act_bits - 1) - 1), PARALLEL_MIN_MACS,
                 b["x"], b["h"], b["codes_d"], b["codes_h"], b["xs"], b["rowsum"], b["dots"], b["qkv"], b["att"],
                 b["gu"], b["act"], b["proj"], b["scores"], out)  # fmt: skip
        if not np.isfinite(b["xs"][:m]).all():
            raise ValueError("a non-finite activation reached a quantizer (NaN or inf in the model)")
        self.length += m
        return out[0] if logits == "last" else out

    def profile_step(self, position: int, repeat: int = 20) -> dict[str, float]:
        """Where one generated token's time goes, at ``position`` (the cache filled with random
        ids up to there): seconds, medians of ``repeat`` interleaved rounds, of the whole step
        (``total``), of its ternary kernel calls alone (``integer_kernel``: the same calls, in
        one compiled loop; with ``gemv="lut"`` the lookup kernels and their tables), of the float head alone (``float_head``), and ``other`` (the rest:
        norms, quantization, RoPE, attention, SwiGLU, residuals, the call itself). Leaves the
        cache at ``position``."""
        import statistics
        import time

        from labutils.kernels.dispatch import active_path, kernel_for

        if not 1 <= position < self.shape.max_seq_len:
            raise ValueError(f"position must be in [1, {self.shape.max_seq_len - 1}], got {position}")
        self.reset()
        self.forward(np.random.default_rng(0).integers(0, self.shape.vocab_size, position))
        par, ser = kernel_for("w1.58a8"), kernel_for("w1.58a8", parallel=False)
        head = float_matmul_for(active_path())
        b, w, lut = self._buffers, self.weights, self.lut
        head_in = np.ascontiguousarray(b["h"][:1])
        lut_kernel = lut_kernel_for(active_path())

        def integer_kernels():
            if self.gemv == "lut":
                _lut_kernels_only(lut_kernel, *lut["qkv"], *lut["o"], *lut["gate_up"], *lut["down"], b["codes_d"],
                                  b["codes_h"], b["tables"], b["dots"])  # fmt: skip
            else:
                _kernels_only(par, ser, 1, w["qkv"], w["o"], w["gate_up"], w["down"], b["codes_d"], b["codes_h"],
                              b["rowsum"], b["dots"], PARALLEL_MIN_MACS)  # fmt: skip

        def step():
            self.reset(position)
            self.step(1)

        parts = {
            "total": step,
            "integer_kernel": integer_kernels,
            "float_head": lambda: (head(head_in, 1, self.embed, self._last_logits),
                                   scale_columns(self._last_logits, 1, self.embed_scale)),
        }  # fmt: skip
        for fn in parts.values():
            fn()
        seconds: dict[str, list[float]] = {k: [] for k in parts}
        for _ in range(repeat):
            for name, fn in parts.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
        self.reset(position)
        out = {k: statistics.median(v) for k, v in seconds.items()}
        out["other"] = max(0.0, out["total"] - out["integer_kernel"] - out["float_head"])
        out["outside_kernels_share"] = 1 - out["integer_kernel"] / out["total"]
        return out

    def step(self, token: int) -> np.ndarray:
        """One generated token -> its logits ``[vocab]`` (a view of a buffer the next call reuses)."""
        return self.forward(np.array([token], np.int64))


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_packed_decoder(model: Any) -> bool:
    """True for a W1.58A8 Decoder whose projections are all PackedBitLinear (``pack_model``)."""
    from labutils.kernels import PackedBitLinear

    if getattr(getattr(model, "config", None), "quant", None) != "w1.58a8" or not hasattr(model, "blocks"):
        return False
    layers = [m for b in model.blocks for m in (b.attn.qkv, b.attn.o, b.mlp.gate_up, b.mlp.down)]
    return all(isinstance(m, PackedBitLinear) and m.act == "int8" and m.weights.scheme == "w1.58a8" for m in layers)


def engine_for(model: Any) -> DecoderEngine:
    """The engine of a packed decoder, built once per model and kept while the model lives
    (rebuilt if any layer's packed weights were replaced since); ``gemv="auto"``: generated
    tokens on table indices on the avx2 kernel path, where the lookups beat the tiles."""
    key = tuple(id(m.weights.data) for b in model.blocks for m in (b.attn.qkv, b.attn.o, b.mlp.gate_up, b.mlp.down))
    cached = _ENGINES.get(model)
    if cached is None or cached[0] != key:
        cached = (key, DecoderEngine.from_decoder(model, gemv="auto"))
        _ENGINES[model] = cached
    return cached[1]
