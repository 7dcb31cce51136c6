"""BitLinear: the BitNet layer, a drop-in ``nn.Linear`` with 1-bit, 1.58-bit or k-bit weights.

The forward pass of BitNet b1.58 (Ma et al., 2024), with the codes and scales of
``labutils.quant``::

    x  -> norm(x)                                  RMSNorm (or LayerNorm, "SubLN") over in_features
       -> x_q = codes_x * s_x                      per-token absmax, 8 bits (or off)
    W  -> W_q = codes_W * s_W                      ternary absmean | sign·mean|W| | k-bit absmax
    y  =  F.linear(x_q, W_q, bias)
       =  (codes_x @ codes_W^T) * s_x * s_W + bias   the integer matmul, rescaled once

Training keeps full-precision *latent* weights in ``.weight``. Rounding has zero gradient almost
everywhere, so the backward pass uses the straight-through estimator (STE), written with the
detach trick: ``q.detach() + (w - w.detach())`` has the value of ``q`` and the gradient of
``w``. Two STEs are offered (``BitNetConfig.ste``):

- ``"identity"``: ``dL/dW = dL/dW_q`` everywhere.
- ``"clipped"`` (hardtanh STE): ``dL/dW = dL/dW_q · 1[|W / s_W| <= c]``, where ``c`` is where the
  quantizer saturates: ``c = 1`` for ternary (``clip(W/γ, -1, 1)``) and for binary (hardtanh of
  ``W/s``), ``c = Qp = 2^(k-1) - 1`` for k-bit absmax (which never saturates, so there it equals
  the identity STE).

Activations use the identity STE (absmax never clips), except BiT's elastic binary activations
(``BitNetConfig(act_bits=1, act_binarizer="elastic")``: ``α · sign(x - β)`` with a learnable
scale α per tensor and shift β per input feature, and BiT's clipped STE; ``ElasticBinarize``).

``quantize_(model, BitNetConfig(...))`` swaps the chosen ``nn.Linear`` layers of a model for
BitLinear in place, torchao-style, and returns a report. Training aids live here too: the
quantization warm-up ``w + λ·(W_q - w)`` (``set_quant_strength``, ``linear_warmup_lambda``), LoRA
adapters on frozen BitLinear layers (``LoRA``, ``add_lora_``), and ``gradient_mismatch``,
which compares the STE gradient with the full-precision gradient at the same weights.

The package: ``layer`` (BitNetConfig, the STEs, ElasticBinarize, BitLinear), ``quantize``
(``quantize_`` and the warm-up), ``embedding`` (k-bit group embeddings), ``lora`` and
``mismatch``; everything is importable from ``labutils.bitlinear``.
"""

from labutils.bitlinear.embedding import GroupQuantEmbedding, GroupQuantEmbeddingBag, quantize_embeddings_
from labutils.bitlinear.layer import (
    ACT_BINARIZERS,
    DEFAULT_SKIP,
    NORMS,
    STES,
    BitLinear,
    BitNetConfig,
    ElasticBinarize,
    straight_through,
)
from labutils.bitlinear.lora import LoRA, add_lora_
from labutils.bitlinear.mismatch import GradientMismatch, gradient_mismatch
from labutils.bitlinear.quantize import (
    QuantizeReport,
    bitlinear_layers,
    linear_warmup_lambda,
    quant_strength_context,
    quantize_,
    set_quant_strength,
)

__all__ = [
    "BitNetConfig",
    "BitLinear",
    "ACT_BINARIZERS",
    "ElasticBinarize",
    "GroupQuantEmbedding",
    "GroupQuantEmbeddingBag",
    "quantize_embeddings_",
    "QuantizeReport",
    "quantize_",
    "DEFAULT_SKIP",
    "bitlinear_layers",
    "set_quant_strength",
    "quant_strength_context",
    "linear_warmup_lambda",
    "straight_through",
    "LoRA",
    "add_lora_",
    "GradientMismatch",
    "gradient_mismatch",
    "NORMS",
    "STES",
]
