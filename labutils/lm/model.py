"""A small Llama-style decoder, full precision or BitNet b1.58, readable in one file.

The architecture is Llama's (Touvron et al., 2023) at toy scale::

    tokens [B, T] -> embedding [B, T, d]
      -> n_layer x Block:  x = x + o(attn(rope(q), rope(k), v))      q, k, v = qkv(rmsnorm(x))
                           x = x + down(silu(gate) * up)              gate, up = gate_up(rmsnorm(x))
      -> rmsnorm -> lm_head (tied to the embedding) -> logits [B, T, vocab]

- RMSNorm (Zhang & Sennrich, 2019) before attention and MLP; no biases anywhere.
- Rotary positions (Su et al., 2021) on q and k, rotating pairs (i, i + d/2) as Llama/HF do.
- SwiGLU MLP (Shazeer, 2020) with hidden size 8/3 d rounded up to a multiple of 64.
- Attention by ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where the
  backend has them) or written out ("eager": softmax(q k^T / sqrt(d_h) + mask) v), selectable so
  chapter 8 can measure both.
- q, k, v are one [3d, d] projection and gate, up one [2h, d] projection: fewer, larger matmuls,
  which matters for the CPU decode loop. Split them (rows 0:d, d:2d, 2d:3d) to get Llama's
  separate weights; with BitNet's per-tensor scale the three share one scale.

``quant="w1.58a8"`` makes every projection a :class:`labutils.bitlinear.BitLinear` with BitNet
b1.58's recipe: ternary absmean weights (one scale per tensor), per-token absmax 8-bit
activations, and an RMSNorm over the layer's input before the activations are quantized (BitNet's
"SubLN": for o and down this norm is new; for qkv and gate_up it repeats the block's norm, which
the layer needs anyway to see unit-scale inputs). Embedding and head stay in full precision, as
in BitNet. Everything else is identical between the two variants, so a perplexity gap is the
quantization's.

A :class:`KVCache` holds past keys and values, so :func:`generate` decodes one token per step
with work proportional to the context, not its square.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from labutils.bitlinear import BitNetConfig, quantize_

__all__ = ["QUANTS", "LMConfig", "KVCache", "Decoder", "generate", "bitnet_config"]

QUANTS = ("fp", "w1.58a8")
ATTENTIONS = ("sdpa", "eager")


def bitnet_config() -> BitNetConfig:
    """BitNet b1.58's BitLinear: ternary absmean per tensor, 8-bit per-token activations, RMSNorm."""
    return BitNetConfig(weight_bits=1.58, act_bits=8, per_channel=False, norm="rms")


