"""labutils.kernels.lut: ternary weights as table indices (1.67 bits a weight) and the one-token
lookup product, exact against an int64 matmul on every path this CPU runs."""

from __future__ import annotations

import numpy as np
import pytest

from labutils import kernels as K
from labutils.kernels import lut

PATHS = [p for p in ("avx2", "generic") if p == "generic" or "avx2" in K.available_paths()]


def ternary(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1, 2, size=(n, k)).astype(np.int8)


def test_patterns_are_the_canonical_triples():
    p = lut.PATTERNS.astype(int)
    assert p.shape == (14, 3) and (p[0] == 0).all()
    first_nonzero = [row[np.flatnonzero(row)[0]] for row in p[1:]]
    assert first_nonzero == [1] * 13 and len({tuple(r) for r in p}) == 14
    # with a sign, they cover all 27 triples
    assert {tuple(s * r) for r in p for s in (1, -1)} == {(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)}


@pytest.mark.parametrize("n, k", [(1, 1), (32, 24), (37, 50), (65, 200), (3, 1000)])
def test_pack_round_trips_and_counts_bytes(n, k):
    codes = ternary(n, k)
    w = K.pack_lut(codes)
    np.testing.assert_array_equal(K.unpack_lut(w), codes)
    tiles, octets = -(-n // 32), -(-k // 24)
    assert w.data.shape == (tiles, octets, 5, 32) and w.data.dtype == np.uint8
    assert w.neg_count.shape == (32 * tiles,) and w.triples == 8 * octets
    if n % 32 == 0 and k % 24 == 0:
        assert w.bits_per_weight == pytest.approx(5 / 3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, k", [(1, 1), (32, 24), (37, 50), (100, 1536), (64, 1000), (33, 2000)])
def test_gemv_is_exact(path, n, k):
    codes = ternary(n, k, seed=n + k)
    x = np.random.default_rng(k).integers(-128, 128, size=k).astype(np.int8)
    expected = codes.astype(np.int64) @ x.astype(np.int64)
    np.testing.assert_array_equal(K.lut_gemv(x, K.pack_lut(codes), path), expected)


@pytest.mark.parametrize("path", PATHS)
def test_gemv_holds_the_int16_extremes(path):
    """Every triple at its largest |entry| (x = -128, all weights -1, or all +1): the int16 lanes
    are widened before they can wrap (64 triples a block), on long rows."""
    k = 3 * 64 * 5 + 7
    x = np.full(k, -128, np.int8)
    for sign in (-1, 1):
        codes = np.full((40, k), sign, np.int8)
        np.testing.assert_array_equal(K.lut_gemv(x, K.pack_lut(codes), path), codes.astype(np.int64) @ x)


def test_tables_hold_each_pattern_dot_in_two_bytes():
    x = np.array([5, -7, 127, -128, 1], np.int8)
    tables = np.empty((2, 32), np.uint8)
    lut.build_tables(x, tables)
    for g in range(2):
        triple = np.zeros(3, np.int64)
        part = x[3 * g : 3 * g + 3].astype(np.int64)
        triple[: part.size] = part
        entries = tables[g, :14].astype(np.int64) | (tables[g, 16:30].astype(np.int8).astype(np.int64) << 8)
        np.testing.assert_array_equal(entries, lut.PATTERNS.astype(np.int64) @ triple)
        assert not tables[g, 14:16].any() and not tables[g, 30:32].any()


def test_untile_inverts_the_w158a8_tiles():
    codes = ternary(70, 33, seed=4)
    np.testing.assert_array_equal(K.untile_w158a8(K.prepack_w158a8(codes)), codes)
    with pytest.raises(ValueError, match="W1.58A8"):
        K.untile_w158a8(K.prepack_w1a8(np.zeros((2, 1), np.uint64), 3))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="ternary"):
        K.pack_lut(np.array([[0, 2]], np.int8))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        K.pack_lut(np.zeros(4, np.int8))
    w = K.pack_lut(ternary(4, 6))
    with pytest.raises(ValueError, match="int8"):
        K.lut_gemv(np.zeros(6, np.int16), w)
    with pytest.raises(ValueError, match="shape"):
        K.lut_gemv(np.zeros(7, np.int8), w)
    with pytest.raises(ValueError, match="path"):
        K.lut_gemv(np.zeros(6, np.int8), w, "neon")
