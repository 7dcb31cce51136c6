"""Self-checks for Lab 8, A 1.58-bit language model (``labs/source/lab08_language_model``).

Each piece is compared with the decoder's own in ``labutils.lm.model`` (``nn.RMSNorm``,
``apply_rope``, ``attend``, ``generate``) on other sizes, bases, cached positions and batches than
the visible tests use; the LoRA adapter with ``labutils.bitlinear.LoRA`` on the BitLinear layers of
a ternary decoder of the check's own, values and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from labutils.checks._common import _fail, _function, _gen, _mistake, _ok, _run, _typed, _where

__all__ = ["check_lab8_rms_norm", "check_lab8_rotate", "check_lab8_causal_attention", "check_lab8_greedy_decode",
           "check_lab8_ternary_lora"]


def check_lab8_rms_norm(rms_norm: Callable) -> bool:
    """Exercise 1: ``rms_norm(x, weight, eps)`` equals ``nn.RMSNorm`` for several shapes and eps, tiny
    inputs (where eps matters) and a zero row."""
    _function(rms_norm, "rms_norm")
    cases = [((2, 5, 32), 1e-5, 1.0), ((7, 16), 1e-6, 1.0), ((2, 3, 4, 8), 1e-2, 1.0), ((3, 64), 1e-5, 1e-3),
             ((4, 10), 0.5, 0.3)]
    for seed, (shape, eps, scale) in enumerate(cases):
        g = _gen(10 + seed)
        x = torch.randn(*shape, generator=g) * scale
        norm = nn.RMSNorm(shape[-1], eps=eps)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=g))
            expected = norm(x)
        weight = norm.weight.detach()
        mine, call = _run(rms_norm, "rms_norm", x, weight, eps)
        _typed(mine, call, "the result", torch.Tensor, shape=x.shape)
        if torch.allclose(mine, expected, atol=1e-5, rtol=1e-4):
            continue
        ms = x.pow(2).mean(-1, keepdim=True)
        words = _mistake(mine, (
            (lambda: x * torch.rsqrt(ms + eps), "multiply by weight, the learned gain of each feature"),
            (lambda: x * torch.rsqrt(ms + 1e-5) * weight, f"use the eps argument (here {eps}), not a fixed 1e-5"),
            (lambda: x / (ms.sqrt() + eps) * weight, "eps goes under the root: x / sqrt(mean(x²) + eps)"),
            (lambda: (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps) * weight,
             "RMSNorm subtracts no mean (that is LayerNorm)"),
            (lambda: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps) * weight,
             "the mean of the squares, not their sum (divide by d)"),
            (lambda: x * torch.rsqrt(ms) * weight, "add eps under the root"),
        ), rtol=1e-4, atol=1e-5)
        raise _fail(call, words or f"differs from nn.RMSNorm {_where(mine, expected)}")
    zero, call = _run(rms_norm, "rms_norm", torch.zeros(2, 8), torch.ones(8), 1e-5)
    if not torch.equal(zero, torch.zeros(2, 8)):
        raise _fail(call, "a zero row must stay zero (eps under the root keeps the division finite)")
    return _ok("equal to nn.RMSNorm for 2-D to 4-D inputs, eps from 1e-6 to 0.5, tiny inputs and a zero row")


def _rope(x: torch.Tensor, position: int, theta: float, *, step: int = 2, pairs: str = "halves",
          direction: float = 1.0, frequencies_from: float | None = None) -> torch.Tensor:
    """Rotations people write instead of RoPE's (for the messages): ``pairs`` "halves" (i, i + d/2),
    "neighbours" (2i, 2i + 1) put back in place, or "neighbours-cat" concatenated by halves."""
    d = x.shape[-1]
    half = d // 2
    freq = (frequencies_from or theta) ** (-torch.arange(0, step * half, step, dtype=torch.float64) / d)
    angle = position * freq
    cos, sin = angle.cos().to(x.dtype), (direction * angle.sin()).to(x.dtype)
    first, second = (x[..., :half], x[..., half:]) if pairs == "halves" else (x[..., 0::2], x[..., 1::2])
    a, b = first * cos - second * sin, second * cos + first * sin
    if pairs == "neighbours":
        return torch.stack([a, b], dim=-1).flatten(-2)
    return torch.cat([a, b], dim=-1)


def check_lab8_rotate(rotate: Callable) -> bool:
    """Exercise 2: ``rotate(x, position, theta)`` equals the decoder's ``apply_rope(x, *rope_tables(...))``
    at positions 0 to 63, head sizes 8 to 64 and bases 500 to 10^6."""
    from labutils.lm.model import apply_rope, rope_tables

    _function(rotate, "rotate")
    for seed, (d, theta) in enumerate([(16, 10000.0), (32, 10000.0), (8, 500.0), (64, 1e6)]):
        cos, sin = rope_tables(d, 64, theta)
        x = torch.randn(2, 3, 64, d, generator=_gen(seed))
        expected = apply_rope(x, cos, sin)
        for position in (0, 1, 2, 9, 33, 63):
            inputs = x[:, :, position]
            mine, call = _run(rotate, "rotate", inputs, position, theta)
            _typed(mine, call, "the result", torch.Tensor, dtype=inputs.dtype, shape=inputs.shape)
            want = expected[:, :, position]
            if torch.allclose(mine, want, atol=1e-5):
                continue
            words = _mistake(mine, (
                (lambda: _rope(inputs, position, theta, direction=-1.0), "the rotation goes the wrong way: "
                 "y_i = x_i cos α - x_(i+d/2) sin α, y_(i+d/2) = x_(i+d/2) cos α + x_i sin α"),
                (lambda: _rope(inputs, position, theta, pairs="neighbours"),
                 "pair coordinate i with i + d/2 (first half with second half), not neighbours 2i, 2i + 1"),
                (lambda: _rope(inputs, position, theta, pairs="neighbours-cat"),
                 "pair coordinate i with i + d/2 (first half with second half), not neighbours 2i, 2i + 1"),
                (lambda: _rope(inputs, position, theta, step=1), "the angle of pair i is m · θ^(-2i/d), not m · θ^(-i/d)"),
                (lambda: _rope(inputs, position, theta, frequencies_from=10000.0), "use the theta argument, not 10,000"),
                (lambda: torch.cat([inputs[..., :d // 2] * cos[position, :d // 2] + inputs[..., d // 2:] * sin[position, :d // 2],
                                    inputs[..., d // 2:] * cos[position, :d // 2] + inputs[..., :d // 2] * sin[position, :d // 2]], -1),
                 "not a rotation (the lengths change): the first half gets - x_(i+d/2) sin α"),
            ), rtol=1e-4, atol=1e-5)
            if words is None and position == 0:
                words = "position 0 must leave x as it is (no rotation)"
            raise _fail(call, words or f"differs from the decoder's apply_rope {_where(mine, want)}")
    return _ok("equal to apply_rope(rope_tables(...)) at positions 0 to 63, head sizes 8 to 64, bases 500 to 1e6")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, diagonal: int | None) -> torch.Tensor:
    scores = q @ k.transpose(-2, -1) * scale
    if diagonal is not None:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(diagonal=diagonal)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def check_lab8_causal_attention(causal_attention: Callable) -> bool:
    """Exercise 3: ``causal_attention(q, k, v, past)`` equals ``attend(q, k, v, past, how="eager")`` and
    SDPA, without and with cached positions (past > 0), one new token included."""
    from labutils.lm.model import attend

    _function(causal_attention, "causal_attention")
    g = _gen(1)
    for b, h, past, t, d in [(2, 3, 0, 6, 8), (1, 2, 4, 3, 8), (2, 1, 9, 1, 16), (1, 4, 1, 5, 4), (2, 2, 0, 7, 8)]:
        q = torch.randn(b, h, t, d, generator=g)
        k, v = torch.randn(b, h, past + t, d, generator=g), torch.randn(b, h, past + t, d, generator=g)
        mine, call = _run(causal_attention, "causal_attention", q, k, v, past)
        _typed(mine, call, "the result", torch.Tensor, shape=q.shape)
        expected = attend(q, k, v, past, how="eager")
        if torch.allclose(mine, expected, atol=1e-5) and torch.allclose(mine, attend(q, k, v, past, how="sdpa"), atol=1e-5):
            continue
        root = 1 / math.sqrt(d)
        words = _mistake(mine, (
            (lambda: _attention(q, k, v, 1 / d, past), "scale the scores by 1/sqrt(d_h), not 1/d_h"),
            (lambda: _attention(q, k, v, 1.0, past), "scale the scores by 1/sqrt(d_h)"),
            (lambda: _attention(q, k, v, root, 0), "the mask ignores the cached positions: query i sees keys "
                                                   "0 .. past + i (tril(diagonal=past))"),
            (lambda: _attention(q, k, v, root, None), "mask the later keys: a token sees itself and the tokens before it"),
        ), rtol=1e-4, atol=1e-5)
        raise _fail(call, words or f"differs from attend(q, k, v, past, how='eager') {_where(mine, expected)}")
    return _ok("equal to attend (eager and SDPA) with past = 0, 1, 4 and 9, several new tokens and one")


def _models() -> list:
    """Two tiny decoders (full precision and W1.58A8) whose blocks' weights are 20x their initial
    scale, as in the lab, so that greedy decoding does not just repeat the last token."""
    from labutils.lm.model import Decoder, LMConfig

    models = []
    for seed, quant in ((1, "fp"), (2, "w1.58a8")):
        config = LMConfig(vocab_size=97, n_layer=2, n_head=2, d_model=32, max_seq_len=48, quant=quant)
        model = Decoder(config, seed=seed).eval()
        with torch.no_grad():
            for p in model.blocks.parameters():
                if p.dim() == 2:
                    p.mul_(20.0)
        models.append(model)
    return models


def check_lab8_greedy_decode(greedy_decode: Callable) -> bool:
    """Exercise 4: ``greedy_decode(model, prompt, n)`` equals ``generate(model, prompt, n, temperature=0)``
    on two tiny decoders of the check's own (full precision and W1.58A8), batches of 1 to 3, n = 0 and
    a full context, and runs every position through the model once (a KV cache)."""
    from labutils.lm.model import generate

    _function(greedy_decode, "greedy_decode")
    g = _gen(5)
    for model in _models():
        name = "the W1.58A8 decoder" if model.config.quant == "w1.58a8" else "the full-precision decoder"
        for batch, length, n in [(1, 4, 12), (3, 5, 9), (1, 1, 6), (2, 3, 0), (2, 40, 20)]:
            prompt = torch.randint(0, 97, (batch, length), generator=g)
            seen = [0]
            handle = model.embed.register_forward_hook(lambda module, inputs, output: seen.__setitem__(0, seen[0] + inputs[0].shape[1]))
            hint = ("make the KVCache for the prompt's batch, prompt.shape[0]" if batch > 1 else
                    "stop where the context is full: never more than model.config.max_seq_len tokens" if length + n > 48 else "")
            try:
                mine, call = _run(greedy_decode, "greedy_decode", model, prompt, n,
                                  _as=f"greedy_decode({name}, prompt {list(prompt.shape)}, {n})", _hint=hint)
            finally:
                handle.remove()
            expected = generate(model, prompt, n, temperature=0)
            _typed(mine, call, "the result", torch.Tensor, dtype=torch.int64)
            if mine.shape != expected.shape:
                extra = ""
                if mine.shape[:1] == expected.shape[:1] and mine.shape[1] == length + n > expected.shape[1]:
                    extra = f": stop where the context is full, at max_seq_len = {model.config.max_seq_len} tokens in all"
                elif mine.shape[1] == expected.shape[1] - length:
                    extra = ": start with the prompt, then the new tokens"
                raise _fail(call, f"shape {list(mine.shape)}, expected {list(expected.shape)}{extra}")
            if not torch.equal(mine[:, :length], prompt):
                raise _fail(call, "the result must start with the prompt")
            if not torch.equal(mine, expected):
                raise _fail(call, "the tokens differ from generate(model, prompt, n, temperature=0): at every step take "
                                  f"the arg-max of the last position's logits {_where(mine, expected)}")
            if seen[0] > expected.shape[1]:
                raise _fail(call, f"the model ran {seen[0]} positions; with a KV cache it needs {expected.shape[1]} at most: "
                                  "run the prompt once, then only the one new token at every step")
    return _ok("equal to generate(..., temperature=0) on a full-precision and a W1.58A8 decoder, batches of 1 to 3, "
               "n = 0 and a full context, each position run once")


_LATENT = "that uses the latent float weight: call self.base(x), the BitLinear, which ternarizes it"


def check_lab8_ternary_lora(ternary_lora: type) -> bool:
    """Exercise 5: ``TernaryLoRA(base, rank, alpha, seed)`` around a frozen BitLinear equals
    ``labutils.bitlinear.LoRA`` with the same A and B, in value and in the gradients of A and B, for
    the four projections of a W1.58A8 decoder at ranks 1 to 8; the whole base is frozen (its RMSNorm
    gain too), B starts at zero, A in ±1/sqrt(in_features) and not zero."""
    import copy

    from labutils.bitlinear import LoRA, bitlinear_layers

    _function(ternary_lora, "TernaryLoRA")
    decoder = _models()[1]  # the W1.58A8 decoder: every projection a BitLinear with its own RMSNorm
    layers = dict(bitlinear_layers(decoder))
    g = _gen(7)
    for name, rank, alpha in [("blocks.0.attn.qkv", 4, 8.0), ("blocks.1.attn.o", 2, 2.0),
                              ("blocks.0.mlp.down", 8, 32.0), ("blocks.1.mlp.gate_up", 1, 0.5)]:
        layer = layers[name]
        base = copy.deepcopy(layer)
        mine, call = _run(ternary_lora, "TernaryLoRA", base, rank, alpha, seed=3,
                          _as=f"TernaryLoRA({name} [{layer.out_features}, {layer.in_features}], rank={rank}, alpha={alpha})")
        a, b = getattr(mine, "lora_A", None), getattr(mine, "lora_B", None)
        for what, p, shape in (("lora_A", a, (rank, layer.in_features)), ("lora_B", b, (layer.out_features, rank))):
            if not isinstance(p, nn.Parameter):
                raise _fail(call, f"self.{what} must be an nn.Parameter (so that it trains), got {type(p).__name__}")
            if tuple(p.shape) != shape:
                raise _fail(call, f"{what} has shape {list(p.shape)}, expected {list(shape)} "
                                  f"({'[rank, in_features]' if what == 'lora_A' else '[out_features, rank]'})")
            if p.dtype != layer.weight.dtype:
                raise _fail(call, f"{what} is {p.dtype}, the base weight's dtype is {layer.weight.dtype}")
            if not p.requires_grad:
                raise _fail(call, f"{what} does not require a gradient: A and B are what trains")
        if getattr(mine, "base", None) is not base:
            raise _fail(call, "keep the BitLinear you were given as self.base (the frozen codes live there)")
        trainable = [n for n, p in base.named_parameters() if p.requires_grad]
        if trainable:
            words = (": the BitLinear has its own RMSNorm (BitNet's SubLN); freeze the whole base, "
                     "base.requires_grad_(False)") if trainable == ["norm.weight"] else ": freeze the whole base"
            raise _fail(call, f"base parameters {trainable} still require a gradient{words}")
        if torch.count_nonzero(b.detach()):
            raise _fail(call, "lora_B must start at zero, so that the wrapped layer starts equal to the base")
        bound = 1 / math.sqrt(layer.in_features)
        if not torch.count_nonzero(a.detach()):
            raise _fail(call, "lora_A is all zeros: with A = 0 and B = 0 neither ever gets a gradient; draw A uniform "
                              "in ±1/sqrt(in_features)")
        if a.detach().abs().max() > bound * (1 + 1e-6):
            raise _fail(call, f"lora_A reaches {float(a.detach().abs().max()):.3g}: draw it uniform in "
                              f"±1/sqrt(in_features) = ±{bound:.3g}")
        x = torch.randn(2, 3, layer.in_features, generator=g)
        with torch.no_grad():
            start, _ = _run(mine, "forward", x, _as=f"{call}(x)")
            if not isinstance(start, torch.Tensor) or not torch.allclose(start, layer(x), atol=1e-5):
                words = isinstance(start, torch.Tensor) and _mistake(start, (
                    (lambda: nn.functional.linear(x, layer.weight), _LATENT),), atol=1e-5, rtol=1e-4)
                raise _fail(call, "with B = 0 the output must equal the base layer's" + (f": {words}" if words else ""))
            b.copy_(torch.randn(layer.out_features, rank, generator=g))
        reference = LoRA(copy.deepcopy(layer), rank, alpha)
        with torch.no_grad():
            reference.lora_A.copy_(a)
            reference.lora_B.copy_(b)
        out, _ = _run(mine, "forward", x, _as=f"{call}(x)")
        _typed(out, call, "the output", torch.Tensor, shape=(2, 3, layer.out_features))
        expected = reference(x)
        if not torch.allclose(out, expected, atol=1e-5, rtol=1e-4):
            base_out = layer(x).detach()
            delta = (x @ a.detach().T) @ b.detach().T
            words = _mistake(out.detach(), (
                (lambda: base_out + alpha * delta, "scaled by alpha; the update is (alpha / rank) · x Aᵀ Bᵀ"),
                (lambda: base_out + delta, "the update is scaled by alpha / rank"),
                (lambda: base_out + rank / alpha * delta, "scaled by rank / alpha; it is alpha / rank"),
                (lambda: base_out, "the update (x Aᵀ) Bᵀ is missing"),
                (lambda: nn.functional.linear(x, layer.weight) + alpha / rank * delta, _LATENT),
            ), atol=1e-5, rtol=1e-4)
            raise _fail(call, "differs from labutils.bitlinear.LoRA with the same A and B"
                              + (f": {words}" if words else f" {_where(out.detach(), expected.detach())}"))
        out.square().sum().backward()
        expected.square().sum().backward()
        if base.weight.grad is not None:
            raise _fail(call, "the base weight got a gradient: freeze it")
        for what, p, q in (("A", a, reference.lora_A), ("B", b, reference.lora_B)):
            if p.grad is None or not torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4):
                raise _fail(call, f"the gradient of {what} differs from LoRA's: is the update built from "
                                  f"self.lora_A and self.lora_B themselves (not detached copies)?")
    return _ok("equal to labutils.bitlinear.LoRA, values and gradients, on the four BitLinear projections of a "
               "W1.58A8 decoder at ranks 1 to 8; the whole base frozen, B starting at zero")
