"""Group-wise k-bit embeddings: the quantization-aware twin of the packed file's int4 embedding tables."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labutils import quant
from labutils.bitlinear.layer import straight_through


def _checked_group_size(bits: int, group_size: int, embedding_dim: int) -> int:
    """The group size used (``group_size``, at most one row); ValueError for bad bits or groups."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    used = min(group_size, embedding_dim)
    if embedding_dim % used:
        raise ValueError(f"group_size {group_size} must divide embedding_dim {embedding_dim}")
    return used


def _group_quantized(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The k-bit group-quantized, dequantized copy of a table ``weight`` [rows, dim] (its dtype)."""
    qt = quant.quantize(weight.detach().float(), bits, granularity="group", axis=0, group_size=group_size)
    return quant.dequantize(qt).to(weight.dtype)


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
        self.bits, self.group_size = bits, _checked_group_size(bits, group_size, self.embedding_dim)

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
        return _group_quantized(self.weight, self.bits, self.group_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w = straight_through(self.weight, self.quantized_weight())
        return F.embedding(input, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{self.bits} groups of {self.group_size}"


class GroupQuantEmbeddingBag(nn.EmbeddingBag):
    """``nn.EmbeddingBag`` (pooled lookups, as in ``labutils.models.BagOfEmbeddings``) that reads
    the same k-bit group-quantized table as ``GroupQuantEmbedding``, with the same STE.

    Input and output are ``nn.EmbeddingBag``'s: int64 ids [B, L] (or 1-D with ``offsets``) ->
    float [B, embedding_dim], the pooled rows of the quantized table. ``.weight`` stays the latent
    float table.
    """

    def __init__(self, *args: Any, bits: int = 4, group_size: int = 128, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bits, self.group_size = bits, _checked_group_size(bits, group_size, self.embedding_dim)

    @classmethod
    def from_embedding_bag(cls, bag: nn.EmbeddingBag, bits: int = 4, group_size: int = 128) -> GroupQuantEmbeddingBag:
        """A GroupQuantEmbeddingBag sharing ``bag``'s weight tensor (same mode, padding and options)."""
        new = cls(
            bag.num_embeddings,
            bag.embedding_dim,
            max_norm=bag.max_norm,
            norm_type=bag.norm_type,
            scale_grad_by_freq=bag.scale_grad_by_freq,
            mode=bag.mode,
            sparse=bag.sparse,
            _weight=bag.weight.detach(),  # no fresh random table
            include_last_offset=bag.include_last_offset,
            padding_idx=bag.padding_idx,
            bits=bits,
            group_size=group_size,
        )
        new.weight = bag.weight  # the same Parameter: ties and optimizer state carry over
        return new.train(bag.training)

    def quantized_weight(self) -> torch.Tensor:
        """The dequantized k-bit table [num_embeddings, embedding_dim] the forward pass reads."""
        return _group_quantized(self.weight, self.bits, self.group_size)

    def forward(
        self, input: torch.Tensor, offsets: torch.Tensor | None = None, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        w = straight_through(self.weight, self.quantized_weight())
        return F.embedding_bag(
            input, w, offsets, max_norm=self.max_norm, norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq, mode=self.mode, sparse=self.sparse,
            per_sample_weights=per_sample_weights, include_last_offset=self.include_last_offset,
            padding_idx=self.padding_idx,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int{self.bits} groups of {self.group_size}"


def quantize_embeddings_(model: nn.Module, bits: int = 4, group_size: int = 128) -> list[str]:
    """Replace every ``nn.Embedding`` of ``model`` by a GroupQuantEmbedding and every
    ``nn.EmbeddingBag`` by a GroupQuantEmbeddingBag (weights shared), in place; return the names
    replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Embedding, nn.EmbeddingBag)]
    if not chosen:
        raise ValueError(f"quantize_embeddings_ found no nn.Embedding or nn.EmbeddingBag in {type(model).__name__}")
    for name, embedding in chosen:
        parent, _, child = name.rpartition(".")
        if type(embedding) is nn.EmbeddingBag:
            new = GroupQuantEmbeddingBag.from_embedding_bag(embedding, bits, group_size)
        else:
            new = GroupQuantEmbedding.from_embedding(embedding, bits, group_size)
        setattr(model.get_submodule(parent), child, new)
    return [name for name, _ in chosen]
