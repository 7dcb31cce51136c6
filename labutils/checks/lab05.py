"""Self-checks for Lab 5, Packed storage (``labs/source/lab05_packing``).

The packers are compared byte for byte with ``labutils.packing`` at every length from 0 to 20
(every padding) and on 2-D inputs; ``model_size`` with ``labutils.packfile.size_report`` on a small
model of the check's own that has an embedding, a norm, biases and an integer buffer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from labutils import packing
from labutils.checks._common import _fail, _function, _mistake, _ok, _run, _typed, _where

__all__ = ["check_lab5_pack_signs", "check_lab5_pack_2bit", "check_lab5_pack_base3", "check_lab5_model_size"]


def _inputs(values: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Random int8 codes from ``values`` of every length 0..20, and a 2-D [3, 7] array."""
    rng = np.random.default_rng(seed)
    arrays = [rng.choice(values, size=n).astype(np.int8) for n in range(21)]
    return arrays + [rng.choice(values, size=(3, 7)).astype(np.int8)]


def _bits_to_bytes(bits: np.ndarray, order: str = "little") -> np.ndarray:
    return np.packbits(bits.astype(np.uint8), bitorder=order)


def _check_packer(pack: Callable, unpack: Callable, names: tuple[str, str], per_byte: int, example: np.ndarray,
                  example_byte: int, reference: Callable, inputs: list[np.ndarray], pack_mistakes: Callable,
                  unpack_mistakes: Callable, what: str) -> None:
    """The common part of Exercises 1 to 3: the example byte, every length, the inverse."""
    pack_name, unpack_name = names
    _function(pack, pack_name)
    _function(unpack, unpack_name)
    for codes in [example, *inputs]:
        n = codes.size
        packed, call = _run(pack, pack_name, codes)
        expected = reference(codes)
        _typed(packed, call, "the result", np.ndarray, dtype=np.uint8)
        if packed.shape != expected.shape:
            hint = ""
            if packed.shape == (n // per_byte,):
                hint = f": round up, ceil(n / {per_byte}), and pad the last byte"
            elif packed.ndim != 1:
                hint = ": flatten the input first (reshape(-1)), one row of bytes"
            raise _fail(call, f"{n} {what} take {expected.size} bytes, shape {list(expected.shape)}; got "
                              f"{list(packed.shape)}{hint}")
        if not np.array_equal(packed, expected):
            if codes is example:
                got = int(packed[0])
                raise _fail(call, f"expected 0x{example_byte:02x} = 0b{example_byte:08b}, got 0x{got:02x} = 0b{got:08b}"
                                  f"{': ' + m if (m := _mistake(packed, pack_mistakes(codes))) else ''}")
            words = _mistake(packed, pack_mistakes(codes))
            raise _fail(call, words or f"bytes differ from labutils.packing {_where(packed, expected)}")
        back, call = _run(unpack, unpack_name, expected, n)
        _typed(back, call, "the result", np.ndarray, dtype=np.int8)
        if not np.array_equal(back, codes.reshape(-1)):
            words = _mistake(back, unpack_mistakes(codes, expected))
            if words is None and back.shape != (n,):
                words = f"return the first n = {n} {what}, shape [{n}] (the padding is not part of them)"
            raise _fail(call, words or f"not the {what} that were packed {_where(back, codes.reshape(-1))}")


def check_lab5_pack_signs(pack_signs: Callable, unpack_signs: Callable) -> bool:
    """Exercise 1: ``pack_signs`` (weight 8j + i in bit i of byte j, +1 -> 1, padding 0 bits) and
    ``unpack_signs`` against ``packing.pack_binary``."""
    def pack_mistakes(s: np.ndarray) -> tuple:
        bits = (s.reshape(-1) > 0).astype(np.uint8)
        pad_ones = np.concatenate([bits, np.ones(-bits.size % 8, np.uint8)])
        return ((lambda: _bits_to_bytes(bits, "big"), "the bits are in reverse order: weight 8j + i goes into bit i "
                                                       "(the first weight in the least significant bit)"),
                (lambda: _bits_to_bytes(1 - bits), "+1 is bit 1 and -1 is bit 0; you stored the opposite"),
                (lambda: _bits_to_bytes(pad_ones), "pad the last byte with 0 bits, not 1 bits"))

    def unpack_mistakes(s: np.ndarray, packed: np.ndarray) -> tuple:
        n = s.size
        bits = np.unpackbits(packed, bitorder="little")
        return ((lambda: bits[:n].astype(np.int8), "those are the bits; the signs are 2·bit - 1 (bit 1 -> +1, 0 -> -1)"),
                (lambda: (2 * bits.astype(np.int8) - 1), f"return the first n = {n} signs: drop the padding"),
                (lambda: 2 * np.unpackbits(packed, bitorder="big")[:n].astype(np.int8) - 1,
                 "the bits are read in reverse order: weight 8j + i is bit i"))

    example = np.array([1, -1, -1, 1, 1, 1, -1, -1], dtype=np.int8)
    _check_packer(pack_signs, unpack_signs, ("pack_signs", "unpack_signs"), 8, example, 0x39, packing.pack_binary,
                  _inputs((-1, 1), 11), pack_mistakes, unpack_mistakes, "signs")
    return _ok("every length from 0 to 20 and a 2-D input packs as packing.pack_binary and unpacks back")


def _two_bit(codes: np.ndarray, shifts: tuple[int, ...] = (0, 2, 4, 6)) -> np.ndarray:
    codes = np.pad(codes.astype(np.uint8), (0, -codes.size % 4), constant_values=1)
    return (codes.reshape(-1, 4) << np.array(shifts, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


def check_lab5_pack_2bit(pack_2bit: Callable, unpack_2bit: Callable) -> bool:
    """Exercise 2: ``pack_2bit`` (code w + 1 of weight 4j + i in bits 2i, 2i+1 of byte j, padding code
    01) and ``unpack_2bit`` against ``packing.pack_ternary_2bit``."""
    def pack_mistakes(t: np.ndarray) -> tuple:
        flat = t.reshape(-1).astype(np.int16)
        return ((lambda: _two_bit(flat + 1, (6, 4, 2, 0)), "the weights are in reverse order in the byte: weight 4j + i "
                                                           "goes into bits 2i (low) and 2i + 1, weight 0 in bits 1-0"),
                (lambda: _two_bit(flat & 0b11), "you stored the trits (two's complement); store the codes w + 1 in {0, 1, 2}"),
                (lambda: packing.pack_ternary_2bit(np.pad(flat, (0, -flat.size % 4), constant_values=-1).astype(np.int8)),
                 "pad with zero weights (code 01), not code 00 (a -1 weight)"))

    def unpack_mistakes(t: np.ndarray, packed: np.ndarray) -> tuple:
        n = t.size
        codes = ((packed[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)
        return ((lambda: codes[:n].astype(np.int8), "those are the codes; the trits are code - 1"),
                (lambda: codes.astype(np.int8) - 1, f"return the first n = {n} trits: drop the padding"))

    example = np.array([1, 0, -1, 0], dtype=np.int8)
    _check_packer(pack_2bit, unpack_2bit, ("pack_2bit", "unpack_2bit"), 4, example, 0x46, packing.pack_ternary_2bit,
                  _inputs((-1, 0, 1), 12), pack_mistakes, unpack_mistakes, "trits")
    return _ok("every length from 0 to 20 and a 2-D input packs as packing.pack_ternary_2bit and unpacks back")


def check_lab5_pack_base3(pack_base3: Callable, unpack_base3: Callable) -> bool:
    """Exercise 3: ``pack_base3`` (five digits w + 1 per byte, the first weight the most significant,
    stored as ceil(256 q / 243), padding digit 1) and ``unpack_base3`` against
    ``packing.pack_ternary_base3``, on all 243 groups too."""
    def groups(t: np.ndarray, pad: int = 1) -> np.ndarray:
        digits = np.pad(t.reshape(-1).astype(np.int64) + 1, (0, -t.size % 5), constant_values=pad)
        return digits.reshape(-1, 5)

    def pack_mistakes(t: np.ndarray) -> tuple:
        weights = np.array([81, 27, 9, 3, 1])
        return ((lambda: (groups(t) @ weights).astype(np.uint8), "you stored q itself; store ceil(256 q / 243)"),
                (lambda: ((groups(t) @ weights) * 256 // 243).astype(np.uint8),
                 "round up: (256 q + 242) // 243, not 256 q // 243 (rounded down, the digits decode wrong)"),
                (lambda: (((groups(t) @ weights[::-1]) * 256 + 242) // 243).astype(np.uint8),
                 "the first weight is the most significant digit: q = 81 d_0 + 27 d_1 + 9 d_2 + 3 d_3 + d_4"),
                (lambda: (((groups(t, pad=0) @ weights) * 256 + 242) // 243).astype(np.uint8),
                 "pad with zero weights (digit 1), not digit 0 (a -1 weight)"))

    def unpack_mistakes(t: np.ndarray, packed: np.ndarray) -> tuple:
        n = t.size
        digits = ((3 * ((packed.astype(np.int64)[:, None] * np.array([1, 3, 9, 27, 81])) % 256)) >> 8)
        return ((lambda: digits.reshape(-1)[:n].astype(np.int8), "those are the digits; the trits are digit - 1"),
                (lambda: (digits[:, ::-1].reshape(-1)[:n] - 1).astype(np.int8),
                 "the digits come out first weight first: d_i = (3 · (3^i b mod 256)) >> 8"),
                (lambda: (digits.reshape(-1) - 1).astype(np.int8), f"return the first n = {n} trits: drop the padding"))

    example = np.array([1, -1, 1, -1, 1], dtype=np.int8)
    every_group = np.array(np.meshgrid(*[[-1, 0, 1]] * 5, indexing="ij"), dtype=np.int8).reshape(5, -1).T
    _check_packer(pack_base3, unpack_base3, ("pack_base3", "unpack_base3"), 5, example, 0xC0,
                  packing.pack_ternary_base3, [every_group, *_inputs((-1, 0, 1), 13)], pack_mistakes, unpack_mistakes,
                  "trits")
    return _ok("all 243 groups of five, every length from 0 to 20 and a 2-D input pack as "
               "packing.pack_ternary_base3 and unpack back")


class _Tiny(nn.Module):
    """An embedding, two linears (one without bias), a LayerNorm and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.blocks = nn.Sequential(nn.Linear(12, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False))
        self.register_buffer("position_ids", torch.arange(10))


_PER_BYTE = {"int8": 1, "2-bit": 4, "1.6-bit": 5, "1-bit": 8}
_SCHEMES = {"2-bit": "ternary2", "1.6-bit": "ternary3", "1-bit": "binary"}


def check_lab5_model_size(weight_bytes: Callable, model_size: Callable) -> bool:
    """Exercise 4: ``weight_bytes(n, variant)`` against ``packing.packed_nbytes`` for every n up to 40,
    and ``model_size(model, variant)`` against ``packfile.size_report(model, float_dtype="fp16")``."""
    from labutils import packfile

    _function(weight_bytes, "weight_bytes")
    _function(model_size, "model_size")
    for variant, per_byte in _PER_BYTE.items():
        for n in (*range(41), 147_456):
            mine, call = _run(weight_bytes, "weight_bytes", n, variant)
            expected = n if variant == "int8" else packing.packed_nbytes(n, _SCHEMES[variant])
            if isinstance(mine, bool) or not isinstance(mine, (int, np.integer)):
                raise _fail(call, f"return an int, in integer arithmetic (-(-n // k) rounds up), got {type(mine).__name__}")
            if mine != expected:
                words = {n // per_byte: f"round up: the last byte is padded, ceil(n / {per_byte}) = {expected}",
                         expected + 4: "without the scale: model_size adds its 4 bytes",
                         8 * expected: "that is bits; give bytes"}.get(int(mine))
                raise _fail(call, f"{mine}, expected {expected}" + (f": {words}" if words else ""))
    tiny = _Tiny()
    reference = {r.variant: r for r in packfile.size_report(tiny, float_dtype="fp16")}
    n_linear = 2
    for variant in ("fp32", "fp16", "int8", "2-bit", "1.6-bit", "1-bit"):
        parts, call = _run(model_size, "model_size", tiny, variant)
        call += " [an Embedding(50, 12), Linear(12, 7), LayerNorm(7), Linear(7, 3, bias=False), an int64 buffer of 10]"
        if not isinstance(parts, dict) or set(parts) != {"embeddings", "linear", "rest"}:
            raise _fail(call, f"return a dict with the keys embeddings, linear, rest; got {parts!r}")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in parts.values()):
            raise _fail(call, f"the byte counts must be ints, got {parts}")
        expected = {p: getattr(reference[variant], p) for p in parts}
        messages = []
        for part in ("embeddings", "linear", "rest"):
            mine, want = int(parts[part]), expected[part]
            if mine == want:
                continue
            diff = mine - want
            words = {-4 * n_linear: "add one float32 scale (4 bytes) per linear weight tensor",
                     -2 * n_linear: "a scale is a float32: 4 bytes, not 2",
                     -40: "the int64 buffer keeps its own size, numel() × element_size() = 80 bytes, not a float's",
                     -60: "the int64 buffer keeps its own size, numel() × element_size() = 80 bytes, not a float's",
                     }.get(diff)
            if words is None and variant not in ("fp32", "fp16") and part != "linear" and mine == 2 * want - 80 * (part == "rest"):
                words = "in the packed variants every other float tensor is fp16, 2 bytes per value"
            messages.append(f"{part} {mine:,} bytes, expected {want:,}" + (f": {words}" if words else ""))
        if messages:
            raise _fail(call, "; ".join(messages))
    return _ok("weight_bytes for every count up to 40; model_size equals packfile.size_report in all six variants, "
               "scales, biases, norms and an integer buffer included")
