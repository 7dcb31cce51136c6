"""The prepacked weight layouts the kernels read (``PackedWeights``, ``prepack_*``) and the
validation of kernel inputs.

The layouts were chosen for the AVX-512 microkernels (one contiguous 64-byte load per vector);
the AVX2 kernels read each 64-byte vector as two 32-byte halves and the generic kernels as
bytes, so one ``PackedWeights`` serves every path.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch

from labutils import packing

SCHEMES = ("w1a1", "w1a8", "w1.58a8")

_W1A1_COLS = 32  # columns per tile: 4 vectors of 8 uint64 lanes
_A8_COLS = 64  # columns per tile: 4 vectors of 16 int32 lanes
_A8_GROUP = {"w1a8": 32, "w1.58a8": 16}  # k per 64-byte vector: 16 columns x 4 bytes x (8 / bits) fields
_CODE_BITS = {"w1a8": 1, "w1.58a8": 2}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class PackedWeights:
    """A weight matrix ``W [n, k]`` in the tiled layout one kernel family reads.

    Build it with ``prepack_w1a1``, ``prepack_w1a8`` or ``prepack_w158a8``; the kernels refuse
    anything else (so unpacked weights cannot be read as packed ones by mistake).

    Layouts (columns beyond n and k are zero-padding, never read back as results):

    - ``"w1a1"``: ``uint64 [ceil(n/32), ceil(k/64), 32]``: tile ``t``, word ``i``, lane ``c`` is
      word ``i`` of row ``32t + c`` of ``pack_binary_rows(W)`` (so 8 consecutive lanes are one
      512-bit load: the same word of 8 output columns).
    - ``"w1a8"``: ``uint8 [ceil(n/64), ceil(k/32), 4, 64]``: tile ``t``, group ``g``, vector ``v``,
      byte ``4l + j`` holds in bit ``q`` the weight bit of column ``64t + 16v + l`` at
      ``k = 32g + 4q + j`` (+1 -> 1, -1 -> 0).
    - ``"w1.58a8"``: ``uint8 [ceil(n/64), ceil(k/16), 4, 64]``: as w1a8 with 2-bit fields: bits
      ``2q, 2q+1`` of byte ``4l + j`` hold ``w + 1`` of column ``64t + 16v + l`` at
      ``k = 16g + 4q + j``.

    In the A8 layouts byte ``4l + j`` sits in int32 lane ``l``, so one ``vpdpbusd`` against 4
    broadcast activation bytes ``a[k..k+3]`` adds 4 products to each of 16 output columns.
    """

    scheme: str
    n: int
    k: int
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        for name in ("n", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.data, np.ndarray) or not self.data.flags.c_contiguous:
            raise TypeError("data must be a C-contiguous numpy array (build PackedWeights with prepack_*)")
        expected = _tile_shape(self.scheme, self.n, self.k)
        dtype = np.uint64 if self.scheme == "w1a1" else np.uint8
        if self.data.dtype != dtype or self.data.shape != expected:
            raise ValueError(
                f"{self.scheme} data must be {np.dtype(dtype).name} {expected} for n={self.n}, k={self.k}, "
                f"got {self.data.dtype} {self.data.shape}"
            )

    @property
    def nbytes(self) -> int:
        """Bytes of the tiles (padding included)."""
        return int(self.data.nbytes)

    @property
    def bits_per_weight(self) -> int:
        """Storage bits per weight: 1 (binary) or 2 (ternary)."""
        return 2 if self.scheme == "w1.58a8" else 1


def _tile_shape(scheme: str, n: int, k: int) -> tuple[int, ...]:
    if scheme == "w1a1":
        return (_ceil_div(n, _W1A1_COLS), _ceil_div(k, 64), _W1A1_COLS)
    return (_ceil_div(n, _A8_COLS), _ceil_div(k, _A8_GROUP[scheme]), 4, 64)


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {x.device}")
        return x.detach().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a numpy array or a CPU torch tensor, got {type(x).__name__}")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive int (the number of input features), got {k!r}")
    return int(k)


def _binary_rows(w_rows: Any, k: int) -> np.ndarray:
    """Validated ``uint64 [N, ceil(k/64)]`` rows of ``pack_binary_rows`` (padding bits zero)."""
    rows = _as_array(w_rows, "w_rows")
    if rows.dtype != np.uint64:
        raise TypeError(
            f"w_rows must be uint64 words from packing.pack_binary_rows, got dtype {rows.dtype} "
            "(pack ±1 signs with pack_binary_rows first)"
        )
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] != _ceil_div(k, 64):
        raise ValueError(
            f"w_rows must have shape [N, ceil(k/64)] = [N, {_ceil_div(k, 64)}] for k={k}, got {rows.shape}"
        )
    _check_padding_bits(rows, k, "w_rows")
    return rows


def _check_padding_bits(rows: np.ndarray, k: int, name: str) -> None:
    if k % 64 and rows.shape[0] and (rows[..., -1] >> np.uint64(k % 64)).any():
        raise ValueError(f"{name} has nonzero padding bits beyond column {k}: is k right?")


def prepack_w1a1(w_rows: Any, k: int) -> PackedWeights:
    """Tile binary weights for the XNOR/popcount kernels.

    Args:
        w_rows: ``uint64 [N, ceil(k/64)]``, ``packing.pack_binary_rows(W)`` of ±1 weights.
        k: the true number of input features K.

    Returns:
        PackedWeights("w1a1"), data ``uint64 [ceil(N/32), ceil(k/64), 32]``.
    """
    k = _check_k(k)
    rows = _binary_rows(w_rows, k)
    n, words = rows.shape
    tiles = np.zeros((_ceil_div(n, _W1A1_COLS) * _W1A1_COLS, words), dtype=np.uint64)
    tiles[:n] = rows
    data = np.ascontiguousarray(tiles.reshape(-1, _W1A1_COLS, words).transpose(0, 2, 1))
    return PackedWeights("w1a1", n, k, data)


def _tile_codes(codes: np.ndarray, scheme: str, pad_code: int) -> np.ndarray:
    """Unsigned codes ``[N, K]`` -> the A8 tile layout (see PackedWeights)."""
    n, k = codes.shape
    bits, group = _CODE_BITS[scheme], _A8_GROUP[scheme]
    fields = 8 // bits  # code fields per byte
    tiles, groups = _ceil_div(n, _A8_COLS), _ceil_div(k, group)
    padded = np.full((tiles * _A8_COLS, groups * group), pad_code, dtype=np.uint8)
    padded[:n, :k] = codes
    # column = 64t + 16v + l, k = group*g + 4q + j  ->  [t, g, v, l, j, q]
    blocks = padded.reshape(tiles, 4, 16, groups, fields, 4).transpose(0, 3, 1, 2, 5, 4)
    shifts = (np.arange(fields, dtype=np.uint8) * bits).reshape(1, 1, 1, 1, 1, fields)
    packed = np.bitwise_or.reduce(blocks << shifts, axis=-1)
    return np.ascontiguousarray(packed.reshape(tiles, groups, 4, 64))


def untile_w158a8(w: PackedWeights) -> np.ndarray:
    """The ternary codes int8 ``[N, K]`` of W1.58A8 tiles: the inverse of :func:`prepack_w158a8`."""
    if w.scheme != "w1.58a8":
        raise ValueError(f"untile_w158a8 needs W1.58A8 tiles, got {w.scheme!r}")
    tiles, groups = w.data.shape[:2]
    fields = w.data.reshape(tiles, groups, 4, 16, 4)[..., None] >> (2 * np.arange(4, dtype=np.uint8))
    codes = (fields & 3).transpose(0, 2, 3, 1, 5, 4).reshape(tiles * _A8_COLS, groups * 16)
    return codes[: w.n, : w.k].astype(np.int8) - np.int8(1)


def prepack_w1a8(w_rows: Any, k: int) -> PackedWeights:
    """Tile binary weights for the binary x int8 (VNNI) kernels.

    Args:
        w_rows: ``uint64 [N, ceil(k/64)]``, ``packing.pack_binary_rows(W)`` of ±1 weights.
        k: the true number of input features K.

    Returns:
        PackedWeights("w1a8"), data ``uint8 [ceil(N/64), ceil(k/32), 4, 64]`` (1 bit per weight).
    """
    k = _check_k(k)
    signs = packing.unpack_binary_rows(_binary_rows(w_rows, k), k)
    return PackedWeights("w1a8", signs.shape[0], k, _tile_codes((signs > 0).view(np.uint8), "w1a8", 0))


def prepack_w158a8(trits: Any) -> PackedWeights:
    """Tile ternary weights for the ternary x int8 (VNNI) kernels.

    Args:
        trits: ``[N, K]`` integer codes in {-1, 0, +1} (numpy or torch, e.g. the codes of
            ``BitLinear.quantized_weight()``).

    Returns:
        PackedWeights("w1.58a8"), data ``uint8 [ceil(N/64), ceil(K/16), 4, 64]`` (2 bits per weight).
    """
    codes = _as_array(trits, "trits")
    if codes.dtype.kind not in "iu" or codes.dtype == np.uint64:
        raise TypeError(f"trits must be an integer array of -1, 0, +1, got dtype {codes.dtype}")
    if codes.ndim != 2 or min(codes.shape) < 1:
        raise ValueError(f"trits must be a non-empty 2-D [N, K] matrix, got shape {codes.shape}")
    if ((codes < -1) | (codes > 1)).any():
        bad = codes[(codes < -1) | (codes > 1)].flat[0]
        raise ValueError(f"trits must hold only -1, 0, +1, found {bad}")
    c = (codes.astype(np.int16) + 1).astype(np.uint8)
    return PackedWeights("w1.58a8", codes.shape[0], codes.shape[1], _tile_codes(c, "w1.58a8", 1))


def _check_threads(threads: Any) -> None:
    limit = numba.config.NUMBA_NUM_THREADS
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 1 <= threads <= limit
    ):
        raise ValueError(f"threads must be an int in [1, {limit}] (NUMBA_NUM_THREADS) or None, got {threads!r}")


def _check_packed(w: Any, scheme: str, fn: str) -> PackedWeights:
    if not isinstance(w, PackedWeights):
        builder = {"w1a1": "prepack_w1a1(rows, k)", "w1a8": "prepack_w1a8(rows, k)", "w1.58a8": "prepack_w158a8(trits)"}
        raise TypeError(
            f"{fn}: w must be PackedWeights from {builder[scheme]}, got {type(w).__name__}"
            + (f" {w.dtype} {w.shape}" if isinstance(w, np.ndarray) else "")
        )
    if w.scheme != scheme:
        raise ValueError(f"{fn}: w was prepacked for {w.scheme!r}, this kernel reads {scheme!r}")
    return w


def _check_activations(x: Any, dtype: type, width: int, fn: str, what: str) -> np.ndarray:
    """A C-contiguous 2-D ``dtype`` array [M, width], or a clear error."""
    array = _as_array(x, "x")
    if array.dtype != dtype:
        raise TypeError(f"{fn}: x must be {np.dtype(dtype).name} ({what}), got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{fn}: x must have shape [M, {width}] ({what}), got {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{fn}: x must be C-contiguous (use np.ascontiguousarray), got strides {array.strides}")
    return array