@dataclass(frozen=True)
class LMConfig:
    """The decoder's shape and variant.

    Attributes:
        vocab_size: tokens in the vocabulary (the tokenizer's).
        n_layer, n_head, d_model: depth, heads, width; d_model must divide by n_head and the
            head size must be even (rotary pairs).
        n_kv_heads: key/value heads (grouped-query attention, Ainslie et al., 2023: query head h
            reads KV head ``h // (n_head // n_kv_heads)``); None: as many as n_head (multi-head
            attention, every model committed before GQA existed).
        ffn_dim: the SwiGLU hidden size; None: 8/3 d_model rounded up to 64.
        max_seq_len: longest context (rotary tables and the KV cache are sized for it).
        quant: "fp" (full precision) or "w1.58a8" (BitNet b1.58 projections).
        attention: "sdpa" or "eager".
        rope_theta: rotary base.
        norm_eps: RMSNorm eps.
    """

    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    max_seq_len: int = 256
    quant: str = "fp"
    attention: str = "sdpa"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_kv_heads: int | None = None
    ffn_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must divide into n_head ({self.n_head}) heads of even size"
            )
        for name in ("n_kv_heads", "ffn_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.n_kv_heads is not None and self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {QUANTS}, got {self.quant!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_head`` when that is None."""
        return self.n_kv_heads or self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: ``ffn_dim``, else 8/3 d (same parameters as a 4d GELU MLP) rounded up to 64."""
        return self.ffn_dim or 64 * math.ceil(8 * self.d_model / 3 / 64)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- rotary positions


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim] for positions 0..max_len-1 (float32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [T, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # pairs (i, i + hd/2) share an angle
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, hd] by the angles of its T positions (cos, sin [T, hd])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Past keys and values of every layer, preallocated [n_layer, B, H_kv, max_len, hd] each
    (H_kv = ``config.kv_heads``: fewer than the query heads under grouped-query attention).

    ``length`` is how many positions are filled; :meth:`append` writes a layer's new keys and
    values at ``length`` and returns everything so far; :meth:`advance` moves ``length`` once all
    layers have appended.
    """

    def __init__(self, config: LMConfig, batch: int, *, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (config.n_layer, batch, config.kv_heads, config.max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds when full (both K and V, all layers)."""
        return self.k.numel() * self.k.element_size() * 2

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, t, hd] after the filled positions; return keys, values [B, H, length + t, hd]."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"the KV cache holds {self.k.shape[3]} positions; {end} were asked for")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.length += t


# --------------------------------------------------------------------------- the model


class Attention(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.d_model, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=False)
        self.o = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        """x [B, T, d] at positions cache.length..cache.length+T-1 (0.. without a cache) -> [B, T, d]."""
        cfg = self.config
        b, t, _ = x.shape
        hq, hkv, hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        q, k, v = self.qkv(x).view(b, t, hq + 2 * hkv, hd).transpose(1, 2).split((hq, hkv, hkv), dim=1)  # [B, H(kv), T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)
        if hkv != hq:  # grouped-query: query head h reads KV head h // (hq // hkv)
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        y = attend(q, k, v, past, cfg.attention)
        return self.o(y.transpose(1, 2).reshape(b, t, cfg.d_model))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, how: str) -> torch.Tensor:
    """Causal attention of q [B, H, T, hd] (positions past..past+T-1) over k, v [B, H, past+T, hd]."""
    t, s = q.shape[2], k.shape[2]
    # Query i may see keys 0..past+i. Without past keys that is SDPA's is_causal (which aligns
    # the mask to the top-left corner, so it is wrong once past > 0); one query sees everything.
    mask = None
    if t > 1 and past > 0:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=past)
    if how == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=t > 1 and past == 0)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if t > 1:
        allowed = mask if mask is not None else torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.hidden = config.ffn_hidden
        self.gate_up = nn.Linear(config.d_model, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """The decoder: ``forward(tokens [B, T] int64, cache=None) -> logits [B, T, vocab] float``.

    With a cache, the tokens continue the cached positions and the cache is advanced.
    ``generate`` (module function) decodes with one.
    """

    def __init__(self, config: LMConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied (Press & Wolf, 2017)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(seed)
        if config.quant == "w1.58a8":
            quantize_(self, bitnet_config(), skip=("lm_head",))

    def _init_weights(self, seed: int) -> None:
        """GPT-2's init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 n_layer); seeded."""
        generator = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() < 2:
                    continue  # norm gains stay 1
                std = residual_std if name.endswith(("o.weight", "down.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)

    def num_parameters(self, *, embeddings: bool = True) -> int:
        """Parameters counted once (the tied head is the embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64/int32 [batch, time], got {tuple(tokens.shape)} {tokens.dtype}")
        start = cache.length if cache is not None else 0
        t = tokens.shape[1]
        if start + t > self.config.max_seq_len:
            raise ValueError(f"{start + t} positions exceed max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.lm_head(self.norm(x))


@torch.no_grad()
def generate(
    model: Decoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = 50,
    seed: int = 0,
    stop_token: int | None = None,
) -> torch.Tensor:
    """Continue prompt [B, T0] (int64) by up to max_new_tokens tokens with a KV cache.

    temperature 0 is greedy; otherwise sampling from the top_k most likely tokens, seeded.
    Returns [B, T0 + n] int64; rows that emit ``stop_token`` keep emitting it (padding).
    A packed ternary decoder (``labutils.kernels.pack_model``) on the CPU decodes through the
    compiled engine (:mod:`labutils.engine.decoder`: same codes, logits equal to float
    rounding); every other model through its torch modules with a :class:`KVCache`.
    Leaves the model in eval mode (a training loop that samples must call ``train()`` again).
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, time >= 1], got {tuple(prompt.shape)}")
    model.eval()
    cfg = model.config
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - prompt.shape[1])
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    forward = _engine_forward(model, prompt) or _torch_forward(model, prompt)
    logits = forward(prompt)
    out = [prompt]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        nxt = next_token(logits.float(), temperature, top_k, generator)
        if stop_token is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
            done |= nxt == stop_token
        out.append(nxt[:, None])
        if stop_token is not None and bool(done.all()):
            break
        logits = forward(nxt[:, None])
    return torch.cat(out, dim=1)


def _torch_forward(model: Decoder, prompt: torch.Tensor):
    """tokens [B, t] -> logits [B, vocab] of the last position, through the torch modules and a
    KVCache (the prompt first, then one token a call)."""
    cache = KVCache(model.config, prompt.shape[0], dtype=model.embed.weight.dtype, device=prompt.device)
    return lambda tokens: model(tokens, cache)[:, -1]


def _engine_forward(model: Decoder, prompt: torch.Tensor):
    """The same for a packed ternary decoder (``kernels.pack_model``) on the CPU, through the
    compiled decode engine (:mod:`labutils.engine.decoder`), one engine per row of the batch
    (rows are independent); None for any other model, which keeps the torch path."""
    if prompt.device.type != "cpu" or not any(type(m).__name__ == "PackedBitLinear" for m in model.modules()):
        return None
    from labutils.engine.decoder import DecoderEngine, engine_for, is_packed_decoder

    if not is_packed_decoder(model):
        return None
    engines = [engine_for(model)] + [DecoderEngine.from_decoder(model) for _ in range(prompt.shape[0] - 1)]
    for engine in engines:
        engine.reset()

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        rows = [torch.from_numpy(e.forward(t.numpy()).copy()) for e, t in zip(engines, tokens)]
        return torch.stack(rows).to(model.embed.weight.dtype)

    return forward


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] (greedy at temperature 0)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]
