"""A packed model file: 1-bit / 1.58-bit weights packed into bytes, on top of safetensors.

``save_packed(model, path)`` writes one safetensors file (no pickle anywhere):

- every BitLinear weight (duck-typed: a module with ``quantized_weight()`` and
  ``config.weight_bits``) as its packed codes (``labutils.packing``: ``"binary"`` for 1 bit,
  ``"ternary2"`` or ``"ternary3"`` for 1.58 bits, a k-bit stream ``"int{k}"`` for k = 2..8) plus
  its float32 scale;
- embeddings (``nn.Embedding`` weights) in float, or k-bit group-quantized (``embeddings="int4"``:
  symmetric absmax over groups of ``group_size`` consecutive values of a row, as
  ``labutils.quant.quantize(..., granularity="group")``);
- everything else of the state dict (norms, biases, the float heads, buffers) as is, floats in
  ``float_dtype`` (fp32, lossless by default, or fp16 / bf16).

The safetensors ``__metadata__`` holds ``format``, ``format_version`` and a JSON ``manifest``
(for every state-dict name: kind, scheme, shape, dtype, and the sha256 of every stored tensor)
together with the manifest's own sha256, so every byte of the file is checked on load::

    __metadata__ = {"format": "labutils.packfile", "format_version": "1",
                    "manifest": "{...}", "manifest_sha256": "..."}
    manifest     = {"options": {...}, "entries": {name: entry}, "sha256": {stored key: hex}}

    entry kinds  float    {"shape", "dtype"}                     stored as  name
                 raw      {"shape", "dtype"}  (integer buffers)  stored as  name
                 packed   {"shape", "dtype", "scheme", "scale_shape"}       name:codes, name:scale
                 grouped  {"shape", "dtype", "bits", "group_size"}          name:codes, name:scale
                 alias    {"of": other name}  (tied weights, stored once)

``load_packed(path)`` reads the bytes once, checks everything (header, version, checksums,
shapes, codes) and raises :class:`PackedFileError`, and only that, for any damaged or foreign
file. With a model it checks that the file fits the model completely before it changes
anything, then loads: labutils' BitLinear layers are pinned to the stored codes and scales
(``BitLinear.pin_quantized_weight``), which makes the loaded model's forward pass bit-identical to
the saved one's in every dtype; other BitLinear-like modules get latent weights ``codes * k`` with
``k`` searched so that their own quantizer returns exactly the stored ``codes * scale``.

``size_report(model)`` gives the bytes of the same model stored as fp32, fp16, int8, 2-bit,
1.6-bit and 1-bit, split into embeddings, linear layers and the rest; the formulas are exactly
what ``save_packed`` writes, the header aside.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import safetensors.torch
import torch
from torch import nn

from labutils import packing

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PackedContents",
    "PackedFileError",
    "SizeRow",
    "format_size_report",
    "header_bytes",
    "load_packed",
    "save_packed",
    "size_report",
    "sorted_metadata",
    "write_atomic",
]

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


# --------------------------------------------------------------------------------------------
# Loading: check everything, then decode
# --------------------------------------------------------------------------------------------


@dataclass
class PackedContents:
    """What ``load_packed(path)`` returns without a model.

    Attributes:
        state_dict: every state-dict tensor in its original dtype and shape; packed weights as
            ``codes * scale``, grouped embeddings dequantized; tied names share one tensor.
        codes: int8 codes of every packed weight and grouped embedding, by state-dict name.
        scales: their float32 scales ([] or [out, 1] for weights, [rows, groups, 1] for groups).
        entries: the manifest entry of every name (kind, scheme, shape, dtype, ...).
        options: the options the file was saved with.
    """

    state_dict: dict[str, torch.Tensor]
    codes: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    entries: dict[str, dict] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _fail(message: str) -> NoReturn:
    raise PackedFileError(message)


def header_bytes(path: str | os.PathLike) -> int:
    """Bytes before a safetensors file's data: the 8-byte little-endian length, then the JSON header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
    if len(prefix) < 8:
        _fail(f"{path} is truncated: {len(prefix)} bytes, less than the 8-byte header length")
    return 8 + int.from_bytes(prefix, "little")


