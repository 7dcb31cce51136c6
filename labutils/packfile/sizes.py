"""``size_report``: the bytes of one model stored as fp32, fp16, int8, 2-bit, 1.6-bit and 1-bit."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from labutils.packfile.format import FLOAT_DTYPES, _codes_nbytes, _group_size_for, _join, _parse_int_bits, _roles

# --------------------------------------------------------------------------------------------
# Size report
# --------------------------------------------------------------------------------------------

VARIANTS = {  # variant -> (storage of the linear weights, bits per weight)
    "fp32": ("fp32", 32.0),
    "fp16": ("fp16", 16.0),
    "int8": ("int8", 8.0),
    "2-bit": ("ternary2", 2.0),
    "1.6-bit": ("ternary3", 1.6),
    "1-bit": ("binary", 1.0),
}


@dataclass(frozen=True)
class SizeRow:
    """Bytes of one storage variant of a model (tensor data only; the file adds its header)."""

    variant: str
    bits_per_weight: float  # of the linear weights
    embeddings: int
    linear: int
    rest: int

    @property
    def total(self) -> int:
        return self.embeddings + self.linear + self.rest

    def share(self, part: str) -> float:
        """Fraction of ``total`` taken by ``part`` in {"embeddings", "linear", "rest"}."""
        return getattr(self, part) / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["total"] = self.total
        row.update({f"share_{p}": self.share(p) for p in ("embeddings", "linear", "rest")})
        return row


def size_report(
    model: nn.Module,
    *,
    float_dtype: str = "fp16",
    embeddings: str = "float",
    group_size: int = 64,
    per_channel: bool = False,
) -> list[SizeRow]:
    """Bytes of ``model`` stored as fp32, fp16, int8, 2-bit, 1.6-bit and 1-bit, by part.

    The parts: "linear" = the weights of the quantizable linear layers (the BitLinear layers if
    the model has any, else every nn.Linear) plus their float32 scales; "embeddings" = the
    nn.Embedding weights; "rest" = everything else of the state dict (norms, biases, float
    heads, buffers), tied tensors counted once. The fp32 and fp16 rows store everything in that
    float type. The quantized rows store the linear weights packed (int8: 1 byte, 2-bit:
    ceil(n/4), 1.6-bit: ceil(n/5), 1-bit: ceil(n/8)) plus 4 bytes per scale (a BitLinear's own
    scale count; else 1 per tensor, or 1 per output row with ``per_channel``), the embeddings
    as ``embeddings`` ("float" in ``float_dtype``, or "int{k}": ceil(n*k/8) + 4 per group) and the
    rest in ``float_dtype``. These are exactly the data bytes ``save_packed`` writes with the
    same options (check: file size = 8 + header length + ``total``).

    Returns:
        one SizeRow per variant, in the order fp32, fp16, int8, 2-bit, 1.6-bit, 1-bit.
    """
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {tuple(FLOAT_DTYPES)}, got {float_dtype!r}")
    embedding_bits = None if embeddings == "float" else _parse_int_bits(embeddings, "embeddings")
    bitlinears, embedding_names, aliases = _roles(model)
    if bitlinears:
        linears = {n: m.quantized_weight()[1].numel() for n, m in bitlinears.items()}
    else:
        linears = {
            _join(n, "weight"): (m.out_features if per_channel else 1)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear)
        }
    float_bytes = FLOAT_DTYPES[float_dtype].itemsize

    rows = []
    for variant, (storage, bits) in VARIANTS.items():
        parts = {"embeddings": 0, "linear": 0, "rest": 0}
        for name, tensor in model.state_dict().items():
            if name in aliases:
                continue
            n = tensor.numel()
            if not tensor.is_floating_point():
                parts["rest"] += n * tensor.element_size()
            elif storage in ("fp32", "fp16"):
                part = "linear" if name in linears else "embeddings" if name in embedding_names else "rest"
                parts[part] += n * FLOAT_DTYPES[storage].itemsize
            elif name in linears:
                parts["linear"] += _codes_nbytes(n, storage) + 4 * linears[name]
            elif name in embedding_names and embedding_bits is not None:
                size = _group_size_for(tuple(tensor.shape), group_size, name)
                parts["embeddings"] += -(-n * embedding_bits // 8) + 4 * (n // size)
            else:
                parts["embeddings" if name in embedding_names else "rest"] += n * float_bytes
        rows.append(SizeRow(variant, bits, **parts))
    return rows


def format_size_report(rows: list[SizeRow]) -> str:
    """The rows of :func:`size_report` as a text table (MB = 10^6 bytes)."""
    base = rows[0].total or 1
    lines = [f"{'variant':<8} {'total MB':>9} {'x smaller':>9} {'embeddings':>10} {'linear':>7} {'rest':>6}"]
    for r in rows:
        lines.append(
            f"{r.variant:<8} {r.total / 1e6:>9.3f} {base / (r.total or 1):>9.2f} "
            f"{100 * r.share('embeddings'):>9.1f}% {100 * r.share('linear'):>6.1f}% {100 * r.share('rest'):>5.1f}%"
        )
    return "\n".join(lines)
