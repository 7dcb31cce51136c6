"""Layer sensitivity and mixed precision: which linear layers to keep in 8 bits.

Post-training quantization of a pretrained model does not hurt every layer alike. This module
measures it one layer at a time and builds mixed-precision plans from the measurement:

- ``quantize_to(w, bits)``: the weight as the book quantizes it at ``bits`` (dequantized):
  1.58 = BitNet b1.58 absmean ternary, one scale per tensor (``quant.ternarize_absmean``);
  8 = symmetric absmax int8, one scale per output channel (``quant.fake_quantize``);
  32 = the float32 weight unchanged.
- ``precision(model, plan)``: a context manager in which the named ``nn.Linear`` weights are
  replaced by ``quantize_to(original, plan[name])``; the originals come back on exit. Weights
  only: activations, biases, norms and embeddings stay in full precision.
- ``layer_sensitivity(model, evaluate, names)``: ``evaluate(model)`` with one layer at a time
  quantized, everything else untouched.
- ``mixed_precision_plan(names, keep)``: every layer ternary except ``keep``, in int8;
  ``average_bits(shapes, plan)`` is its storage cost in bits per weight, scales included.
- ``mean_pooled_embeddings`` (sentence-transformers' mean pooling) and ``fit_logistic_probe``
  (a seeded, full-batch logistic regression in torch) turn an encoder into task metrics:
  cosine similarity to the float32 embeddings and the accuracy of a sentiment probe.

Chapter 2 runs these on MiniLM and IMDb reviews, in its "Going further" section (which layers
to keep in 8 bits).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from labutils import quant

__all__ = [
    "SUPPORTED_BITS",
    "LogisticProbe",
    "average_bits",
    "block_and_kind",
    "fit_logistic_probe",
    "layer_bits",
    "layer_sensitivity",
    "mean_pooled_embeddings",
    "mixed_precision_plan",
    "precision",
    "quantize_to",
]

# 1.58: ternary absmean per tensor; 8: int8 absmax per output channel; 32: float32, unchanged.
SUPPORTED_BITS = (1.58, 8, 32)
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def _check_bits(bits: object) -> float:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits must be one of {SUPPORTED_BITS} (ternary absmean, int8 per channel, float32), "
            f"got {bits!r}"
        )
    return float(bits)


def quantize_to(weight: torch.Tensor, bits: float) -> torch.Tensor:
    """``weight`` quantized to ``bits`` and dequantized: same shape and dtype as ``weight``.

    Args:
        weight: float tensor ``[out_features, in_features]`` (any float dtype).
        bits: 1.58 (BitNet b1.58 absmean ternary, ``γ·T`` with one ``γ = mean|W|`` per tensor),
            8 (symmetric absmax int8, codes in -127..127, one scale per output row) or 32 (the
            weight itself, returned as a copy).

    Raises:
        ValueError: ``bits`` is not in ``SUPPORTED_BITS``, or ``weight`` is not 2-d.
    """
    bits = _check_bits(bits)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-d tensor [out_features, in_features], got {shape}")
    if bits == 32:
        return weight.detach().clone()
    if bits == 8:
        return quant.fake_quantize(weight.detach(), 8, granularity="channel")
    codes, scale = quant.ternarize_absmean(weight.detach())
    return (codes * scale).to(weight.dtype)


def layer_bits(shape: Sequence[int], bits: float) -> float:
    """Storage of one ``[out, in]`` weight at ``bits``, in bits per weight, float32 scales included.

    Ternary codes are counted at log2(3) bits (ideal packing, ``quant.TERNARY_BITS``) plus one
    scale; int8 at 8 bits plus one scale per output row; float32 at 32 bits.
    """
    bits = _check_bits(bits)
    if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in shape):
        raise ValueError(f"shape must be [out_features, in_features] of positive ints, got {tuple(shape)!r}")
    out_features, in_features = (int(d) for d in shape)
    numel = out_features * in_features
    if bits == 32:
        return 32.0
    if bits == 8:
        return 8.0 + 32.0 * out_features / numel
    return quant.TERNARY_BITS + 32.0 / numel


def average_bits(shapes: Mapping[str, Sequence[int]], plan: Mapping[str, float]) -> float:
    """Bits per weight of ``plan`` over all the layers of ``shapes``, weighted by their sizes.

    Args:
        shapes: ``{layer name: [out, in]}`` for every layer counted (e.g. the 36 of MiniLM).
        plan: ``{layer name: bits}``; a layer of ``shapes`` missing from ``plan`` counts as 32.

    Raises:
        KeyError: ``plan`` names a layer that ``shapes`` lacks.
    """
    unknown = sorted(set(plan) - set(shapes))
    if unknown:
        raise KeyError(f"plan names layers that shapes lacks: {unknown[:5]}")
    total_bits = sum(layer_bits(s, plan.get(n, 32)) * math.prod(s) for n, s in shapes.items())
    return total_bits / sum(math.prod(s) for s in shapes.values())


def block_and_kind(name: str) -> tuple[int, str]:
    """Split a layer name at its block index: ``"encoder.layer.3.attention.self.query"`` ->
    ``(3, "attention.self.query")``.

    Raises:
        ValueError: the name has no numbered block (``"classifier"``, say).
    """
    match = _BLOCK_INDEX.search(name)
    if match is None:
        raise ValueError(f"{name!r} has no numbered block (expected e.g. 'encoder.layer.3.output.dense')")
    return int(match.group(1)), name[match.end():]


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise KeyError(f"{type(model).__name__} has no layer {name!r}; its nn.Linear layers are e.g. {linears[:4]}") from None
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
    return module


@contextmanager
def precision(model: nn.Module, plan: Mapping[str, float]) -> Iterator[nn.Module]:
    """Quantize the weights of the layers named in ``plan`` for the duration of a ``with`` block.

    ``with precision(model, {"encoder.layer.0.attention.self.query": 1.58}): ...`` runs the
    model with that one weight replaced by ``quantize_to(weight, 1.58)``; every other parameter
    is untouched, and on exit (also on an exception) the original weights are copied back
    bit for bit.

    Args:
        model: any nn.Module; the names are those of ``model.named_modules()``.
        plan: ``{layer name: bits}``, bits in ``SUPPORTED_BITS``.

    Yields:
        ``model`` itself.

    Raises:
        KeyError: a name is not a module of ``model``.
        TypeError: a named module is not an ``nn.Linear``.
        ValueError: bits not in ``SUPPORTED_BITS``.
    """
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a mapping {{layer name: bits}}, got {type(plan).__name__}")
    layers = {name: (_linear(model, name), _check_bits(bits)) for name, bits in plan.items()}
    originals = {name: layer.weight.detach().clone() for name, (layer, _) in layers.items()}
    try:
        with torch.no_grad():
            for name, (layer, bits) in layers.items():
                layer.weight.copy_(quantize_to(originals[name], bits))
        yield model
    finally:
        with torch.no_grad():
            for name, (layer, _) in layers.items():
                layer.weight.copy_(originals[name])


def layer_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    names: Sequence[str],
    bits: float = 1.58,
    *,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """``evaluate(model)`` with each layer of ``names`` quantized to ``bits`` on its own.

    Args:
        model: the model; it is left exactly as it was.
        evaluate: model -> ``{metric: value}`` (e.g. cosine to the float32 embeddings, accuracy).
        names: the ``nn.Linear`` layers to try, one at a time, in this order.
        bits: the precision each layer gets in turn (default 1.58, ternary).
        progress: show a tqdm bar.

    Returns:
        ``{layer name: {metric: value}}`` in the order of ``names``.

    Raises:
        KeyError / TypeError / ValueError: as ``precision``, checked for every name before the
            first (possibly slow) evaluation; ValueError also for repeated names.
    """
    if isinstance(names, str) or len(set(names)) != len(names):
        raise ValueError("names must be a sequence of distinct layer names")
    _check_bits(bits)
    for name in names:
        _linear(model, name)
    if progress:
        from tqdm.auto import tqdm

        names = tqdm(names, desc=f"{bits}-bit, one layer at a time", leave=False)
    results = {}
    for name in names:
        with precision(model, {name: bits}):
            results[name] = {key: float(value) for key, value in evaluate(model).items()}
    return results


def mixed_precision_plan(
    names: Sequence[str], keep: Sequence[str], *, low: float = 1.58, high: float = 8
) -> dict[str, float]:
    """``{name: low}`` for every layer of ``names``, except ``{name: high}`` for those in ``keep``.

    Raises:
        ValueError: ``keep`` names a layer not in ``names``, repeats one, or a bit width is not
            in ``SUPPORTED_BITS``.
    """
    low, high = _check_bits(low), _check_bits(high)
    if isinstance(keep, str) or isinstance(names, str):
        raise ValueError("names and keep must be sequences of layer names, not one string")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep repeats a layer: {sorted(n for n in set(keep) if list(keep).count(n) > 1)}")
    unknown = [n for n in keep if n not in set(names)]
    if unknown:
        raise ValueError(f"keep names layers that are not in names: {unknown[:5]}")
    kept = set(keep)
    return {name: (high if name in kept else low) for name in names}


@torch.inference_mode()
def mean_pooled_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, batch_size: int = 64
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: the mean of the
    last hidden states over the real (non-padding) tokens.

    Args:
        model: a Hugging Face encoder (``model(input_ids=, attention_mask=).last_hidden_state``).
        input_ids, attention_mask: int64 ``[N, L]``.
        batch_size: rows per forward pass (the result does not depend on it beyond rounding).

    Returns:
        float32 ``[N, hidden]``.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if bool((attention_mask.sum(1) == 0).any()):
        raise ValueError("every row needs at least one token with attention_mask 1")
    pooled = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(pooled)


@dataclass(frozen=True)
class LogisticProbe:
    """A linear classifier ``p(y = 1 | x) = sigmoid(((x - mean) / std) · weight + bias)``.

    ``mean``, ``std``, ``weight``: float64 ``[D]``; ``bias``: float64 ``[]``. The standardization
    uses the training features' statistics, so the probe reads the embeddings as they were fitted.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float64 ``[N]`` logits for features ``x`` ``[N, D]``."""
        if x.dim() != 2 or x.shape[1] != self.weight.numel():
            raise ValueError(f"x must be [N, {self.weight.numel()}], got {tuple(x.shape)}")
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """int64 ``[N]`` labels in {0, 1}."""
        return (self.logits(x) > 0).long()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of rows of ``x`` whose predicted label equals ``y`` (int ``[N]``)."""
        y = _check_labels(y, x.shape[0])
        return float((self.predict(x) == y).double().mean())


def _check_labels(y: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.shape != (n,):
        raise ValueError(f"y must be a tensor of shape [{n}], got {getattr(y, 'shape', type(y).__name__)}")
    if y.is_floating_point() or not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("y must hold integer labels 0 and 1")
    return y.long()


def fit_logistic_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200) -> LogisticProbe:
    """Fit a logistic-regression probe on features ``x`` ``[N, D]`` and labels ``y`` ``[N]`` (0/1).

    Full-batch L-BFGS in float64 from zero weights on standardized features, minimising the mean
    cross-entropy plus ``l2/2·||weight||²``: no randomness, so the same data give the same probe.

    Raises:
        ValueError: shapes disagree, labels are not 0/1, only one class is present, or ``l2 < 0``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be a float tensor [N >= 2, D], got {getattr(x, 'shape', type(x).__name__)}")
    y = _check_labels(y, x.shape[0])
    if y.unique().numel() != 2:
        raise ValueError("y must contain both classes (0 and 1) to fit a probe")
    if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or l2 < 0:
        raise ValueError(f"l2 must be a non-negative number, got {l2!r}")
    features = x.detach().double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-12)
    z, target = (features - mean) / std, y.double()
    weight = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, target)
        loss = loss + 0.5 * l2 * (weight @ weight)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LogisticProbe(mean=mean, std=std, weight=weight.detach(), bias=bias.detach())
