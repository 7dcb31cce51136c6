"""Tests for labutils.packing: exact round trips, exact sizes, documented bit layouts, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from labutils import packing
from labutils.packing import (
    SCHEMES,
    pack,
    pack_binary,
    pack_binary_rows,
    pack_ternary_2bit,
    pack_ternary_base3,
    pack_uint,
    packed_nbytes,
    unpack,
    unpack_binary,
    unpack_binary_rows,
    unpack_ternary_2bit,
    unpack_ternary_base3,
    unpack_uint,
)

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=23)
trit_arrays = hnp.arrays(np.int8, shapes, elements=st.integers(-1, 1))
sign_arrays = hnp.arrays(np.int8, shapes, elements=st.sampled_from([-1, 1]))
# Lengths around every block size: multiples of 4, 5, 8, 64 and their neighbours.
edge_lengths = st.sampled_from(
    sorted({m * k + d for m in (4, 5, 8, 64) for k in (0, 1, 2, 3) for d in (-1, 0, 1) if m * k + d >= 0})
)


# --- round trips and sizes ------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(trits=trit_arrays)
def test_ternary_round_trips_exactly_for_any_shape(trits):
    for scheme in ("ternary2", "ternary3"):
        p = pack(trits, scheme)
        assert p.data.dtype == np.uint8 and p.data.ndim == 1
        assert p.data.size == math.ceil(trits.size / SCHEMES[scheme].weights_per_byte)
        back = unpack(p)
        assert back.dtype == np.int8 and back.shape == trits.shape
        np.testing.assert_array_equal(back, trits)


@settings(max_examples=150, deadline=None)
@given(signs=sign_arrays)
def test_binary_round_trips_exactly_for_any_shape(signs):
    packed = pack_binary(signs)
    assert packed.size == math.ceil(signs.size / 8)
    back = unpack_binary(packed, signs.shape)
    assert back.dtype == np.int8 and back.shape == signs.shape
    np.testing.assert_array_equal(back, signs)


@settings(max_examples=60, deadline=None)
@given(n=edge_lengths, seed=st.integers(0, 2**32 - 1))
def test_every_scheme_round_trips_at_block_edges(n, seed):
    rng = np.random.default_rng(seed)
    trits = rng.integers(-1, 2, n).astype(np.int8)
    signs = np.where(rng.random(n) < 0.5, -1, 1).astype(np.int8)
    np.testing.assert_array_equal(unpack_ternary_2bit(pack_ternary_2bit(trits), n), trits)
    np.testing.assert_array_equal(unpack_ternary_base3(pack_ternary_base3(trits), n), trits)
    np.testing.assert_array_equal(unpack_binary(pack_binary(signs), n), signs)
    assert pack_ternary_2bit(trits).size == -(-n // 4) == packed_nbytes(n, "ternary2")
    assert pack_ternary_base3(trits).size == -(-n // 5) == packed_nbytes(n, "ternary3")
    assert pack_binary(signs).size == -(-n // 8) == packed_nbytes(n, "binary")


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(0, 5),
    k=edge_lengths,
    seed=st.integers(0, 2**32 - 1),
)
def test_binary_rows_round_trip_and_word_layout(rows, k, seed):
    rng = np.random.default_rng(seed)
    signs = np.where(rng.random((rows, k)) < 0.5, -1, 1).astype(np.int8)
    words = pack_binary_rows(signs)
    assert words.dtype == np.uint64 and words.shape == (rows, -(-k // 64))
    np.testing.assert_array_equal(unpack_binary_rows(words, k), signs)
    # The contract, bit by bit: column c of row r is bit c % 64 of word c // 64; padding is 0.
    for r in range(rows):
        for c in range(64 * words.shape[1]):
            bit = int(words[r, c // 64] >> np.uint64(c % 64)) & 1
            assert bit == (c < k and signs[r, c] == 1)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), n=edge_lengths, seed=st.integers(0, 2**32 - 1))
def test_uint_bitstream_round_trips(bits, n, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = pack_uint(values, bits)
    assert packed.size == math.ceil(n * bits / 8)
    np.testing.assert_array_equal(unpack_uint(packed, bits, n), values)


def test_empty_and_single_element():
    for scheme, values in (("binary", (-1, 1)), ("ternary2", (-1, 0, 1)), ("ternary3", (-1, 0, 1))):
        empty = pack(np.zeros(0, np.int8), scheme)
        assert empty.data.size == 0 and unpack(empty).shape == (0,)
        assert pack(np.zeros((3, 0), np.int8), scheme).data.size == 0
        for v in values:
            one = pack(np.array(v, np.int8), scheme)  # 0-d: shape () round trips too
            assert one.data.size == 1 and unpack(one).shape == () and unpack(one) == v
    assert pack_binary_rows(np.zeros((2, 0), np.int8)).shape == (2, 0)
    assert unpack_binary_rows(np.zeros((2, 0), np.uint64), 0).shape == (2, 0)


def test_torch_and_other_dtypes_are_accepted():
    rng = np.random.default_rng(1)
    trits = rng.integers(-1, 2, (7, 9))
    for x in (
        torch.from_numpy(trits),
        torch.from_numpy(trits).float(),
        trits.astype(np.float32),
        trits.astype(np.int64),
        torch.from_numpy(trits).to(torch.bfloat16),
        trits.tolist(),
    ):
        np.testing.assert_array_equal(unpack_ternary_base3(pack_ternary_base3(x), (7, 9)), trits)
        np.testing.assert_array_equal(unpack_ternary_2bit(pack_ternary_2bit(x), (7, 9)), trits)
    packed = torch.from_numpy(pack_ternary_2bit(trits))
    np.testing.assert_array_equal(unpack_ternary_2bit(packed, 63), trits.reshape(-1))


# --- the documented layouts, bit by bit -----------------------------------------------------


def test_binary_layout_is_little_bit_order():
    signs = np.array([1, -1, -1, -1, -1, -1, -1, -1, 1, 1], np.int8)
    np.testing.assert_array_equal(pack_binary(signs), [0b00000001, 0b00000011])


def test_ternary2_layout_matches_docstring():
    # (+1, 0, -1, 0) -> codes (10, 01, 00, 01), weight 0 in the low bits: 0b01_00_01_10.
    np.testing.assert_array_equal(pack_ternary_2bit(np.array([1, 0, -1, 0])), [0x46])
    # Padding is weight 0 (code 01): one weight -1 -> 0b01_01_01_00.
    np.testing.assert_array_equal(pack_ternary_2bit(np.array([-1])), [0b01010100])
    # It is the 2-bit bitstream of w + 1.
    trits = np.random.default_rng(2).integers(-1, 2, 64)
    np.testing.assert_array_equal(pack_ternary_2bit(trits), pack_uint(trits + 1, 2))


def test_base3_layout_matches_tq1_0_for_all_243_groups():
    digits = np.stack(np.meshgrid(*[np.arange(3)] * 5, indexing="ij"), -1).reshape(-1, 5)
    q = digits @ np.array([81, 27, 9, 3, 1])  # the first weight is the most significant digit
    np.testing.assert_array_equal(q, np.arange(243))
    packed = pack_ternary_base3((digits - 1).reshape(-1))
    np.testing.assert_array_equal(packed, (q * 256 + 242) // 243)  # ceil(q * 256 / 243)
    # TQ1_0's decode: digit i = ((byte * 3^i) mod 256) * 3 >> 8.
    byte = packed.astype(np.int64)[:, None]
    decoded = ((byte * np.array([1, 3, 9, 27, 81])) % 256 * 3) >> 8
    np.testing.assert_array_equal(decoded, digits)
    assert len(set(packed.tolist())) == 243


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, -2, 127, -128, 3])
def test_ternary_rejects_values_outside_the_set(bad):
    trits = np.zeros(13, np.int8)
    trits[11] = bad
    for packer in (pack_ternary_2bit, pack_ternary_base3):
        with pytest.raises(ValueError, match=rf"trits must contain only \(-1, 0, 1\); found {bad} at flat index 11"):
            packer(trits)


@pytest.mark.parametrize("bad", [0, 2, -128])
def test_binary_rejects_values_outside_the_set(bad):
    signs = np.ones(20, np.int8)
    signs[3] = bad
    with pytest.raises(ValueError, match=r"signs must contain only \(-1, 1\); found .* at flat index 3"):
        pack_binary(signs)
    with pytest.raises(ValueError, match="signs must contain only"):
        pack_binary_rows(signs.reshape(4, 5))


@pytest.mark.parametrize("bad", [0.5, np.nan, np.inf, 257.0])
def test_fractions_nan_inf_and_wrapping_values_are_refused(bad):
    x = np.zeros(6, np.float32)
    x[4] = bad
    with pytest.raises(ValueError, match="at flat index 4"):
        pack_ternary_2bit(x)
    with pytest.raises(ValueError, match="at flat index 4"):
        pack_ternary_base3(torch.from_numpy(x))
    wide = np.zeros(6, np.int64)
    wide[2] = 257  # would wrap to 1 in int8
    with pytest.raises(ValueError, match="found 257 at flat index 2"):
        pack_ternary_base3(wide)


@pytest.mark.parametrize("x", [np.ones(4, bool), np.ones(4, np.uint8), np.ones(4, np.complex64), "1010"])
def test_wrong_dtypes_are_type_errors(x):
    for packer in (pack_binary, pack_ternary_2bit, pack_ternary_base3):
        with pytest.raises(TypeError, match="signs|trits"):
            packer(x)


def test_unpack_checks_dtype_length_count_and_codes():
    packed = pack_ternary_2bit(np.ones(10, np.int8))
    with pytest.raises(TypeError, match="packed must be uint8"):
        unpack_ternary_2bit(packed.astype(np.int16), 10)
    with pytest.raises(ValueError, match="packed has 3 bytes, but 13 weights .* take exactly 4"):
        unpack_ternary_2bit(packed, 13)
    with pytest.raises(ValueError, match="padding"):
        unpack_ternary_2bit(packed, 9)  # same byte count, but weight 10 is not padding
    with pytest.raises(ValueError, match="invalid 2-bit code 0b11"):
        unpack_ternary_2bit(np.array([0b01_01_11_01], np.uint8), 4)
    with pytest.raises(ValueError, match="not a base-3 byte"):
        non_canonical = np.flatnonzero(~packing._BASE3_CANONICAL)[0]
        unpack_ternary_base3(np.array([non_canonical], np.uint8), 5)
    with pytest.raises(ValueError, match="padding"):
        unpack_ternary_base3(pack_ternary_base3(np.array([1, 1, 1])), 2)
    with pytest.raises(ValueError, match="padding bits"):
        unpack_binary(pack_binary(np.ones(3, np.int8)), 2)
    with pytest.raises(ValueError, match="shape must be a count"):
        unpack_binary(np.zeros(1, np.uint8), -1)
    with pytest.raises(ValueError, match="must have shape"):
        unpack_binary_rows(np.zeros((2, 1), np.uint64), 65)
    with pytest.raises(ValueError, match="padding bits"):
        unpack_binary_rows(np.full((2, 1), 2**63, np.uint64), 63)
    with pytest.raises(ValueError, match="2-D"):
        pack_binary_rows(np.ones(8, np.int8))
    with pytest.raises(ValueError, match="scheme must be one of"):
        pack(np.zeros(3, np.int8), "ternary4")
    with pytest.raises(ValueError, match="bits must be an integer in 1..8"):
        pack_uint(np.zeros(3, np.uint8), 9)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 4\)"):
        pack_uint(np.array([0, 4]), 2)