def _read_header(data: bytes) -> tuple[dict, int]:
    """The safetensors JSON header and where the data starts."""
    if len(data) < 8:
        _fail(f"file is truncated: {len(data)} bytes, less than the 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(len(data) - 8, _MAX_HEADER):
        _fail(f"file is truncated or corrupt: the header claims {header_len} bytes, {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackedFileError(f"file header is not valid JSON (corrupt file?): {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        _fail("file header has no __metadata__: not a labutils packed file")
    return header, 8 + header_len


def _read_manifest(metadata: dict) -> dict:
    if metadata.get("format") != FORMAT:
        _fail(f"not a labutils packed file: format is {metadata.get('format')!r}, expected {FORMAT!r}")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        _fail(f"unsupported format_version {version!r}: this labutils reads version {FORMAT_VERSION}")
    manifest_json = metadata.get("manifest")
    if not isinstance(manifest_json, str):
        _fail("file metadata has no manifest")
    if hashlib.sha256(manifest_json.encode()).hexdigest() != metadata.get("manifest_sha256"):
        _fail("manifest checksum mismatch: the file's metadata is corrupt")
    try:
        manifest = json.loads(manifest_json)
    except json.JSONDecodeError as exc:
        raise PackedFileError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not all(
        isinstance(manifest.get(k), dict) for k in ("options", "entries", "sha256")
    ):
        _fail("manifest lacks 'options', 'entries' or 'sha256'")
    return manifest


def _verify_checksums(header: dict, data: bytes, start: int, checksums: dict) -> None:
    names = set(header) - {"__metadata__"}
    if names != set(checksums):
        missing, extra = sorted(set(checksums) - names), sorted(names - set(checksums))
        _fail(f"stored tensors do not match the manifest: missing {missing}, unlisted {extra}")
    for name in sorted(names):
        info = header[name]
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and 0 <= o for o in offsets)
            and offsets[0] <= offsets[1] <= len(data) - start
        ):
            _fail(f"tensor {name!r} has invalid data offsets {offsets!r} (truncated file?)")
        chunk = data[start + offsets[0] : start + offsets[1]]
        if hashlib.sha256(chunk).hexdigest() != checksums[name]:
            _fail(f"checksum mismatch for tensor {name!r}: the file is corrupt")


def _read(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    header, start = _read_header(data)
    manifest = _read_manifest(header["__metadata__"])
    _verify_checksums(header, data, start, manifest["sha256"])
    try:
        tensors = safetensors.torch.load(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - SafetensorError, and pyo3 panics (BaseException)
        raise PackedFileError(f"safetensors cannot read the file: {exc}") from None
    return manifest, tensors


def _expect(tensor: torch.Tensor | None, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if tensor is None:
        _fail(f"tensor {key!r} is missing from the file")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        _fail(f"tensor {key!r} is {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}")
    return tensor


def _entry_shape(entry: dict, key: str) -> tuple[int, ...]:
    shape = entry.get(key)
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        _fail(f"manifest entry has an invalid {key}: {shape!r}")
    return tuple(shape)


def _decode(name: str, entry: dict, tensors: dict, options: dict, out: PackedContents) -> None:
    """Check one manifest entry against the stored tensors and put its values into ``out``."""
    kind = entry.get("kind")
    if kind == "alias":
        return
    if kind not in ("float", "raw", "packed", "grouped"):
        _fail(f"entry {name!r} has an unknown kind {kind!r}")
    shape = _entry_shape(entry, "shape")
    dtype = _DTYPES.get(entry.get("dtype"))
    if dtype is None:
        _fail(f"entry {name!r} has an unknown dtype {entry.get('dtype')!r}")
    if kind in ("float", "raw"):
        stored_dtype = FLOAT_DTYPES[options["float_dtype"]] if kind == "float" else dtype
        if kind == "float" and not dtype.is_floating_point:
            _fail(f"entry {name!r} is kind float with dtype {dtype}")
        out.state_dict[name] = _expect(tensors.get(name), name, stored_dtype, shape).to(dtype)
        return
    if not dtype.is_floating_point:
        _fail(f"entry {name!r} is quantized but has dtype {dtype}")
    numel = math.prod(shape)
    if kind == "packed":
        scheme = entry.get("scheme")
        if not _known_scheme(scheme):
            _fail(f"entry {name!r} has an unknown scheme {scheme!r}")
        scale_shape = _entry_shape(entry, "scale_shape")
        if not _broadcasts(scale_shape, shape):
            _fail(f"entry {name!r}: scale shape {list(scale_shape)} does not fit weight shape {list(shape)}")
    else:
        bits, size = entry.get("bits"), entry.get("group_size")
        if not (
            len(shape) >= 1
            and isinstance(bits, int)
            and 2 <= bits <= 8
            and isinstance(size, int)
            and size >= 1
            and math.prod(shape[1:]) % size == 0
        ):
            _fail(
                f"entry {name!r} has an inconsistent group layout: bits={bits!r}, "
                f"group_size={size!r}, shape {list(shape)}"
            )
        scheme = f"int{bits}"
        scale_shape = (shape[0], math.prod(shape[1:]) // size, 1)
    packed = _expect(tensors.get(f"{name}:codes"), f"{name}:codes", torch.uint8, (_codes_nbytes(numel, scheme),))
    scale = _expect(tensors.get(f"{name}:scale"), f"{name}:scale", torch.float32, scale_shape)
    if not torch.isfinite(scale).all():
        _fail(f"tensor {name + ':scale'!r} holds non-finite values")
    try:
        codes = _unpack_codes(packed.numpy(), scheme, shape)
    except ValueError as exc:
        raise PackedFileError(f"codes of {name!r} do not unpack: {exc}") from None
    values = codes.to(torch.float32) * scale if kind == "packed" else _group_dequantize(codes, scale, shape)
    out.state_dict[name] = values.to(dtype)
    out.codes[name], out.scales[name] = codes, scale


def _contents(manifest: dict, tensors: dict[str, torch.Tensor]) -> PackedContents:
    options, entries = manifest["options"], manifest["entries"]
    if options.get("float_dtype") not in FLOAT_DTYPES:
        _fail(f"manifest has an unknown float_dtype {options.get('float_dtype')!r}")
    out = PackedContents(state_dict={}, entries=entries, options=options)
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            _fail(f"manifest entry {name!r} is not an object")
        _decode(name, entry, tensors, options, out)
    for name, entry in entries.items():
        if entry["kind"] == "alias":
            target = entry.get("of")
            if target not in out.state_dict:
                _fail(f"entry {name!r} is an alias of {target!r}, which the file does not hold")
            out.state_dict[name] = out.state_dict[target]
    expected = {key for name, entry in entries.items() for key in _stored_keys(name, entry)}
    if set(tensors) != expected:
        _fail(f"the file stores tensors the manifest does not use: {sorted(set(tensors) - expected)}")
    return out


def load_packed(path: str | os.PathLike | bytes, model: nn.Module | None = None) -> PackedContents | nn.Module:
    """Read a file written by :func:`save_packed`, checking every byte first.

    Args:
        path: the file, or its bytes.
        model: optional; the same architecture the file was saved from. Everything is checked
            against it first (names, shapes, bit widths, scale shapes, code ranges): a file that
            does not fit leaves the model untouched. Then its state dict is replaced by the
            file's: floats as stored, packed weights as ``codes * scale``; every labutils
            BitLinear is pinned to the stored codes and scale (its forward pass uses exactly them,
            in any dtype, until its latent weight is trained again); any other module with
            ``quantized_weight()`` gets the latent weight ``codes * k``, ``k`` found so that its
            own quantizer gives back exactly ``codes * scale`` (BitNet's absmean scale is not
            idempotent: mean|codes * s| = s * mean|codes|).

    Returns:
        ``model`` (loaded) if given, else a :class:`PackedContents` (float state dict plus the
        codes and scales of every packed tensor).

    Raises:
        PackedFileError: the file is truncated, corrupt (a checksum fails), of another format
            version, inconsistent (a missing tensor, a wrong shape, an invalid code), or does not
            fit ``model`` (missing or extra names, other shapes, other bit widths).
    """
    if isinstance(path, (bytes, bytearray, memoryview)):
        data = bytes(path)
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise PackedFileError(f"cannot read {os.fspath(path)!r}: {exc}") from None
    try:
        manifest, tensors = _read(data)
        contents = _contents(manifest, tensors)
    except PackedFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed manifest with a valid checksum (hand-made)
        raise PackedFileError(f"malformed file: {type(exc).__name__}: {exc}") from None
    if model is None:
        return contents
    return _load_into(model, contents)


def _load_into(model: nn.Module, contents: PackedContents) -> nn.Module:
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(contents.state_dict)), sorted(set(contents.state_dict) - set(own))
    if missing or extra:
        _fail(
            f"the file does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for name, tensor in own.items():
        if tensor.shape != contents.state_dict[name].shape:
            _fail(
                f"the file does not fit this model: {name!r} is {list(contents.state_dict[name].shape)} "
                f"in the file, {list(tensor.shape)} in the model"
            )
    bitlinears, _, _ = _roles(model)
    for name, module in bitlinears.items():
        entry = contents.entries[name]
        if entry["kind"] != "packed":
            _fail(
                f"the file does not fit this model: {_module_of(name)!r} is a BitLinear, "
                f"the file holds its weight as {entry['kind']}"
            )
        if not _scheme_fits(module.config.weight_bits, entry["scheme"]):
            _fail(
                f"the file does not fit this model: {_module_of(name)!r} quantizes to "
                f"{module.config.weight_bits} bits, the file holds {entry['scheme']} codes"
            )
        check = getattr(module, "check_quantized_weight", None)
        if callable(check):  # labutils' BitLinear checks scale shape (per_channel) and code range
            try:
                check(contents.codes[name], contents.scales[name])
            except (TypeError, ValueError) as exc:
                _fail(f"the file does not fit this model: {_module_of(name)!r}: {exc}")
            continue
        # Other modules: their own scale shape from their current weight (read only).
        model_scale = tuple(module.quantized_weight()[1].shape)
        if model_scale != tuple(contents.scales[name].shape):
            _fail(
                f"the file does not fit this model: {_module_of(name)!r} has scales of shape "
                f"{list(model_scale)}, the file {list(contents.scales[name].shape)} (per_channel?)"
            )
    # Everything is checked: from here on the model changes.
    state = {n: t.to(own[n].dtype) for n, t in contents.state_dict.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PackedFileError(f"the file does not fit this model: {exc}") from None
    for name, module in bitlinears.items():
        pin = getattr(module, "pin_quantized_weight", None)
        if callable(pin):  # labutils' BitLinear: use the stored codes and scale as they are
            pin(contents.codes[name], contents.scales[name])
        elif not _fit_latent_weight(module, contents.codes[name], contents.scales[name]):
            warnings.warn(
                f"{_module_of(name)!r}: found no latent weight whose quantization is exactly the "
                "stored codes * scale; its forward pass may differ in the last bits",
                stacklevel=2,
            )
    return model


def _scheme_fits(weight_bits: float, scheme: str) -> bool:
    if scheme in TERNARY_SCHEMES:
        return math.isclose(weight_bits, 1.58)
    return _weight_scheme(weight_bits, "ternary2") == scheme


def _fit_latent_weight(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> bool:
    """Set ``module.weight`` so that ``module.quantized_weight()`` gives back exactly
    ``codes * scale``; True on success. See :class:`_LatentFit`."""
    # The search makes many tiny torch calls: with several threads their start-up cost (and
    # contention with other work) dominates, so it runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_latent_weight_once(module, codes, scale)
    finally:
        torch.set_num_threads(threads)


def _fit_latent_weight_once(module: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> bool:
    fit = _LatentFit(module, codes, scale)
    if fit.rows.abs().max() <= 1:  # ternary / binary: a mean-like scale
        return fit.by_exact_sum() or fit.by_pivot()
    return fit.by_pivot() or fit.by_exact_sum()  # k-bit absmax: a max-like scale


class _LatentFit:
    """Search for latent weights whose quantization is exactly the stored ``codes * scale``.

    The quantizer measures its scale from the latent weight (mean|W| for BitNet's absmean and
    for sign, max|W| / Qp for k-bit absmax), so ``W = codes * scale`` does not do: its absmean is
    ``scale * mean|codes|``. We search, per scale group (the tensor, or each output row), an
    integer ``t`` on which the measured scale grows monotonically, by bisection, asking the
    module itself (``quantized_weight()``) at each step:

    - ``by_exact_sum`` (mean-like): the magnitudes are integer multiples of ``Q = ulp(scale * n)``
      adding up to ``t * Q`` (spread evenly over the nonzero codes). Every partial sum is then
      an exact float32, whatever the summation order, and the measured mean moves by
      ``Q / n <= ulp(scale)`` per step, so it cannot jump over the stored scale.
    - ``by_pivot`` (max-like): ``W = codes * scale * (1 - 2^-10)`` except for the largest code of
      each group, the pivot, whose magnitude is the float32 with bit pattern ``t``.
    """

    def __init__(self, module: nn.Module, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.module, self.weight = module, module.weight
        device = self.weight.device
        self.groups = scale.numel()
        self.rows = codes.to(device, torch.float32).reshape(self.groups, -1)  # [G, n]
        self.wanted = scale.to(device, torch.float32).reshape(self.groups, 1)  # [G, 1]
        self.target = (self.rows * self.wanted).reshape(self.weight.shape).to(self.weight.dtype)

    def measure(self, latent: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Load ``latent`` [G, n]; return the scale the module measures [G, 1], and whether its
        codes * scale is the target exactly."""
        with torch.no_grad():
            self.weight.copy_(latent.reshape(self.weight.shape).to(self.weight.dtype))
        codes, scale = self.module.quantized_weight()
        exact = torch.equal((codes.to(torch.float32) * scale).to(self.weight.dtype), self.target)
        return scale.to(torch.float32).reshape(self.groups, 1), exact

    def bisect(self, latent_of: Callable[[torch.Tensor], torch.Tensor], low: torch.Tensor, high: torch.Tensor) -> bool:
        """Bisect each group's integer t in [low, high] (int64 [G, 1]) for measured == wanted."""
        for _ in range(80):
            mid = low + (high - low) // 2
            got, exact = self.measure(latent_of(mid))
            if exact:
                return True
            if (high - low <= 1).all():
                break
            hit = got == self.wanted
            low = torch.where((got < self.wanted) | hit, mid, low)
            high = torch.where((got > self.wanted) | hit, mid, high)
        return self.measure(latent_of(high))[1]

    def by_exact_sum(self) -> bool:
        nonzero = self.rows != 0
        count = nonzero.sum(dim=1, keepdim=True).clamp_min(1)
        rank = nonzero.cumsum(dim=1) - 1  # position of each nonzero code within its group
        total = self.wanted.to(torch.float64) * self.rows.shape[1]  # the sum the mean needs
        _, exponent = torch.frexp(total.to(torch.float32))
        quantum = torch.ldexp(torch.ones_like(total), (exponent - 24).to(torch.float64))  # ulp
        steps = torch.round(total / quantum).to(torch.int64)

        def latent_of(t: torch.Tensor) -> torch.Tensor:
            magnitude = t // count + (rank < t % count)
            return self.rows.sign() * (magnitude.to(torch.float64) * quantum).to(torch.float32)

        return self.bisect(latent_of, steps - 64, steps + 64)

    def by_pivot(self) -> bool:
        pivot = self.rows.abs().argmax(dim=1, keepdim=True)
        pivot_code = self.rows.gather(1, pivot)
        below = self.rows * (self.wanted * (1 - 2.0**-10))

        def latent_of(t: torch.Tensor) -> torch.Tensor:
            magnitude = t.to(torch.int32).view(torch.float32)
            return below.scatter(1, pivot, pivot_code.sign() * magnitude)

        def bits(x: torch.Tensor) -> torch.Tensor:
            return x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)

        reach = pivot_code.abs() * self.wanted
        return self.bisect(latent_of, bits(reach * (1 - 2.0**-11)), bits(reach * (1 + 2.0**-11)))


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
