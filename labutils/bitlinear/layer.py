"""The BitLinear layer and its configuration: codes and scales in the forward pass, the STE in the backward."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labutils import quant

NORMS = ("rms", "layer", None)
STES = ("identity", "clipped")
ACT_BINARIZERS = ("sign_mean", "elastic")
DEFAULT_SKIP = ("classifier", "pooler", "lm_head")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BitNetConfig:
    """How a BitLinear quantizes.

    Attributes:
        weight_bits: 1 (sign · mean|W|), 1.58 (ternary absmean, BitNet b1.58) or an int 2..8
            (symmetric absmax, codes in -Qp..Qp with Qp = 2^(k-1) - 1).
        act_bits: bits of the per-token activation quantizer: 1 (sign · mean|x| per token, the
            fully binary W1A1 layer of XNOR-Net/BinaryBERT), an int 2..16 (absmax), or None for
            full-precision activations.
        per_channel: one weight scale per output row ([out, 1]) instead of one per tensor ([]).
        norm: "rms" (RMSNorm, BitNet b1.58), "layer" (LayerNorm, BitNet's SubLN) or None, applied
            to the input over in_features before activation quantization.
        ste: "identity" or "clipped" (see the module docstring).
        eps: the quantizers' eps (ternary divides by γ + eps; absmax floors max|x| at eps), and
            the norm's eps.
        act_binarizer: how 1-bit activations are made (only with ``act_bits == 1``):
            "sign_mean" (default: ``sign(x) · mean|x|`` per token, no parameters) or "elastic"
            (BiT's elastic binarization, Liu et al. 2022: ``α · sign(x - β)`` with a learnable
            scale α per tensor and a learnable shift β per input feature; see ``ElasticBinarize``).
    """

    weight_bits: float = 1.58
    act_bits: int | None = 8
    per_channel: bool = False
    norm: str | None = "rms"
    ste: str = "identity"
    eps: float = 1e-5
    act_binarizer: str = "sign_mean"

    def __post_init__(self) -> None:
        bits = self.weight_bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
            raise TypeError(f"weight_bits must be 1, 1.58 or an int in [2, 8], got {bits!r}")
        if not (bits in (1, 1.58) or (float(bits).is_integer() and 2 <= bits <= 8)):
            raise ValueError(f"weight_bits must be 1, 1.58 or an int in [2, 8], got {bits!r}")
        act = self.act_bits
        if act is not None and (isinstance(act, bool) or not isinstance(act, numbers.Integral)):
            raise TypeError(f"act_bits must be 1, an int in [2, 16] or None, got {act!r}")
        if act is not None and not 1 <= act <= 16:
            raise ValueError(f"act_bits must be 1, an int in [2, 16] or None, got {act!r}")
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {self.per_channel!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.ste not in STES:
            raise ValueError(f"ste must be one of {STES}, got {self.ste!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real) or not self.eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if self.act_binarizer not in ACT_BINARIZERS:
            raise ValueError(f"act_binarizer must be one of {ACT_BINARIZERS}, got {self.act_binarizer!r}")
        if self.act_binarizer == "elastic" and self.act_bits != 1:
            raise ValueError(
                f"act_binarizer 'elastic' binarizes activations: it needs act_bits=1, got act_bits={self.act_bits!r}"
            )

    @property
    def saturation(self) -> float:
        """``c``: the clipped STE passes gradient where ``|W / s_W| <= c``."""
        return 1.0 if self.weight_bits in (1, 1.58) else float(2 ** (int(self.weight_bits) - 1) - 1)

    def describe(self) -> str:
        """One line, e.g. ``1.58-bit weights (per tensor), 8-bit activations, rms norm, identity STE``."""
        acts = f"{self.act_bits}-bit activations" if self.act_bits else "full-precision activations"
        if self.act_binarizer == "elastic":
            acts = "1-bit elastic activations (BiT: α·sign(x - β), learnable α, β)"
        scale = "per channel" if self.per_channel else "per tensor"
        bits = "1.58" if self.weight_bits == 1.58 else str(int(self.weight_bits))
        return f"{bits}-bit weights ({scale}), {acts}, {self.norm or 'no'} norm, {self.ste} STE"


# --------------------------------------------------------------------------- the STE


def straight_through(
    x: torch.Tensor, x_q: torch.Tensor, strength: float = 1.0, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """The value of ``x + strength·(x_q - x)`` with the gradient ``keep`` (1 where None) w.r.t. ``x``.

    The detach trick: ``target.detach() + keep·(x - x.detach())``. The second term is exactly 0 in
    the forward pass, so the value is bit-exact ``x_q`` at ``strength == 1``, and its gradient is
    ``keep`` (the identity STE when ``keep`` is None).

    Args:
        x: float tensor (the latent values, may require grad).
        x_q: float tensor of x's shape: the quantized values.
        strength: λ in [0, 1], the quantization warm-up blend (1 = fully quantized).
        keep: None, or a 0/1 tensor broadcastable to x: where the gradient passes (clipped STE).

    Returns:
        tensor of x's shape and dtype.
    """
    target = x_q if strength == 1 else x + strength * (x_q - x)
    passthrough = x - x.detach()
    if keep is not None:
        passthrough = passthrough * keep
    return target.detach() + passthrough


# --------------------------------------------------------------------------- elastic binarization


class ElasticBinarize(torch.autograd.Function):
    """BiT's elastic binarization of signed activations (Liu et al., NeurIPS 2022, "BiT"), 1 bit.

    Forward (α is clamped at ``eps`` from below, as BiT does)::

        x̂ = α · sign(x - β)            sign(0) := +1 (the bit the popcount kernels store)

    BiT writes it ``α · sign((x - β) / α)``, the same thing for α > 0. Backward, BiT's STE (the
    ``ElasticQuantBinarizerSigned`` of facebookresearch/bit with num_bits = 1, Qn = -1, Qp = 1,
    and its ``LearnableBias`` shift, here subtracted)::

        m      = 1[|x - β| <= α]                                    (inside the clip range)
        dL/dx  = g · m                                              (clipped STE)
        dL/dβ  = -Σ_{tokens} g · m                                  (β enters as x - β)
        dL/dα  = s · Σ_{all} g · sign(x - β),   s = 1 / sqrt(x.numel())

    where ``g = dL/dx̂``. ``s`` is the gradient scale of Learned Step-size Quantization
    (Esser et al., 2020; ``1 / sqrt(N · Qp)`` with Qp = 1) that BiT keeps: α receives a sum over
    every element of the batch, and the scale keeps its step comparable to the other parameters'.
    (``d(α·sign(u))/dα = sign(u)``: for one bit, BiT's α gradient is the exact one.)

    Args (``apply``):
        x: float tensor [..., d] (any leading dims: batch, tokens).
        alpha: float tensor [] (one scale per tensor).
        beta: float tensor [d] (one shift per input feature).
        eps: float, the floor of α.

    Returns:
        float tensor of x's shape and dtype. Computed in float32 whatever the inputs' dtypes
        (bf16 autocast included); the gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        u = x.to(torch.float32) - beta.to(torch.float32)
        a = alpha.to(torch.float32).clamp_min(eps)
        codes = torch.where(u >= 0, 1.0, -1.0)
        ctx.save_for_backward(u, a)
        ctx.dtypes = (x.dtype, alpha.dtype, beta.dtype)
        return (codes * a).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, a = ctx.saved_tensors
        x_dtype, alpha_dtype, beta_dtype = ctx.dtypes
        g = grad.to(torch.float32)
        inside = (u.abs() <= a).to(torch.float32)
        g_x = g * inside
        g_beta = -g_x.reshape(-1, u.shape[-1]).sum(dim=0) if ctx.needs_input_grad[2] else None
        g_alpha = None
        if ctx.needs_input_grad[1]:
            codes = torch.where(u >= 0, 1.0, -1.0)
            g_alpha = (g * codes).sum() / math.sqrt(max(u.numel(), 1))
        return (
            g_x.to(x_dtype) if ctx.needs_input_grad[0] else None,
            None if g_alpha is None else g_alpha.to(alpha_dtype),
            None if g_beta is None else g_beta.to(beta_dtype),
            None,
        )


# --------------------------------------------------------------------------- the layer


@dataclass(frozen=True)
class _QuantizedWeight:
    codes: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [] or [out, 1]
    values: torch.Tensor  # codes * scale in the weight's dtype
    keep: torch.Tensor | None  # clipped-STE mask, weight dtype, or None


@dataclass
class _Pin:
    """Codes and scale loaded from a packed file, used instead of quantizing the latent weight.

    BitNet's quantizers measure their scale from the latent weight (mean|W|, max|W|), so no
    latent weight in bf16/fp16 need quantize back to a given float32 scale; the pin sidesteps the
    search. It holds while the latent weight is the one ``pin_quantized_weight`` wrote (moved or
    cast to another device or dtype counts as the same); the first change (an optimizer step, a
    state-dict load) drops it and the layer quantizes its latent weight again.
    """

    codes: torch.Tensor  # int8 [out, in], on the CPU
    scale: torch.Tensor  # float32 [] or [out, 1], on the CPU
    dtype: torch.dtype  # the latent weight's dtype when pinned
    key: tuple | None  # the weight's identity when last verified (see BitLinear._weight_key)

    def latent(self) -> torch.Tensor:
        """The latent weight written at pin time, in ``dtype``: ``codes * scale`` rescaled per group
        so that quantizing it again gives back (to rounding) the same codes and scale."""
        codes = self.codes.to(torch.float32)
        groups = codes.reshape(self.scale.numel(), -1)
        if groups.abs().max() <= 1:  # mean-like scales (ternary, sign): mean|W| must come out as scale
            mean = groups.abs().mean(dim=1, keepdim=True).clamp_min(1e-12)
            return (groups * (self.scale.reshape(-1, 1) / mean)).reshape(codes.shape).to(self.dtype)
        return (codes * self.scale).to(self.dtype)  # max-like scales (k-bit absmax): max|W| = Qp·scale

    def holds_for(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is still the pinned latent (possibly cast to another dtype or moved)."""
        return torch.equal(weight.detach().cpu(), self.latent().to(weight.dtype))


class BitLinear(nn.Linear):
    """``nn.Linear`` with quantized weights and activations in the forward pass (see module doc).

    ``.weight`` / ``.bias`` are the latent full-precision parameters (what the optimizer
    updates); ``.norm`` is an RMSNorm/LayerNorm over in_features, or None; ``.config`` is the
    BitNetConfig; ``.quant_strength`` is the warm-up λ (1 = fully quantized, 0 = plain linear).

    When the weight cannot change (eval mode, or a frozen weight) the quantized weight is
    computed once and cached; the cache is keyed on the weight's storage, version counter
    (bumped by every in-place update: optimizer steps, ``load_state_dict``), dtype and device, and
    dropped on ``train()``. A write through ``weight.data`` bypasses the version counter: call
    ``invalidate_cache()`` after one.

    Input [..., in_features] (float) -> output [..., out_features], the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        config: BitNetConfig | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        config = BitNetConfig() if config is None else config
        if not isinstance(config, BitNetConfig):
            raise TypeError(f"config must be a BitNetConfig, got {type(config).__name__}")
        self.config = config
        self.norm: nn.Module | None = None
        if config.norm == "rms":
            self.norm = nn.RMSNorm(in_features, eps=config.eps, device=device, dtype=dtype)
        elif config.norm == "layer":
            self.norm = nn.LayerNorm(in_features, eps=config.eps, device=device, dtype=dtype)
        if config.act_binarizer == "elastic":
            # BiT: α one per tensor, so that it factors out of the dot product (the XNOR-popcount
            # kernel still applies, α scales its output once); β one per input feature, a
            # threshold per channel, subtracted before the sign (free in the kernel too). α is
            # set from the data at the first quantizing forward (``act_alpha_initialized``).
            self.act_alpha = nn.Parameter(torch.ones((), device=device, dtype=dtype))
            self.act_beta = nn.Parameter(torch.zeros(in_features, device=device, dtype=dtype))
            self.register_buffer("act_alpha_initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._act_ready = False  # act_alpha_initialized known to be true (saves a device sync per step)
        self.quant_strength = 1.0
        self._cache: _QuantizedWeight | None = None
        self._cache_key: tuple | None = None
        self._pin: _Pin | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: BitNetConfig | None = None) -> BitLinear:
        """A BitLinear whose latent weight and bias are copies of ``linear``'s (same device, dtype, mode)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            config=config,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.weight.requires_grad_(w.requires_grad)
        return layer.train(linear.training)

    # ---- weight quantization

    def _quantize_weight(self) -> _QuantizedWeight:
        """Codes, scale, ``codes * scale`` and the clipped-STE mask of the current weight (or of
        the pinned codes and scale, see ``pin_quantized_weight``)."""
        cfg, w = self.config, self.weight.detach()
        if self._pin is not None:
            codes, scale = self._pin.codes.to(w.device), self._pin.scale.to(w.device)
        elif cfg.weight_bits == 1.58:
            codes, scale = quant.ternarize_absmean(w, per_channel=cfg.per_channel, eps=cfg.eps)
        elif cfg.weight_bits == 1:
            codes, scale = quant.binarize_sign(w, per_channel=cfg.per_channel)
        else:
            qt = quant.quantize(
                w,
                int(cfg.weight_bits),
                symmetric=True,
                granularity="channel" if cfg.per_channel else "tensor",
            )
            codes, scale = qt.codes, qt.scale
        scale = scale.reshape(-1, 1) if cfg.per_channel else scale.reshape(())
        values = (codes.to(torch.float32) * scale).to(w.dtype)
        keep = None
        if cfg.ste == "clipped":
            keep = (w.to(torch.float32).abs() <= cfg.saturation * scale).to(w.dtype)
        return _QuantizedWeight(codes.to(torch.int8), scale, values, keep)

    def _weight_key(self) -> tuple:
        w = self.weight
        return (id(w), w.data_ptr(), w._version, w.dtype, w.device)

    def _check_pin(self, key: tuple) -> None:
        """Drop the pin once the latent weight is no longer the pinned one. Compared only when the
        weight's identity changed (an optimizer step, a move, a cast), so the common case is free."""
        if self._pin is not None and self._pin.key != key:
            if self._pin.holds_for(self.weight):
                self._pin.key = key
            else:
                self._pin = None

    def _cached_quantized_weight(self) -> _QuantizedWeight:
        w, key = self.weight, self._weight_key()
        self._check_pin(key)
        if self.training and w.requires_grad:
            return self._quantize_weight()  # the weight changes at every step
        if self._cache is None or self._cache_key != key:
            self._cache, self._cache_key = self._quantize_weight(), key
        return self._cache

    def invalidate_cache(self) -> None:
        """Forget the cached quantized weight (needed only after writing through ``weight.data``)."""
        self._cache, self._cache_key = None, None
        if self._pin is not None:
            self._pin.key = None  # re-verify the pin against the weight at the next use

    @property
    def pinned(self) -> bool:
        """True while the layer uses codes and scale given to ``pin_quantized_weight``."""
        self._check_pin(self._weight_key())
        return self._pin is not None

    def pin_quantized_weight(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Use exactly ``codes * scale`` as the quantized weight, e.g. as loaded from a packed file.

        The latent weight becomes ``codes * scale`` rescaled so that quantizing it gives back
        these codes and (to rounding) this scale, so training can resume from it; the forward pass
        uses the pinned codes and scale themselves, bit for bit, in every dtype, until the latent
        weight changes (an optimizer step, ``load_state_dict``; moving or casting the layer
        keeps the pin).

        Args:
            codes: integer tensor [out_features, in_features] with values the config allows
                ({-1, 0, 1} for 1.58 bits, {-1, 1} for 1 bit, [-Qp, Qp] for k bits).
            scale: float tensor [] (per tensor) or [out_features, 1] / [out_features]
                (``config.per_channel``), finite and >= 0.

        Raises:
            TypeError / ValueError: a wrong dtype, shape or value, before anything changes.
        """
        pin = self._checked_pin(codes, scale)
        with torch.no_grad():
            self.weight.copy_(pin.latent().to(self.weight.device))
        self.invalidate_cache()
        pin.key = self._weight_key()
        self._pin = pin

    def check_quantized_weight(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Raise TypeError / ValueError unless ``pin_quantized_weight(codes, scale)`` would accept
        them; changes nothing (lets a loader validate every layer before it assigns any)."""
        self._checked_pin(codes, scale)

    def _checked_pin(self, codes: torch.Tensor, scale: torch.Tensor) -> _Pin:
        shape = (self.out_features, self.in_features)
        if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
        if tuple(codes.shape) != shape:
            raise ValueError(f"codes must have shape {list(shape)}, got {list(codes.shape)}")
        if not isinstance(scale, torch.Tensor) or not scale.dtype.is_floating_point:
            raise TypeError(f"scale must be a float tensor, got {getattr(scale, 'dtype', type(scale))}")
        groups = self.out_features if self.config.per_channel else 1
        if scale.numel() != groups or (self.config.per_channel and scale.dim() not in (1, 2)):
            raise ValueError(
                f"scale must have {'shape [out_features, 1]' if self.config.per_channel else 'one element'} "
                f"({self.config.describe()}), got shape {list(scale.shape)}"
            )
        scale = scale.detach().to("cpu", torch.float32).reshape((-1, 1) if self.config.per_channel else ())
        if not (torch.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError("scale must be finite and >= 0")
        bits = self.config.weight_bits
        high = 1 if bits in (1, 1.58) else 2 ** (int(bits) - 1) - 1
        codes = codes.detach().cpu()
        if codes.numel() and (int(codes.min()) < -high or int(codes.max()) > high):
            raise ValueError(f"codes must lie in [{-high}, {high}] for {bits}-bit weights")
        if bits == 1 and (codes == 0).any():
            raise ValueError("1-bit codes must be -1 or +1, found 0")
        return _Pin(codes.to(torch.int8, copy=True), scale.clone(), self.weight.dtype, None)

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [out, in], scale float32 [] or [out, 1]); ``codes.float() * scale`` is the
        weight the forward pass uses (at ``quant_strength == 1``). Detached; cached when possible."""
        q = self._cached_quantized_weight()
        return q.codes, q.scale

    # ---- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] -> [..., out_features]: norm, quantize x and W (with STE), linear."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}"
            )
        if self.norm is not None:
            x = self.norm(x)
        lam = self.quant_strength
        if lam == 0:
            return F.linear(x, self.weight, self.bias)
        act_bits = self.config.act_bits
        if act_bits is not None and x.numel() and self.config.act_binarizer == "elastic":
            self._init_elastic(x)
            x_q = ElasticBinarize.apply(x, self.act_alpha, self.act_beta, self.config.eps)
            x = x_q if lam == 1 else x + lam * (x_q - x)
        elif act_bits is not None and x.numel():  # an empty batch has nothing to quantize (as nn.Linear)
            if act_bits == 1:
                codes, scale = quant.binarize_activations(x.detach())
            else:
                codes, scale = quant.quantize_activations_absmax(x.detach(), act_bits, eps=self.config.eps)
            x = straight_through(x, (codes.to(torch.float32) * scale).to(x.dtype), lam)
        q = self._cached_quantized_weight()
        w = straight_through(self.weight, q.values, lam, q.keep)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def _init_elastic(self, x: torch.Tensor) -> None:
        """BiT's data initialization of α, once: ``α = 2 · mean|x - β|`` over the whole first batch
        that is quantized (BiT's ``AlphaInit``: LSQ's ``2·mean|x| / sqrt(Qp)`` with Qp = 1). The flag
        is a buffer, so a loaded state dict (trained α) is never overwritten."""
        if self._act_ready:
            return
        if not bool(self.act_alpha_initialized):
            u = x.detach().to(torch.float32) - self.act_beta.detach().to(torch.float32)
            self.act_alpha.fill_(float(2 * u.abs().mean()))
            self.act_alpha_initialized.fill_(True)
        self._act_ready = True

    def elastic_activation_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α float32 [] clamped at eps, β float32 [in_features]), detached: what the forward pass
        uses for ``act_binarizer == "elastic"``. Raises ValueError for other layers."""
        if self.config.act_binarizer != "elastic":
            raise ValueError(f"this BitLinear has no elastic activations ({self.config.describe()})")
        if not bool(self.act_alpha_initialized):
            raise ValueError("act_alpha is not initialized yet: run one forward pass (or load a trained state) first")
        alpha = self.act_alpha.detach().to(torch.float32).clamp_min(self.config.eps)
        return alpha, self.act_beta.detach().to(torch.float32)

    # ---- cache invalidation

    def train(self, mode: bool = True) -> BitLinear:
        self.invalidate_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.invalidate_cache()
        self._pin = None  # new latent weights: quantize them
        self._act_ready = False  # a loaded act_alpha_initialized decides again
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.config.describe()}"
