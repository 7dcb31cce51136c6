"""Packing 1-bit and 1.58-bit weights into bytes, and back, exactly.

A ternary weight needs log2(3) = 1.58 bits, a binary one 1 bit, yet PyTorch stores each in a
whole ``int8`` (or worse, a float). The packers here put several weights into each byte. Every
``pack_*`` flattens its input (C order); every ``unpack_*`` takes the original shape (or just the
count) and returns exactly the original codes as ``int8``. The last byte is padded; the padding is
checked when unpacking, so a wrong count is caught instead of read as weights.

All functions take numpy arrays or torch tensors (converted with ``.cpu().numpy()``) and return
numpy arrays. Codes may be any signed integer dtype, or floats holding exactly the allowed values;
bools, unsigned integers, fractions, NaN and out-of-range values are refused.

Binary, 8 weights per byte (``"binary"``)
-----------------------------------------
+1 -> bit 1, -1 -> bit 0, weight ``8j + i`` in bit ``i`` of byte ``j`` (little bit order)::

    byte j:  bit  7     6     5     4     3     2     1     0
                w8j+7 w8j+6 w8j+5 w8j+4 w8j+3 w8j+2 w8j+1 w8j+0

Padding bits are 0. ``pack_binary_rows`` packs each row of an ``[N, K]`` matrix into ``uint64``
words, the layout the popcount kernels read: column ``k`` of row ``n`` is bit ``k % 64`` of word
``k // 64``. Viewed as bytes (little-endian) it is the same stream as ``pack_binary`` of the row,
padded to whole words.

Ternary, 2 bits per weight, 4 weights per byte (``"ternary2"``)
--------------------------------------------------------------
The code of a weight is ``w + 1``, as in the Hugging Face BitNet integration::

    w = -1  ->  0b00
    w =  0  ->  0b01
    w = +1  ->  0b10
    0b11    ->  invalid (refused by the unpacker)

Weight ``4j + i`` goes into bits ``2i`` (low) and ``2i + 1`` (high) of byte ``j``::

    byte j:  bit  7 6      5 4      3 2      1 0
                [w4j+3]  [w4j+2]  [w4j+1]  [w4j+0]

    e.g. weights (+1, 0, -1, 0) -> codes (10, 01, 00, 01) -> byte 0b01_00_01_10 = 0x46

(Hugging Face packs along dim 0 in four planes, ``packed[r] |= code(W[p*ceil(R/4) + r]) << 2p``;
we pack the flattened weights in order instead: the 1-bit stream with two bits per weight.) Padding
weights are 0 (code ``0b01``), so a kernel that reads the whole last byte adds nothing.

Ternary, base 3, 5 weights per byte (``"ternary3"``, 1.6 bits per weight)
-------------------------------------------------------------------------
3^5 = 243 <= 256, so five trits fit in one byte, as in llama.cpp's ``TQ1_0``. The five weights
``w[5j] .. w[5j+4]`` become one base-3 number, the first weight the most significant digit::

    q = 81*(w5j+1) + 27*(w5j+1+1) + 9*(w5j+2+1) + 3*(w5j+3+1) + (w5j+4+1)     in [0, 242]

and, like ``TQ1_0``, the byte stores the fixed-point fraction ``q / 243`` scaled to 256::

    byte = ceil(q * 256 / 243)                                                  in [0, 255]

so digit ``i`` comes back with a multiply and a shift, no division::

    trit_i = ((byte * 3**i) mod 256) * 3 >> 8         (i = 0 is w[5j], the most significant)

Only 243 of the 256 byte values can occur; the unpacker refuses the other 13. Unlike ``TQ1_0`` we
keep no blocks of 256 and no per-block scale: the bytes are just the stream of weights in order.
Padding weights are 0 (digit 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import torch
from numba import njit

__all__ = [
    "SCHEMES",
    "PackedCodes",
    "Scheme",
    "pack",
    "pack_binary",
    "pack_binary_rows",
    "pack_ternary_2bit",
    "pack_ternary_base3",
    "pack_uint",
    "packed_nbytes",
    "unpack",
    "unpack_binary",
    "unpack_binary_rows",
    "unpack_ternary_2bit",
    "unpack_ternary_base3",
    "unpack_uint",
]

Shape = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.asarray(x)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _as_codes(x: Any, allowed: tuple[int, ...], name: str) -> np.ndarray:
    """Flatten ``x`` to a contiguous int8 array, checking every value is one of ``allowed``.

    int8 input is returned as is (the packers check its values themselves, in the same pass);
    any other dtype is checked here before the cast, so 257 never wraps around to 1.
    """
    array = _to_numpy(x, name)
    kind = array.dtype.kind
    if kind == "b":
        raise TypeError(f"{name} must hold signed integer codes {allowed}, got dtype bool")
    if kind not in "if":
        raise TypeError(f"{name} must hold signed integer codes {allowed} (int8 preferred), got dtype {array.dtype}")
    flat = array.reshape(-1)
    if array.dtype == np.int8:
        return np.ascontiguousarray(flat)
    ok = np.isin(flat, allowed)  # False for NaN, inf, 0.5, 2, ...
    if not ok.all():
        _raise_bad_value(flat, ok, allowed, name)
    return flat.astype(np.int8)


def _raise_bad_value(flat: np.ndarray, ok: np.ndarray, allowed: tuple[int, ...], name: str):
    index = int(np.flatnonzero(~ok)[0])
    raise ValueError(f"{name} must contain only {allowed}; found {flat[index].item()!r} at flat index {index}")


def _check_int8_values(flat: np.ndarray, allowed: tuple[int, ...], name: str) -> None:
    _raise_bad_value(flat, np.isin(flat, allowed), allowed, name)


def _as_shape(shape: Shape, name: str = "shape") -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"{name} must be a count or a tuple of counts >= 0, got {shape!r}")
    return tuple(int(d) for d in dims)


def _as_packed(packed: Any, nbytes: int, scheme: str, count: int) -> np.ndarray:
    array = _to_numpy(packed, "packed")
    if array.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got dtype {array.dtype}")
    flat = np.ascontiguousarray(array.reshape(-1))
    if flat.size != nbytes:
        raise ValueError(
            f"packed has {flat.size} bytes, but {count} weights in scheme {scheme!r} take exactly {nbytes}"
        )
    return flat


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Binary: 8 per byte, and 64 per uint64 word for the popcount kernels
# --------------------------------------------------------------------------------------------

BINARY = (-1, 1)
TERNARY = (-1, 0, 1)


def pack_binary(signs: Any) -> np.ndarray:
    """Pack signs in {-1, +1} (any shape) into ``uint8[ceil(n / 8)]``, +1 -> bit 1, little order."""
    flat = _as_codes(signs, BINARY, "signs")
    if flat.dtype == np.int8 and not (np.abs(flat) == 1).all():  # abs(-128) is -128: refused too
        _check_int8_values(flat, BINARY, "signs")
    return np.packbits(flat > 0, bitorder="little")


def unpack_binary(packed: Any, shape: Shape) -> np.ndarray:
    """Inverse of :func:`pack_binary`: ``uint8[ceil(n / 8)]`` -> int8 signs of ``shape``."""
    dims = _as_shape(shape)
    n = prod(dims)
    flat = _as_packed(packed, _ceil_div(n, 8), "binary", n)
    if n % 8 and flat[-1] >> (n % 8):
        raise ValueError(f"packed has nonzero padding bits after weight {n}: is the count right?")
    bits = np.unpackbits(flat, count=n, bitorder="little")
    return _bits_to_signs(bits).reshape(dims)


def _bits_to_signs(bits: np.ndarray) -> np.ndarray:
    signs = bits.view(np.int8)  # 0 / 1, in place of a copy
    signs <<= 1
    signs -= 1
    return signs


def pack_binary_rows(signs: Any) -> np.ndarray:
    """Pack each row of ``signs[N, K]`` in {-1, +1} into ``uint64[N, ceil(K / 64)]``.

    Column ``k`` of row ``n`` is bit ``k % 64`` of word ``[n, k // 64]``; +1 -> 1, -1 -> 0;
    the padding bits of the last word are 0. Keep ``K``: :func:`unpack_binary_rows` needs it.
    """
    array = _to_numpy(signs, "signs")
    if array.ndim != 2:
        raise ValueError(f"signs must be a 2-D [N, K] matrix, got shape {tuple(array.shape)}")
    n_rows, k = array.shape
    flat = _as_codes(array, BINARY, "signs")
    if not (np.abs(flat) == 1).all():
        _check_int8_values(flat, BINARY, "signs")
    n_words = _ceil_div(k, 64)
    bits = np.zeros((n_rows, 64 * n_words), dtype=bool)
    bits[:, :k] = flat.reshape(n_rows, k) > 0
    row_bytes = np.packbits(bits, axis=1, bitorder="little")
    return row_bytes.view("<u8").astype(np.uint64, copy=False)


def unpack_binary_rows(words: Any, k: int) -> np.ndarray:
    """Inverse of :func:`pack_binary_rows`: ``uint64[N, ceil(K / 64)]`` -> int8 signs ``[N, K]``."""
    array = _to_numpy(words, "words")
    if array.dtype != np.uint64:
        raise TypeError(f"words must be uint64, got dtype {array.dtype}")
    (k,) = _as_shape(k, "k")
    if array.ndim != 2 or array.shape[1] != _ceil_div(k, 64):
        raise ValueError(
            f"words must have shape [N, ceil(K/64)] = [N, {_ceil_div(k, 64)}] for K={k}, got {tuple(array.shape)}"
        )
    if k % 64 and array.shape[0] and (array[:, -1] >> np.uint64(k % 64)).any():
        raise ValueError(f"words have nonzero padding bits beyond column {k}: is K right?")
    row_bytes = np.ascontiguousarray(array).astype("<u8", copy=False).view(np.uint8)
    bits = np.unpackbits(row_bytes, axis=1, count=k, bitorder="little")
    return _bits_to_signs(np.ascontiguousarray(bits))


# --------------------------------------------------------------------------------------------
# Ternary, 2 bits: code = w + 1, 4 per byte
# --------------------------------------------------------------------------------------------

_ZERO_CODE_2BIT = 0b01


@njit(cache=True)
def _pack_2bit_kernel(trits, out):  # pragma: no cover - compiled
    n = trits.size
    bad = 0
    for j in range(n // 4):
        byte = 0
        for i in range(4):
            code = trits[4 * j + i] + 1
            bad |= code < 0 or code > 2
            byte |= code << (2 * i)
        out[j] = byte
    if n % 4:
        byte = 0
        for i in range(4):
            code = _ZERO_CODE_2BIT
            if 4 * (n // 4) + i < n:
                code = trits[4 * (n // 4) + i] + 1
                bad |= code < 0 or code > 2
            byte |= code << (2 * i)
        out[n // 4] = byte
    return bad


@njit(cache=True)
def _unpack_2bit_kernel(packed, out):  # pragma: no cover - compiled
    n = out.size
    invalid = 0
    for j in range(n // 4):
        byte = packed[j]
        invalid |= byte & (byte >> 1) & 0x55  # a code 0b11 sets its low bit here
        for i in range(4):
            out[4 * j + i] = ((byte >> (2 * i)) & 3) - 1
    for i in range(n % 4):
        byte = packed[n // 4]
        invalid |= byte & (byte >> 1) & 0x55
        out[4 * (n // 4) + i] = ((byte >> (2 * i)) & 3) - 1
    return invalid


def pack_ternary_2bit(trits: Any) -> np.ndarray:
    """Pack trits in {-1, 0, +1} (any shape) into ``uint8[ceil(n / 4)]``, code ``w + 1``."""
    flat = _as_codes(trits, TERNARY, "trits")
    out = np.empty(_ceil_div(flat.size, 4), dtype=np.uint8)
    if _pack_2bit_kernel(flat, out):
        _check_int8_values(flat, TERNARY, "trits")
    return out


def unpack_ternary_2bit(packed: Any, shape: Shape) -> np.ndarray:
    """Inverse of :func:`pack_ternary_2bit`: ``uint8[ceil(n / 4)]`` -> int8 trits of ``shape``."""
    dims = _as_shape(shape)
    n = prod(dims)
    flat = _as_packed(packed, _ceil_div(n, 4), "ternary2", n)
    out = np.empty(n, dtype=np.int8)
    if _unpack_2bit_kernel(flat, out):
        codes = np.unpackbits(flat[:, None], axis=1, bitorder="little")
        bad_byte = int(np.flatnonzero((codes[:, 0::2] & codes[:, 1::2]).any(axis=1))[0])
        raise ValueError(f"packed byte {bad_byte} (0x{flat[bad_byte]:02x}) holds the invalid 2-bit code 0b11")
    if n % 4 and flat[-1] >> (2 * (n % 4)) != _padding_2bit(n % 4):
        raise ValueError(f"packed has non-zero-weight padding after weight {n}: is the count right?")
    return out.reshape(dims)


def _padding_2bit(used: int) -> int:
    return sum(_ZERO_CODE_2BIT << (2 * i) for i in range(4 - used))


# --------------------------------------------------------------------------------------------
# Ternary, base 3: 5 per byte, TQ1_0's fixed-point byte
# --------------------------------------------------------------------------------------------

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int64)


def _decode_table() -> tuple[np.ndarray, np.ndarray]:
    """``trits[byte, i]`` for all 256 bytes, and which bytes ``pack`` can produce."""
    byte = np.arange(256, dtype=np.int64)[:, None]
    digits = ((byte * _POW3[None, :]) % 256 * 3) >> 8  # digit i of q, most significant first
    q = digits @ _POW3[::-1]
    canonical = (q * 256 + 242) // 243 == byte[:, 0]
    return (digits - 1).astype(np.int8), canonical


_BASE3_TRITS, _BASE3_CANONICAL = _decode_table()


@njit(cache=True)
def _pack_base3_kernel(trits, out):  # pragma: no cover - compiled
    n = trits.size
    bad = 0
    for j in range(out.size):
        q = 0
        for i in range(5):
            digit = 1  # padding: weight 0
            if 5 * j + i < n:
                digit = trits[5 * j + i] + 1
                bad |= digit < 0 or digit > 2
            q = 3 * q + digit
        out[j] = (q * 256 + 242) // 243  # ceil(q * 256 / 243)
    return bad


@njit(cache=True)
def _pack_base3_full_kernel(trits, out):  # pragma: no cover - compiled
    # Whole groups of five only: no bounds test in the loop, so it runs at full speed.
    bad = 0
    for j in range(out.size):
        q = 0
        for i in range(5):
            digit = trits[5 * j + i] + 1
            bad |= digit < 0 or digit > 2
            q = 3 * q + digit
        out[j] = (q * 256 + 242) // 243
    return bad


@njit(cache=True)
def _unpack_base3_kernel(packed, table, canonical, out):  # pragma: no cover - compiled
    n = out.size
    invalid = False
    for j in range(n // 5):
        byte = packed[j]
        invalid |= not canonical[byte]
        for i in range(5):
            out[5 * j + i] = table[byte, i]
    for i in range(n % 5):
        byte = packed[n // 5]
        invalid |= not canonical[byte]
        out[5 * (n // 5) + i] = table[byte, i]
    return invalid


def pack_ternary_base3(trits: Any) -> np.ndarray:
    """Pack trits in {-1, 0, +1} (any shape) into ``uint8[ceil(n / 5)]``, 5 base-3 digits a byte."""
    flat = _as_codes(trits, TERNARY, "trits")
    out = np.empty(_ceil_div(flat.size, 5), dtype=np.uint8)
    full = flat.size // 5
    bad = _pack_base3_full_kernel(flat[: 5 * full], out[:full])
    bad |= _pack_base3_kernel(flat[5 * full :], out[full:])
    if bad:
        _check_int8_values(flat, TERNARY, "trits")
    return out


def unpack_ternary_base3(packed: Any, shape: Shape) -> np.ndarray:
    """Inverse of :func:`pack_ternary_base3`: ``uint8[ceil(n / 5)]`` -> int8 trits of ``shape``."""
    dims = _as_shape(shape)
    n = prod(dims)
    flat = _as_packed(packed, _ceil_div(n, 5), "ternary3", n)
    out = np.empty(n, dtype=np.int8)
    if _unpack_base3_kernel(flat, _BASE3_TRITS, _BASE3_CANONICAL, out):
        bad_byte = int(np.flatnonzero(~_BASE3_CANONICAL[flat])[0])
        raise ValueError(
            f"packed byte {bad_byte} (0x{flat[bad_byte]:02x}) is not a base-3 byte: "
            "only ceil(q * 256 / 243) for q in 0..242 occur"
        )
    if n % 5 and (_BASE3_TRITS[flat[-1], n % 5 :] != 0).any():
        raise ValueError(f"packed has non-zero-weight padding after weight {n}: is the count right?")
    return out.reshape(dims)


# --------------------------------------------------------------------------------------------
# Any width: b-bit unsigned values as one little-endian bitstream (int-k codes, embeddings)
# --------------------------------------------------------------------------------------------


def pack_uint(values: Any, bits: int) -> np.ndarray:
    """Pack integers in ``[0, 2**bits)`` (any shape) into ``uint8[ceil(n * bits / 8)]``.

    Value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, least significant bit
    first; bit ``t`` of the stream is bit ``t % 8`` of byte ``t // 8``. With ``bits=1`` or ``2``
    this is the layout of :func:`pack_binary` and :func:`pack_ternary_2bit`. Padding bits are 0.
    """
    _check_bits(bits)
    array = _to_numpy(values, "values")
    if array.dtype.kind not in "iu":
        raise TypeError(f"values must be integers, got dtype {array.dtype}")
    flat = array.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        bad = flat[(flat < 0) | (flat >= 2**bits)][0].item()
        raise ValueError(f"values must lie in [0, {2**bits}) for bits={bits}, found {bad}")
    planes = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little")


def unpack_uint(packed: Any, bits: int, shape: Shape) -> np.ndarray:
    """Inverse of :func:`pack_uint`: ``uint8[ceil(n * bits / 8)]`` -> uint8 values of ``shape``."""
    _check_bits(bits)
    dims = _as_shape(shape)
    n = prod(dims)
    flat = _as_packed(packed, _ceil_div(n * bits, 8), f"uint{bits}", n)
    if (n * bits) % 8 and flat[-1] >> ((n * bits) % 8):
        raise ValueError(f"packed has nonzero padding bits after value {n}: is the count right?")
    planes = np.zeros((n, 8), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(flat, count=n * bits, bitorder="little").reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(dims)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


# --------------------------------------------------------------------------------------------
# One interface over the schemes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """A packing scheme: how many weights share a byte, and its packer / unpacker pair."""

    name: str
    values: tuple[int, ...]
    weights_per_byte: int
    bits_per_weight: float
    pack: Callable[[Any], np.ndarray]
    unpack: Callable[[Any, Shape], np.ndarray]

    def nbytes(self, n: int) -> int:
        """Bytes that ``n`` packed weights take: ``ceil(n / weights_per_byte)``."""
        return _ceil_div(n, self.weights_per_byte)


SCHEMES: dict[str, Scheme] = {
    "binary": Scheme("binary", BINARY, 8, 1.0, pack_binary, unpack_binary),
    "ternary2": Scheme("ternary2", TERNARY, 4, 2.0, pack_ternary_2bit, unpack_ternary_2bit),
    "ternary3": Scheme("ternary3", TERNARY, 5, 1.6, pack_ternary_base3, unpack_ternary_base3),
}


@dataclass(frozen=True)
class PackedCodes:
    """Packed bytes together with what it takes to unpack them."""

    data: np.ndarray  # uint8[scheme.nbytes(prod(shape))]
    shape: tuple[int, ...]
    scheme: str

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


def packed_nbytes(n: int, scheme: str) -> int:
    """Bytes that ``n`` weights take in ``scheme``: ceil(n/8), ceil(n/4) or ceil(n/5)."""
    return _scheme(scheme).nbytes(n)


def pack(codes: Any, scheme: str) -> PackedCodes:
    """Pack ``codes`` (any shape) with ``scheme`` in {"binary", "ternary2", "ternary3"}."""
    shape = tuple(int(d) for d in _to_numpy(codes, "codes").shape)
    return PackedCodes(_scheme(scheme).pack(codes), shape, scheme)


def unpack(packed: PackedCodes) -> np.ndarray:
    """Inverse of :func:`pack`: int8 codes of ``packed.shape``."""
    return _scheme(packed.scheme).unpack(packed.data, packed.shape)
