"""``quantize_(model, config)``: a model's ``nn.Linear`` layers swapped for BitLinear in place, and the quantization warm-up."""

from __future__ import annotations

import contextlib
import fnmatch
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from labutils.bitlinear.layer import DEFAULT_SKIP, BitLinear, BitNetConfig


@dataclass
class QuantizeReport:
    """What ``quantize_`` did.

    Attributes:
        config: the BitNetConfig of the new layers.
        replaced: qualified names of the nn.Linear layers now BitLinear.
        skipped: qualified names of the nn.Linear layers kept in full precision.
        replaced_params: weight + bias elements of the replaced layers.
        norm_params: elements of the norms the new layers added.
        total_params: all parameter elements of the model after conversion.
    """

    config: BitNetConfig
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    replaced_params: int = 0
    norm_params: int = 0
    total_params: int = 0

    @property
    def quantized_fraction(self) -> float:
        """Share of the model's parameters that are now quantized weights/biases of BitLinear."""
        return self.replaced_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = [
            f"quantize_: {len(self.replaced)} nn.Linear -> BitLinear [{self.config.describe()}]",
            (
                f"  replaced {self.replaced_params:,} of {self.total_params:,} parameters "
                f"({100 * self.quantized_fraction:.1f}%), added {self.norm_params:,} norm parameters"
            ),
        ]
        lines += [f"  + {name}" for name in self.replaced]
        lines += [f"  = {name} (kept in full precision)" for name in self.skipped]
        return "\n".join(lines)


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) matches the dotted ``name`` or any run of its consecutive components.

    So "pooler" matches "bert.pooler.dense", "attention.self.*" matches
    "bert.encoder.layer.0.attention.self.query", and "classifier" matches "classifier".
    """
    parts = name.split(".")
    return any(
        fnmatch.fnmatchcase(".".join(parts[i:j]), pattern)
        for i in range(len(parts))
        for j in range(i + 1, len(parts) + 1)
    )


def _patterns(value: str | Sequence[str] | None, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    value = (value,) if isinstance(value, str) else tuple(value)
    for p in value:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{name} must be name patterns (non-empty str), got {p!r}")
    return value


def _check_include(model: nn.Module, include: tuple[str, ...]) -> None:
    """Every include pattern must name at least one nn.Linear; say clearly what it named instead."""
    for pattern in include:
        hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, pattern)]
        if any(isinstance(m, nn.Linear) for _, m in hits):
            continue
        if hits:
            named = ", ".join(f"{n} ({type(m).__name__})" for n, m in hits[:5])
            raise TypeError(f"include pattern {pattern!r} names no nn.Linear, only: {named}")
        raise ValueError(f"include pattern {pattern!r} matches no module of {type(model).__name__}")


def quantize_(
    model: nn.Module,
    config: BitNetConfig | None = None,
    *,
    include: str | Sequence[str] | None = None,
    skip: str | Sequence[str] = DEFAULT_SKIP,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> QuantizeReport:
    """Replace the chosen ``nn.Linear`` layers of ``model`` by BitLinear, in place.

    A Linear layer named ``name`` is replaced when it matches an ``include`` pattern (all Linear
    layers when include is None), matches no ``skip`` pattern, and ``filter_fn(module, name)``
    is true (when given). Patterns are fnmatch patterns matched against the dotted name or any
    run of its components (so "pooler" skips "bert.pooler.dense"). The default skip keeps the
    heads of Hugging Face models in full precision: "classifier", "pooler", "lm_head". Layers
    that are already BitLinear are left alone. Latent weights and biases are copies of the
    pretrained ones; embeddings, norms and every other module are untouched.

    Args:
        model: any nn.Module (Hugging Face or plain torch), not itself an nn.Linear.
        config: BitNetConfig of the new layers (default BitNetConfig(): 1.58-bit, 8-bit acts).
        include: pattern(s) of the layers to convert, or None for all.
        skip: pattern(s) of the layers to keep (pass () to convert the heads too).
        filter_fn: optional predicate (module, qualified name) -> bool, torchao-style.

    Returns:
        QuantizeReport (print it for a summary).

    Raises:
        TypeError: model is not an nn.Module, config is not a BitNetConfig, or an include
            pattern names only modules that are not nn.Linear.
        ValueError: an include pattern matches nothing, or nothing is left to replace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    config = BitNetConfig() if config is None else config
    if not isinstance(config, BitNetConfig):
        raise TypeError(f"config must be a BitNetConfig, got {type(config).__name__}")
    if isinstance(model, nn.Linear):
        raise ValueError(
            "model is itself an nn.Linear and cannot be replaced in place; "
            "use BitLinear.from_linear(model, config) instead"
        )
    include, skip = _patterns(include, "include"), _patterns(skip, "skip") or ()
    if include is not None:
        _check_include(model, include)

    report = QuantizeReport(config=config)
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, BitLinear):
            continue
        wanted = (include is None or any(_matches(name, p) for p in include)) and not any(
            _matches(name, p) for p in skip
        )
        if wanted and (filter_fn is None or filter_fn(module, name)):
            chosen.append((name, module))
        else:
            report.skipped.append(name)
    if not chosen:
        n_bit = sum(isinstance(m, BitLinear) for m in model.modules())
        raise ValueError(
            f"nothing to replace in {type(model).__name__}: no nn.Linear left after include={include}, "
            f"skip={skip}, filter_fn ({len(report.skipped)} Linear skipped, {n_bit} already BitLinear)"
        )

    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        new = BitLinear.from_linear(linear, config)
        setattr(model.get_submodule(parent_name), child, new)
        report.replaced.append(name)
        report.replaced_params += sum(p.numel() for p in linear.parameters())
        report.norm_params += sum(p.numel() for p in new.norm.parameters()) if new.norm is not None else 0
    report.total_params = sum(p.numel() for p in model.parameters())
    return report


def bitlinear_layers(model: nn.Module) -> list[tuple[str, BitLinear]]:
    """(qualified name, layer) of every BitLinear in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


def set_quant_strength(model: nn.Module, strength: float) -> int:
    """Set the warm-up λ of every BitLinear: ``w_used = w + λ·(W_q - w)`` (same for activations).

    λ = 0 is the full-precision layer, λ = 1 the quantized one (the gradient is the STE's
    whatever λ). Returns the number of layers set.
    """
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a number in [0, 1], got {strength!r}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    layers = bitlinear_layers(model)
    for _, layer in layers:
        layer.quant_strength = float(strength)
    return len(layers)


@contextlib.contextmanager
def quant_strength_context(model: nn.Module, strength: float) -> Iterator[nn.Module]:
    """Context manager: every BitLinear at λ = ``strength`` inside, its old λ restored after."""
    old = {name: layer.quant_strength for name, layer in bitlinear_layers(model)}
    set_quant_strength(model, strength)
    try:
        yield model
    finally:
        for name, layer in bitlinear_layers(model):
            layer.quant_strength = old.get(name, 1.0)


def linear_warmup_lambda(step: int, warmup_steps: int) -> float:
    """λ for the quantization warm-up: ``min(1, step / warmup_steps)`` (1 when warmup_steps is 0)."""
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got step={step}, warmup_steps={warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)
