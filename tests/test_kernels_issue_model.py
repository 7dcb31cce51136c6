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


def test_intel_with_two_fma_ports_has_a_w1a1_peak_ratio_near_11():
    b = IM.loop_bounds("avx512_intel")
    # vpopcntq on port 5 alone, xor and add on ports 0 and 5: 3 ops over 2 per cycle -> 341;
    # float32: 32 FMAs of 16 lanes on two FMA ports -> 32 MACs per cycle
    assert b["binary"] == pytest.approx(512 / 1.5) and b["f32"] == 32
    assert b["binary"] / b["f32"] == pytest.approx(10.67, abs=0.01)
    assert IM.loop_bounds("avx512")["binary"] / IM.loop_bounds("avx512")["f32"] == pytest.approx(21.3, abs=0.1)
    # int8 bytes: 8 vpdpbusd on two ports and 4 unpacking ops: 12 ops over 2 per cycle -> 6 cycles
    assert b["int8"] == pytest.approx(512 / 6)


def test_the_model_follows_the_path_and_the_vendor():
    assert IM.model_for("avx512", "GenuineIntel") == "avx512_intel"
    assert IM.model_for("avx512", "AuthenticAMD") == "avx512"
    assert IM.model_for("avx2", "AuthenticAMD") == "avx2" and IM.model_for("generic", "GenuineIntel") is None
