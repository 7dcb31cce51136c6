"""``save_packed``: a model written as one packed safetensors file, atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from labutils.packfile.format import (
    FLOAT_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    TERNARY_SCHEMES,
    _checked_quantized_weight,
    _dtype_name,
    _group_quantize,
    _group_size_for,
    _module_of,
    _pack_codes,
    _parse_int_bits,
    _roles,
    _sha256,
    _stored_keys,
    _weight_scheme,
)


def save_packed(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    ternary: str = "ternary2",
    embeddings: str = "float",
    group_size: int = 64,
    float_dtype: str = "fp32",
) -> int:
    """Write ``model`` to ``path`` as a packed safetensors file; return the file size in bytes.

    Args:
        model: any nn.Module; its BitLinear layers are stored packed (the codes and scale of
            ``quantized_weight()``, i.e. the fully quantized layer, quant_strength 1), everything
            else as is.
        path: where to write (atomically: see :func:`write_atomic`).
        ternary: packing of 1.58-bit weights: "ternary2" (2 bits) or "ternary3" (base 3, 1.6 bits).
        embeddings: "float" (stored in ``float_dtype``) or "int2".."int8": k-bit symmetric
            absmax group quantization of every nn.Embedding weight (lossy).
        group_size: values per group along each embedding row (capped at the row length; must
            divide it).
        float_dtype: "fp32" (lossless for fp32 models), "fp16" or "bf16": how the tensors that
            stay in float are stored; they load back in their original dtype.

    Raises:
        ValueError / TypeError: a bad option, a BitLinear whose codes are out of its scheme's
            range, or a dtype the format cannot store.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if ternary not in TERNARY_SCHEMES:
        raise ValueError(f"ternary must be one of {TERNARY_SCHEMES}, got {ternary!r}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {tuple(FLOAT_DTYPES)}, got {float_dtype!r}")
    embedding_bits = None if embeddings == "float" else _parse_int_bits(embeddings, "embeddings")

    bitlinears, embedding_names, aliases = _roles(model)
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        shape, dtype = list(tensor.shape), _dtype_name(tensor.dtype, name)
        if name in aliases:
            entries[name] = {"kind": "alias", "of": aliases[name]}
        elif name in bitlinears:
            scheme = _weight_scheme(bitlinears[name].config.weight_bits, ternary)
            codes, scale = _checked_quantized_weight(bitlinears[name], tuple(shape), name)
            try:
                packed = _pack_codes(codes, scheme)
            except ValueError as exc:
                raise ValueError(f"cannot pack the weight of {_module_of(name)!r} as {scheme}: {exc}") from exc
            stored[f"{name}:codes"] = torch.from_numpy(packed)
            stored[f"{name}:scale"] = scale
            entries[name] = {
                "kind": "packed",
                "scheme": scheme,
                "shape": shape,
                "dtype": dtype,
                "scale_shape": list(scale.shape),
            }
        elif name in embedding_names and embedding_bits is not None and tensor.is_floating_point():
            size = _group_size_for(tuple(shape), group_size, name)
            codes, scale = _group_quantize(tensor, embedding_bits, size)
            stored[f"{name}:codes"] = torch.from_numpy(_pack_codes(codes, f"int{embedding_bits}"))
            stored[f"{name}:scale"] = scale
            entries[name] = {
                "kind": "grouped",
                "bits": embedding_bits,
                "group_size": size,
                "shape": shape,
                "dtype": dtype,
            }
        elif tensor.is_floating_point():
            stored[name] = tensor.to(FLOAT_DTYPES[float_dtype], copy=True).contiguous()
            entries[name] = {"kind": "float", "shape": shape, "dtype": dtype}
        else:
            stored[name] = tensor.clone().contiguous()  # safetensors refuses shared storage
            entries[name] = {"kind": "raw", "shape": shape, "dtype": dtype}
    if len(stored) != sum(len(_stored_keys(n, e)) for n, e in entries.items()):
        raise ValueError("state-dict names collide with the packed format's ':codes' / ':scale' keys")

    manifest = {
        "options": {"ternary": ternary, "embeddings": embeddings, "group_size": group_size, "float_dtype": float_dtype},
        "entries": entries,
        "sha256": {key: _sha256(t) for key, t in stored.items()},
    }
    manifest_json = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "manifest": manifest_json,
        "manifest_sha256": hashlib.sha256(manifest_json.encode()).hexdigest(),
    }
    data = sorted_metadata(safetensors.torch.save(stored, metadata=metadata))
    write_atomic(path, data)
    return len(data)


def sorted_metadata(data: bytes) -> bytes:
    """The safetensors file ``data`` with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata from a Rust HashMap, whose order changes from process to
    process, so the same model saved twice gave different bytes (and hashes). The tensors'
    entries and data are kept as they are; the header is padded with spaces to 8 bytes, as
    safetensors pads it."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written, even when the
    process is killed or the machine loses power mid-write: write ``path.tmp`` in the same folder,
    fsync it, rename it over ``path`` (atomic on POSIX and Windows), fsync the folder. A kill
    leaves at most a stale ``.tmp``, which the next write replaces."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
