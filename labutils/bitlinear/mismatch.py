"""How far the STE gradient is from the full-precision gradient at the same weights."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labutils.bitlinear.quantize import bitlinear_layers, quant_strength_context


@dataclass(frozen=True)
class GradientMismatch:
    """STE gradient ``g`` vs full-precision gradient ``g_fp`` of one layer's latent weight.

    cosine: cos(g, g_fp) (1 = same direction). norm_ratio: ||g|| / ||g_fp||.
    relative_error: ||g - g_fp|| / ||g_fp||.
    """

    name: str
    cosine: float
    norm_ratio: float
    relative_error: float


def gradient_mismatch(
    model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> list[GradientMismatch]:
    """How far the STE gradient is from the full-precision gradient, per BitLinear layer.

    Both gradients are taken at the same latent weights on the same batch: once with the
    quantizers on (λ = 1: the gradient QAT follows) and once with them off (λ = 0: the gradient
    of the same network in full precision). The model runs in eval mode (no dropout) so the two
    passes see the same function; its mode, λ and ``.grad`` fields are left as they were.

    Args:
        model: a module with at least one BitLinear.
        batch: whatever ``loss_fn`` takes.
        loss_fn: (model, batch) -> scalar loss tensor.

    Returns:
        one GradientMismatch per BitLinear (with a weight that requires grad), in module order.
    """
    layers = [(n, m) for n, m in bitlinear_layers(model) if m.weight.requires_grad]
    if not layers:
        raise ValueError(
            f"gradient_mismatch needs a model with trainable BitLinear layers, got {type(model).__name__}"
        )
    weights = [m.weight for _, m in layers]
    was_training = model.training
    model.eval()
    try:
        grads = {}
        for strength in (1.0, 0.0):
            with quant_strength_context(model, strength):
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"loss_fn must return a scalar tensor, got {loss!r}")
                grads[strength] = torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        model.train(was_training)

    result = []
    for (name, layer), g, g_fp in zip(layers, grads[1.0], grads[0.0]):
        g = torch.zeros_like(layer.weight) if g is None else g.double()
        g_fp = torch.zeros_like(layer.weight) if g_fp is None else g_fp.double()
        fp_norm = float(g_fp.norm())
        cosine = float(F.cosine_similarity(g.flatten(), g_fp.flatten(), dim=0, eps=1e-30))
        result.append(
            GradientMismatch(
                name=name,
                cosine=cosine,
                norm_ratio=float(g.norm()) / fp_norm if fp_norm else math.inf,
                relative_error=float((g - g_fp).norm()) / fp_norm if fp_norm else math.inf,
            )
        )
    return result
