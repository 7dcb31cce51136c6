"""The packed file's format: its constants, its one error, and what becomes of each state-dict tensor."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from labutils import packing

FORMAT = "labutils.packfile"
FORMAT_VERSION = 1

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TERNARY_SCHEMES = ("ternary2", "ternary3")
_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
}
_MAX_HEADER = 100 * 2**20


class PackedFileError(ValueError):
    """The one error ``load_packed`` raises: the file is truncated, corrupted, of another format
    version, inconsistent (a missing tensor, a wrong shape), or does not fit the given model.
    The message says which."""


# --------------------------------------------------------------------------------------------
# What becomes of each state-dict tensor
# --------------------------------------------------------------------------------------------


def _is_bitlinear(module: nn.Module) -> bool:
    return callable(getattr(module, "quantized_weight", None)) and hasattr(
        getattr(module, "config", None), "weight_bits"
    )


def _weight_scheme(weight_bits: float, ternary: str) -> str:
    """The packing scheme for a BitLinear with ``weight_bits``: binary, ternary2/3 or int{k}."""
    if math.isclose(weight_bits, 1.58):
        return ternary
    if weight_bits == 1:
        return "binary"
    if float(weight_bits).is_integer() and 2 <= weight_bits <= 8:
        return f"int{int(weight_bits)}"
    raise ValueError(f"weight_bits must be 1, 1.58 or an int in 2..8, got {weight_bits!r}")


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _roles(model: nn.Module) -> tuple[dict[str, nn.Module], set[str], dict[str, str]]:
    """(BitLinear modules by weight name, embedding weight names, aliases: name -> first name)."""
    bitlinears = {_join(n, "weight"): m for n, m in model.named_modules() if _is_bitlinear(m)}
    embeddings = {_join(n, "weight") for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return bitlinears, embeddings, aliases


def _parse_int_bits(option: str, name: str) -> int:
    if not (
        isinstance(option, str) and option.startswith("int") and option[3:].isdigit() and 2 <= int(option[3:]) <= 8
    ):
        raise ValueError(f"{name} must be 'float' or 'int2'..'int8', got {option!r}")
    return int(option[3:])


def _group_size_for(shape: tuple[int, ...], group_size: int, name: str) -> int:
    """Groups run along each row; a row shorter than ``group_size`` is one group."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    width = math.prod(shape[1:])
    size = min(group_size, width) or 1
    if width % size:
        raise ValueError(
            f"group_size={group_size} does not divide the row length {width} of {name} "
            f"(shape {list(shape)}); pick a divisor"
        )
    return size


# --------------------------------------------------------------------------------------------
# Codes <-> packed bytes for every weight scheme
# --------------------------------------------------------------------------------------------


def _pack_codes(codes: torch.Tensor, scheme: str) -> np.ndarray:
    if scheme in packing.SCHEMES:
        return packing.pack(codes, scheme).data
    bits = int(scheme[3:])
    offset = 2 ** (bits - 1)
    values = codes.to(torch.int16).numpy() + offset
    return packing.pack_uint(values, bits)


def _unpack_codes(data: np.ndarray, scheme: str, shape: tuple[int, ...]) -> torch.Tensor:
    if scheme in packing.SCHEMES:
        return torch.from_numpy(packing.SCHEMES[scheme].unpack(data, shape))
    bits = int(scheme[3:])
    values = packing.unpack_uint(data, bits, shape).astype(np.int16) - 2 ** (bits - 1)
    return torch.from_numpy(values.astype(np.int8))


def _codes_nbytes(numel: int, scheme: str) -> int:
    if scheme in packing.SCHEMES:
        return packing.packed_nbytes(numel, scheme)
    return -(-numel * int(scheme[3:]) // 8)


def _known_scheme(scheme: Any) -> bool:
    return scheme in packing.SCHEMES or (
        isinstance(scheme, str) and scheme.startswith("int") and scheme[3:] in {str(k) for k in range(2, 9)}
    )


def _group_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax per group of ``group_size`` along each row: int8 codes [rows, cols] and
    float32 scales [rows, cols / group_size, 1] (``labutils.quant.quantize``'s group layout)."""
    from labutils import quant

    qt = quant.quantize(w.detach().float(), bits, granularity="group", axis=0, group_size=group_size)
    return qt.codes.to(torch.int8), qt.scale.to(torch.float32)


def _group_dequantize(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    rows, groups = scale.shape[0], scale.shape[1]
    return (codes.reshape(rows, groups, -1).to(torch.float32) * scale).reshape(shape)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _dtype_name(dtype: torch.dtype, name: str) -> str:
    for key, value in _DTYPES.items():
        if value == dtype:
            return key
    raise ValueError(f"{name} has dtype {dtype}, which the packed format does not store")


def _stored_keys(name: str, entry: dict) -> list[str]:
    """The safetensors keys that hold the entry ``name``."""
    kind = entry["kind"]
    if kind == "alias":
        return []
    return [name] if kind in ("float", "raw") else [f"{name}:codes", f"{name}:scale"]


def _checked_quantized_weight(module: nn.Module, shape: tuple[int, ...], name: str):
    codes, scale = module.quantized_weight()
    codes = codes.detach().cpu()
    scale = scale.detach().cpu().to(torch.float32).contiguous()
    if tuple(codes.shape) != shape:
        raise ValueError(
            f"{_module_of(name)!r}.quantized_weight() codes have shape {list(codes.shape)}, the weight {list(shape)}"
        )
    if not _broadcasts(tuple(scale.shape), shape) or not torch.isfinite(scale).all():
        raise ValueError(
            f"{_module_of(name)!r}.quantized_weight() scale must be finite and "
            f"broadcast to {list(shape)}, got shape {list(scale.shape)}"
        )
    return codes, scale


def _broadcasts(scale_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(scale_shape) > len(shape):
        return False
    tail = shape[len(shape) - len(scale_shape) :]
    return all(s in (1, d) for s, d in zip(scale_shape, tail))
