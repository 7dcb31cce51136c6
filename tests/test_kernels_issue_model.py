"""labutils.kernels.issue_model: the issue-bound MACs per cycle of each inner loop."""

from __future__ import annotations

import pytest

from labutils.kernels import issue_model as IM


def test_avx512_bounds_are_the_figures_the_book_quotes():
    b = IM.loop_bounds("avx512")
    # W1A1: xor, vpopcntq, add on one 512-bit register, 2 vector ops per cycle -> 512 / 1.5
    assert b["binary"] == pytest.approx(512 / 1.5)
    # int8 bytes: 8 vpdpbusd + 4 unpacking ops, multiplies bound (1 per cycle) -> 64
    assert b["int8"] == 64
    # float32: 32 FMAs of 16 lanes, one multiply per cycle -> 16
    assert b["f32"] == 16


def test_avx2_bounds_are_shuffle_and_multiply_limited():
    b = IM.macs_per_cycle("avx2")
    loops = IM.inner_loops("avx2")
    assert [row[-1] for row in loops] == [1, 1, 2, 2, 32]  # weight bits per loop
    # W1A1: 2 registers x 6 ops = 12 ops over 4 per cycle, 4 vpshufb over 2 per cycle -> 3 cycles
    assert b[loops[0][0]] == pytest.approx(512 / 3)
    # bytes: 16 vpmaddubsw over 2 multiplies per cycle -> 8 cycles, but 40 ops / 4 -> 10 cycles
    assert b[loops[3][0]] == pytest.approx(512 / 10)
    assert IM.loop_bounds("avx2")["f32"] == 16  # 64 FMAs of 8 lanes, 2 per cycle


def test_bit_planes_cost_8_and_16_xnor_loops():
    for isa in IM.ISA_MODELS:
        loops = IM.inner_loops(isa)
        assert loops[1][1] == 8 * loops[0][1] and loops[2][1] == 16 * loops[0][1]


def test_an_unknown_isa_names_the_known_ones():
    with pytest.raises(ValueError, match="avx2.*avx512"):
        IM.macs_per_cycle("neon")
