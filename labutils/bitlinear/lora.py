"""LoRA adapters on frozen BitLinear layers: a low-rank float update beside the ternary weights."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from labutils.bitlinear.quantize import _matches, _patterns, bitlinear_layers


class LoRA(nn.Module):
    """A frozen base layer plus a trainable full-precision low-rank update (Hu et al., 2021).

    ``y = base(x) + (alpha / rank) · x A^T B^T`` with A [rank, in] (Kaiming-uniform, seeded) and
    B [out, rank] (zeros, so the wrapped model starts exactly at the base). The base's
    parameters are frozen, so a BitLinear base quantizes its weight once and caches it.

    Input [..., in_features] -> output [..., out_features].
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, *, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear or BitLinear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not isinstance(alpha, numbers.Real) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        w = base.weight
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))

    @property
    def scaling(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out]: base(x) + scaling · (x A^T) B^T."""
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora_(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, *, skip: str | Sequence[str] = (), seed: int = 0
) -> list[str]:
    """Wrap every BitLinear of ``model`` (except names matching ``skip``) in LoRA, in place.

    The BitLinear weights become frozen; the other parameters of the model (a classifier head,
    say) keep their requires_grad. Layer i's A is seeded with ``seed + i``.
    Returns the qualified names of the wrapped layers.
    """
    skip = _patterns(skip, "skip") or ()
    targets = [(n, m) for n, m in bitlinear_layers(model) if not any(_matches(n, p) for p in skip)]
    if not targets:
        raise ValueError(f"add_lora_ found no BitLinear to wrap in {type(model).__name__} (skip={skip})")
    for i, (name, layer) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRA(layer, rank, alpha, seed=seed + i))
    return [name for name, _ in targets]
