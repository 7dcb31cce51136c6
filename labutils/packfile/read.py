"""``load_packed``: a packed file read, checked byte for byte, and loaded into a model."""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import safetensors.torch
import torch
from torch import nn

from labutils.packfile.format import (
    _DTYPES,
    _MAX_HEADER,
    FLOAT_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    TERNARY_SCHEMES,
    PackedFileError,
    _broadcasts,
    _codes_nbytes,
    _group_dequantize,
    _known_scheme,
    _module_of,
    _roles,
    _stored_keys,
    _unpack_codes,
    _weight_scheme,
)

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
