"""Planted bugs for lab08_language_model (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "torch.rsqrt(mean_square + eps) * weight", "torch.rsqrt(mean_square + eps)"),  # the gain forgotten
    Bug("ex2-answer", "first * cos - second * sin", "first * cos + second * sin"),  # not a rotation: lengths change
    Bug("ex3-answer", "/ math.sqrt(q.shape[-1])", "/ q.shape[-1]"),  # scaled by 1/d_h, not 1/sqrt(d_h)
    # no cache: the whole sequence again at every step (same tokens, quadratic work)
    Bug("ex4-answer", "logits = model(nxt[:, None], cache)[:, -1]", "logits = model(torch.cat(tokens, dim=1))[:, -1]"),
    Bug("ex5-answer", "self.scaling = alpha / rank", "self.scaling = alpha"),  # the update not divided by the rank
]

HIDDEN = [
    Bug("ex1-answer", "mean_square + eps", "mean_square + 1e-5"),  # eps argument ignored
    # frequencies theta^(-i/d) instead of theta^(-2i/d): still a rotation, still relative, wrong angles
    Bug("ex2-answer", "torch.arange(0, d, 2, dtype=torch.float64) / d", "torch.arange(half, dtype=torch.float64) / d"),
    Bug("ex3-answer", ".tril(diagonal=past)", ".tril()"),  # the mask ignores the cached positions
    Bug("ex4-answer", "KVCache(model.config, batch,", "KVCache(model.config, 1,"),  # a cache for batch 1 only
    # only the latent weight frozen: the BitLinear's own RMSNorm gain would train with the adapters
    Bug("ex5-answer", "self.base = base.requires_grad_(False)", "self.base = base\n        base.weight.requires_grad_(False)"),
]
