"""Group-wise k-bit embeddings: the quantization-aware twin of the packed file's int4 embedding tables."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labutils import quant
from labutils.bitlinear.layer import straight_through


class GroupQuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose forward pass looks rows up in k-bit group-quantized weights (STE).

    The quantizer is ``labutils.quant.quantize(W, bits, granularity="group", axis=0,
    group_size=g)`` (symmetric absmax over runs of ``g`` values of a row), exactly what
    ``labutils.packfile.save_packed(..., embeddings=f"int{bits}", group_size=g)`` stores. Training
    with it (QAT of the embeddings) lets the rest of the model adapt to the rounding that the
    packed file will apply anyway. ``.weight`` stays the latent float table.
    """

    def __init__(self, *args: Any, bits: int = 4, group_size: int = 128, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        self.bits, self.group_size = bits, min(group_size, self.embedding_dim)
        if self.embedding_dim % self.group_size:
            raise ValueError(f"group_size {group_size} must divide embedding_dim {self.embedding_dim}")

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 4, group_size: int = 128) -> GroupQuantEmbedding:
        """A GroupQuantEmbedding sharing ``embedding``'s weight tensor (same device, dtype, options)."""
        new = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            max_norm=embedding.max_norm,
            norm_type=embedding.norm_type,
            scale_grad_by_freq=embedding.scale_grad_by_freq,
            sparse=embedding.sparse,
            _weight=embedding.weight.detach(),  # no fresh random table
            bits=bits,
            group_size=group_size,
        )
        new.weight = embedding.weight  # the same Parameter: ties and optimizer state carry over
        return new.train(embedding.training)

    def quantized_weight(self) -> torch.Tensor:
        """The dequantized k-bit table [num_embeddings, embedding_dim] the forward pass reads."""
        qt = quant.quantize(self.weight.detach().float(), self.bits, granularity="group", axis=0,
                            group_size=self.group_size)  # fmt: skip
        return quant.dequantize(qt).to(self.weight.dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, self.quantized_weight())
        return F.embedding(input, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{self.bits} groups of {self.group_size}"


def quantize_embeddings_(model: nn.Module, bits: int = 4, group_size: int = 128) -> list[str]:
    """Replace every ``nn.Embedding`` of ``model`` by a GroupQuantEmbedding (weights shared), in
    place; return the names replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Embedding]
    if not chosen:
        raise ValueError(f"quantize_embeddings_ found no nn.Embedding in {type(model).__name__}")
    for name, embedding in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, GroupQuantEmbedding.from_embedding(embedding, bits, group_size))
    return [name for name, _ in chosen]
