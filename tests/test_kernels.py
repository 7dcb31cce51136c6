"""Tests for labutils.kernels: every kernel exact on every path this CPU runs, the SIMD
vocabulary, the path switches (use(), LABBOOK_KERNEL_PATH), and the assembly each path gets.

(Bad input, the packed layer and the benchmark: tests/test_kernels_layer.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from labutils import kernels as K
from labutils import packing
from labutils.kernels import amx, asm, cpu, dispatch, simd

THREADS = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
FAST = settings(max_examples=15, deadline=None)
DATA = Path(__file__).parent / "data"


def _path_param(path: str):
    missing = cpu.missing_features(path)
    reason = f"this CPU lacks {', '.join(missing)} for the {path} path"
    return pytest.param(path, marks=pytest.mark.skipif(bool(missing), reason=reason), id=path)


PATHS = [_path_param(p) for p in K.PATHS]

# --------------------------------------------------------------------------- helpers


def _signs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int8)


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The numpy int64 matmul every kernel must equal: x [M, K] @ w [N, K]^T."""
    return x.astype(np.int64) @ w.astype(np.int64).T


@contextlib.contextmanager
def _kernel_for(threads: int) -> Iterator[None]:
    """threads 1: the serial kernel; more: the parallel kernel, even on inputs this small."""
    old = dict(dispatch._PARALLEL_MIN_MACS)
    if threads > 1:
        dispatch._PARALLEL_MIN_MACS.update(dict.fromkeys(old, 0))
    try:
        yield
    finally:
        dispatch._PARALLEL_MIN_MACS.update(old)


def _run(scheme: str, x: np.ndarray, w: np.ndarray, threads: int, path: str) -> np.ndarray:
    """x and w as int8 codes -> the scheme's kernel on ``path`` on their packed forms."""
    k = x.shape[1]
    with _kernel_for(threads), K.use(path):
        if scheme == "w1a1":
            packed = K.prepack_w1a1(packing.pack_binary_rows(w), k)
            return K.w1a1_gemm(packing.pack_binary_rows(x), packed, threads=threads)
        if scheme == "w1a8":
            return K.w1a8_gemm(x, K.prepack_w1a8(packing.pack_binary_rows(w), k), threads=threads)
        return K.w158a8_gemm(x, K.prepack_w158a8(w), threads=threads)


def _operands(scheme: str, m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = _signs(rng, (m, k)) if scheme == "w1a1" else rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8) if scheme == "w1.58a8" else _signs(rng, (n, k))
    return x, w


# --------------------------------------------------------------------------- exactness, every path

# Sizes around every block edge: 4-row tiles, 16/32/64-wide k groups, 8/16/32/64-column blocks.
SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", K.SCHEMES)
@given(m=st.integers(1, 11), k=SIZES, n=SIZES, threads=st.sampled_from(THREADS), seed=st.integers(0, 2**16))
@FAST
def test_gemm_equals_int64_reference(path, scheme, m, k, n, threads, seed):
    x, w = _operands(scheme, m, k, n, seed)
    out = _run(scheme, x, w, threads, path)
    assert out.dtype == np.int32 and out.shape == (m, n) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _reference(x, w))


# K = 1; M = 1 and N = 1; odd K with padding bits; 4-row blocks and leftovers; the 16-row panel;
# K beyond 31 words (W1A1 byte counters) and beyond 63 int16 steps (AVX2 A8) and 128-row tasks.
EDGE_SHAPES = [(1, 1, 1), (3, 1, 5), (1, 64, 1), (1, 4097, 1), (261, 200, 70), (6, 1000, 3), (2, 4096, 130),
               (20, 2049, 65), (131, 333, 33)]  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", K.SCHEMES)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("m,k,n", EDGE_SHAPES)
def test_gemm_edge_shapes(path, scheme, threads, m, k, n):
    x, w = _operands(scheme, m, k, n, seed=m * k * n)
    np.testing.assert_array_equal(_run(scheme, x, w, threads, path), _reference(x, w))


@pytest.mark.parametrize("path", PATHS)
def test_extreme_values_are_exact(path):
    """All activations -128 or +127, all weights one sign, K long enough to fill the int16 sums
    of the AVX2 path many times over and the generic path's (64 bytes a step) twice: the largest
    sums, no overflow or saturation."""
    k, n = 2 * 4096 + 24, 64
    for value in (-128, 127):
        x = np.full((20, k), value, dtype=np.int8)  # 20 rows: the decoded panel and the leftovers
        for sign in (-1, 1):
            w = np.full((n, k), sign, dtype=np.int8)
            np.testing.assert_array_equal(_run("w1a8", x, w, 1, path), _reference(x, w))
            np.testing.assert_array_equal(_run("w1.58a8", x, w, 1, path), _reference(x, w))
    x = np.full((5, k), -128, dtype=np.int8)
    w = np.ones((n, k), dtype=np.int8)
    w[:, ::2] = 0  # codes 1 and 2 alternate: pairs of 2*(-128) + 1*(-128)
    np.testing.assert_array_equal(_run("w1.58a8", x, w, 1, path), _reference(x, w))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", K.SCHEMES)
def test_gemv_and_packed_matmul_agree_with_gemm(path, scheme):
    x, w = _operands(scheme, 3, 150, 70, seed=1)
    gemm = _run(scheme, x, w, 1, path)
    if scheme == "w1a1":
        packed, xs = K.prepack_w1a1(packing.pack_binary_rows(w), 150), packing.pack_binary_rows(x)
        gemv = K.w1a1_gemv
    elif scheme == "w1a8":
        packed, xs, gemv = K.prepack_w1a8(packing.pack_binary_rows(w), 150), x, K.w1a8_gemv
    else:
        packed, xs, gemv = K.prepack_w158a8(w), x, K.w158a8_gemv
    with K.use(path):
        for i in range(3):
            np.testing.assert_array_equal(gemv(xs[i], packed), gemm[i])
            np.testing.assert_array_equal(K.packed_matmul(xs[i], packed), gemm[i])
        np.testing.assert_array_equal(K.packed_matmul(xs, packed, threads=1), gemm)
        np.testing.assert_array_equal(K.packed_matmul(torch.from_numpy(xs), packed), gemm)  # torch in


def test_simple_kernel_equals_reference():
    rng = np.random.default_rng(2)
    x, w = _signs(rng, (7, 130)), _signs(rng, (9, 130))
    out = K.w1a1_gemm_simple(packing.pack_binary_rows(x), packing.pack_binary_rows(w), 130)
    np.testing.assert_array_equal(out, _reference(x, w))


def test_forced_generic_path_in_a_fresh_process():
    """LABBOOK_KERNEL_PATH=generic: a new process runs the generic kernels, exactly."""
    program = "\n".join([
        "import numpy as np", "from labutils import kernels as K, packing",
        "assert K.active_path() == 'generic' and K.cpu_features()['path'] == 'generic'",
        "rng = np.random.default_rng(0)", "x = rng.integers(-128, 128, (5, 77), dtype=np.int8)",
        "w = rng.integers(-1, 2, (9, 77), dtype=np.int8)",
        "assert (K.w158a8_gemm(x, K.prepack_w158a8(w)) == x.astype(np.int64) @ w.T.astype(np.int64)).all()",
        "print('ok')",
    ])  # fmt: skip
    env = {**os.environ, "LABBOOK_KERNEL_PATH": "generic"}
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------- the SIMD vocabulary


@njit
def _popcounts(words):
    out = np.empty(words.size, dtype=np.int64)
    for i in range(words.size):
        out[i] = K.popcount(words[i])
    return out


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50))
@FAST
def test_popcount_intrinsic(values):
    words = np.array(values, dtype=np.uint64)
    assert _popcounts(words).tolist() == [v.bit_count() for v in values]


@njit
def _dpbusd_both(u8, s8, acc):
    fast = simd._dpbusd(acc, u8, s8)
    portable = simd._dpbusd_portable(acc, u8, s8)
    out = np.empty((2, 16), dtype=np.int32)
    simd._store_affine(out, 0, fast, 1, 0)
    simd._store_affine(out, 16, portable, 1, 0)
    return out


@njit
def _vnni_once(u8, s8_bytes):
    return _dpbusd_both(simd._vload(u8, 0), simd._vload(s8_bytes, 0), simd._vzeros_i32())


def test_dpbusd_fallback_equals_vnni():
    """The portable widen-multiply-add gives what vpdpbusd gives (both: u8 x s8, groups of 4)."""
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, 64, dtype=np.uint8)
    s8 = rng.integers(-128, 128, 64, dtype=np.int8)
    out = _vnni_once(u8, s8.view(np.uint8))
    expected = (u8.astype(np.int64) * s8.astype(np.int64)).reshape(16, 4).sum(axis=1)
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], expected)


@njit
def _maddubs_steps(u8, s8_bytes, steps):
    """``steps`` times vpmaddubsw into int16, then one vpmaddwd into int32 (the AVX2 A8 step)."""
    acc = simd._vzeros_i16x16()
    w, a = simd._vload32(u8, 0), simd._vload32(s8_bytes, 0)
    for _ in range(steps):
        acc = simd._maddubs_add(acc, w, a)
    out = np.empty(8, dtype=np.int32)
    simd._store_affine(out.reshape(1, 8), 0, simd._madd_ones_add(simd._vzeros_i32x8(), acc), 1, 0)
    return out


@njit
def _nibble_counts(a, w, words):
    """The AVX2 popcount: byte counts of ``words`` XORs, then vpsadbw into 4 uint64 lanes."""
    b = simd._vzeros_u8x32()
    for i in range(words):
        b = simd._xor_nibble_add(b, simd._vload32(a, 4 * i), simd._vload32(w, 4 * i))
    out = np.empty((1, 4), dtype=np.int32)
    simd._store_xnor(out, 0, simd._sad_u64(simd._vzeros_u64x4(), b), 0)
    return out[0]


@pytest.mark.skipif("avx2" not in K.available_paths(), reason="this CPU lacks avx2 (vpmaddubsw, vpshufb)")
def test_avx2_building_blocks_at_their_limits():
    """vpmaddubsw summed 63 times in int16 (the most the AVX2 kernels do for ternary codes), with
    codes 2 and activations -128 or +127; byte popcounts of 31 all-ones words (248 per byte)."""
    for value in (-128, 127):
        u8 = np.full(32, 2, dtype=np.uint8)
        s8 = np.full(32, value, dtype=np.int8)
        np.testing.assert_array_equal(_maddubs_steps(u8, s8.view(np.uint8), 63), np.full(8, 63 * 4 * 2 * value))
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 3, 32, dtype=np.uint8)
    s8 = rng.integers(-128, 128, 32, dtype=np.int8)
    expected = 5 * (u8.astype(np.int64) * s8).reshape(8, 4).sum(axis=1)
    np.testing.assert_array_equal(_maddubs_steps(u8, s8.view(np.uint8), 5), expected)
    a = np.full(4 * 31, 2**64 - 1, dtype=np.uint64)
    np.testing.assert_array_equal(_nibble_counts(a, np.zeros_like(a), 31), -2 * np.full(4, 31 * 64))
    w = rng.integers(0, 2**63, 4 * 31, dtype=np.uint64)
    expected = [sum(int(v).bit_count() for v in (a ^ w)[lane::4]) for lane in range(4)]
    np.testing.assert_array_equal(_nibble_counts(a, w, 31), -2 * np.array(expected))


# --------------------------------------------------------------------------- the path switches


def test_paths_and_cpu_features():
    features = K.cpu_features()
    assert K.PATHS == ("avx512", "avx2", "generic")
    assert K.available_paths()[-1] == "generic" and set(K.available_paths()) <= set(K.PATHS)
    assert features["path"] == K.active_path() and features["available_paths"] == list(K.available_paths())
    assert features["arch"] == platform.machine() and features["flags"] == sorted(features["flags"])
    for flag in ("avx2", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni"):
        assert features[flag] == (flag in features["flags"])
    assert ("avx2" in K.available_paths()) == features["avx2"]
    assert ("avx512" in K.available_paths()) == (features["avx512_vpopcntdq"] and features["avx512_vnni"])
    assert K.HAS_VNNI == features["avx512_vnni"]
    if not os.environ.get(K.ENV_VAR):
        assert K.active_path() == K.available_paths()[0]


def test_use_forces_a_path_and_restores():
    before = K.active_path()
    with K.use("generic") as path:
        assert path == "generic" and K.active_path() == "generic"
        with K.use(K.available_paths()[0]):
            assert K.active_path() == K.available_paths()[0]
        assert K.active_path() == "generic"
    assert K.active_path() == before
    with pytest.raises(ValueError, match="one of"):
        K.use("sse2").__enter__()
    assert K.active_path() == before


@pytest.mark.parametrize("path", [p for p in K.PATHS if p not in K.available_paths()] or ["none-missing"])
def test_paths_this_cpu_cannot_run_are_refused(path, monkeypatch):
    if path == "none-missing":
        pytest.skip("this CPU runs every path")
    missing = cpu.missing_features(path)
    with pytest.raises(RuntimeError, match=missing[0]):
        K.use(path).__enter__()
    monkeypatch.setenv(K.ENV_VAR, path)
    with pytest.raises(RuntimeError, match=f"{K.ENV_VAR}.*{missing[0]}"):
        K.active_path()


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "generic")
    assert K.active_path() == "generic" and K.cpu_features()["path"] == "generic"
    with K.use(K.available_paths()[0]):  # a use() block wins over the variable
        assert K.active_path() == K.available_paths()[0]
    monkeypatch.setenv(K.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{K.ENV_VAR}='fastest'"):
        K.active_path()
    monkeypatch.setenv(K.ENV_VAR, "")
    assert K.active_path() == K.available_paths()[0]


def test_bad_environment_variable_fails_at_import():
    env = {**os.environ, K.ENV_VAR: "avx1024"}
    done = subprocess.run([sys.executable, "-c", "import labutils.kernels"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "avx1024" in done.stderr


# --------------------------------------------------------------------------- assembly


def _recorded(name: str) -> list[str]:
    return [line for line in (DATA / name).read_text().splitlines() if line and not line.startswith(";")]


def _recorded_flags(name: str) -> list[str]:
    """The flags the recorded assembly was compiled for (its header's NUMBA_CPU_FEATURES)."""
    header = (DATA / name).read_text().splitlines()[0]
    return K.flags_of_features(header.split("NUMBA_CPU_FEATURES=")[1])


RECORDED = [("asm_avx512_w1a1.txt", "avx512", "popcount"), ("asm_avx512_w158a8.txt", "avx512", "dot"),
            ("asm_avx2_w1a1.txt", "avx2", "popcount"), ("asm_avx2_w158a8.txt", "avx2", "dot")]  # fmt: skip


@pytest.mark.parametrize("name,path,kind", RECORDED)
def test_expected_instructions_match_recorded_assembly(name, path, kind):
    """Assembly recorded from each path's kernel (AVX-512: compiled for Zen 4; AVX2: Zen 3) holds
    what expected_instructions says for the CPU it was compiled for, and not the other path's."""
    found = asm.mnemonics(_recorded(name))
    flags = _recorded_flags(name)
    assert set(K.expected_instructions(path, flags)[kind]) <= found
    other = K.expected_instructions("avx2" if path == "avx512" else "avx512", flags)[kind]
    # vpshufb also moves bytes in AVX-512 code; on a VNNI CPU both paths multiply with vpdpbusd
    assert not set(other) & found - {"vpshufb", "vpdpbusd"}


@pytest.mark.parametrize("cpu_name", ["znver3", "znver4", "sapphirerapids"])
def test_generic_x86_dot_product_is_one_maddubs_into_int16(cpu_name):
    """The generic path's x86 dot step (``portable._pairs_int16`` added into an int16
    accumulator), compiled for an AVX2 CPU (32 bytes a step) and two AVX-512 ones (64) whatever
    the host: one ``vpmaddubsw`` on a whole register and one ``vpaddw``, no widening of bytes
    (which halved the rate as int16 ``vpmaddwd`` products, and again as a ``partial.reduce``)."""
    from llvmlite import binding as llvm
    from llvmlite import ir

    from labutils.kernels.portable import _pairs_int16

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    module = ir.Module()
    module.triple = "x86_64-unknown-linux-gnu"
    step = 32 if cpu_name == "znver3" else 64  # portable.STEP for each
    acc_type, bytes_type = ir.VectorType(ir.IntType(16), step // 2), ir.VectorType(ir.IntType(8), step)
    fn = ir.Function(module, ir.FunctionType(acc_type, [acc_type, bytes_type.as_pointer(), bytes_type.as_pointer()]), "dot")
    builder = ir.IRBuilder(fn.append_basic_block())
    codes, x = builder.load(fn.args[1], align=1), builder.load(fn.args[2], align=1)
    builder.ret(builder.add(fn.args[0], _pairs_int16(builder, codes, x)))
    try:
        target = llvm.Target.from_triple(module.triple)
    except RuntimeError:
        pytest.skip("this llvmlite has no x86 target")
    machine = target.create_target_machine(cpu=cpu_name, opt=3)
    lines = machine.emit_assembly(llvm.parse_assembly(str(module))).splitlines()
    body = [line.strip() for line in lines if line.strip().startswith("v")]
    register = "%ymm" if step == 32 else "%zmm"
    assert [line.split()[0] for line in body if "vpmaddubsw" in line or "vpaddw" in line] == ["vpmaddubsw", "vpaddw"], body
    assert all(register in line for line in body if line.startswith(("vpmaddubsw", "vpaddw"))), body
    assert not {"vpmovsxbw", "vpmovzxbw", "vpmaddwd", "vpmovsxbd"} & asm.mnemonics(lines), body


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="compiles for an x86 CPU")
def test_generic_gemm_tile_stays_in_registers_on_avx2(tmp_path):
    """The generic A8 GEMM compiled for Zen 3 (AVX2, 16 ymm registers) on any x86 host: its tile
    loop (4 tokens x 2 columns, one ``vpmaddubsw`` and one ``vpaddw`` each a step) reads and
    writes no vector at the stack pointer, which the 4 x 4 tile of two-ymm accumulators did 109
    times a step."""
    program = "import json; from labutils.kernels import asm; print(json.dumps(asm.asm_lines('w1.58a8', '.', 'generic')))"
    env = {**os.environ, "NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": cpu.COMPILE_TARGETS["znver3"],
           "NUMBA_CACHE_DIR": str(tmp_path), "LABBOOK_KERNEL_PATH": ""}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    lines = json.loads(done.stdout.strip().splitlines()[-1])
    tiles = [body for body in asm.loop_bodies(lines) if "vpmaddubsw" in asm.mnemonics(body)]
    assert tiles, "no tile loop found"
    tile = max(tiles, key=lambda body: sum(line.startswith("vpmaddubsw") for line in body))  # 4 tokens, not 1
    assert sum(line.startswith("vpmaddubsw") for line in tile) == 8
    assert sum(line.startswith("vpaddw") for line in tile) == 8
    assert not {"vpmovsxbw", "vpmovzxbw", "vpmaddwd"} & asm.mnemonics(tile)
    spilled = [line for line in tile if "%rsp" in line and "mm" in line]
    assert not spilled, spilled
    assert all("%zmm" not in line for line in tile)


def test_expected_instructions_errors_and_generic():
    with pytest.raises(ValueError, match="path"):
        K.expected_instructions("neon")
    assert K.expected_instructions("generic", ["neon", "asimd"]) == {"popcount": ["cnt"], "dot": []}
    assert K.expected_instructions("generic", ["neon", "asimd", "asimddp"]) == {"popcount": ["cnt"], "dot": ["sdot"]}
    assert K.expected_instructions("generic", ["popcnt", "avx2"]) == {"popcount": ["vpshufb"], "dot": ["vpmaddubsw"]}
    avx512 = ["avx2", "avx512bw", "avx512f", "avx512_vnni", "avx512_vpopcntdq", "popcnt"]
    assert K.expected_instructions("generic", avx512) == {"popcount": ["vpopcntq"], "dot": ["vpmaddubsw"]}
    assert K.expected_instructions("generic", ["popcnt"]) == {"popcount": [], "dot": []}


@pytest.mark.parametrize("flags,dot", [(["avx2", "popcnt"], ["vpmaddubsw", "vpmaddwd"]),
                                       (["avx2", "avx_vnni"], ["vpdpbusd"]),
                                       (["avx2", "avx512bw", "avx512_vnni", "avx512vl"], ["vpdpbusd"]),
                                       (["avx2", "avx512bw", "avx512_vnni"], ["vpmaddubsw", "vpdpwssd"])])  # fmt: skip
def test_expected_avx2_int8_depends_on_vnni(flags, dot):
    """With a 256-bit VNNI the AVX2 path multiplies with vpdpbusd on ymm; without, vpmaddubsw
    pairs widened by vpmaddwd (fused with its add into vpdpwssd where AVX512-VNNI is there)."""
    assert K.expected_instructions("avx2", flags)["dot"] == dot


def test_flags_of_features():
    assert K.flags_of_features("+avx2,+popcnt,+fma,-avx512f") == ["avx2", "popcnt"]
    assert K.flags_of_features("+avx512vnni,+avxvnni,+avx512vpopcntdq") == ["avx512_vnni", "avx512_vpopcntdq", "avx_vnni"]
    assert K.flags_of_features("+avx512vl,+dotprod,+neon") == ["asimddp", "avx512vl", "neon"]
    assert K.flags_of_features("") == []


def test_compile_target_env_takes_that_cpus_paths_and_refuses_a_host_that_cannot_run_them():
    """``LABBOOK_COMPILE_TARGET`` (``.ci/test``): Zen 4's features allow the AVX-512 path and no AMX,
    Zen 3's the AVX2 path only; a host lacking a feature the target's code may use is refused by name."""
    zen4, zen3 = cpu.COMPILE_TARGETS["znver4"], cpu.COMPILE_TARGETS["znver3"]
    assert set(cpu.PATH_REQUIREMENTS["avx512"]) <= set(K.flags_of_features(zen4))
    assert "-amx-int8" in zen4.split(",") and "avx_vnni" not in K.flags_of_features(zen4)
    assert "avx2" in K.flags_of_features(zen3) and not {"avx512f", "avx512_vnni"} & set(K.flags_of_features(zen3))
    every = {f[1:]: True for f in (zen4 + "," + zen3).split(",") if f.startswith("+")}
    assert cpu.compile_target_env("znver4", every) == {"NUMBA_CPU_NAME": "znver4", "NUMBA_CPU_FEATURES": zen4}
    with pytest.raises(ValueError, match="lacks avx512vpopcntdq, avx512bitalg"):
        cpu.compile_target_env("znver4", {**every, "avx512vpopcntdq": False, "avx512bitalg": False})
    assert cpu.compile_target_env("znver3", {**every, "avx512f": False})["NUMBA_CPU_NAME"] == "znver3"
    with pytest.raises(ValueError, match="must be one of"):
        cpu.compile_target_env("skylake", every)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS)
def test_live_assembly_of_this_cpu(path):
    """What this CPU's kernels on ``path`` contain: the expected popcount and dot instructions
    for this CPU (a forced path is compiled for the host, so its instructions depend on it)."""
    expected = K.expected_instructions(path)
    popcount = asm.mnemonics(K.asm_lines("w1a1", r"^\s*[a-z]", path))
    dot = asm.mnemonics(K.dot_asm_lines("w1.58a8", path))
    assert set(expected["popcount"]) <= popcount, popcount
    assert set(expected["dot"]) <= dot, dot
    if path == "avx512":
        assert K.popcount_asm_lines("w1a1", path) and K.vnni_asm_lines(K.w158a8_gemm, path)
    if path == "avx2":
        assert not K.popcount_asm_lines("w1a1", path)  # no popcount instruction on this path
        assert set(expected["dot"]) <= asm.mnemonics(K.vnni_asm_lines("w1a8", path))


@pytest.mark.slow
def test_generic_path_cross_compiled_for_apple_m1_uses_sdot_and_cnt():
    """The generic path compiled for an Apple M1 (arm64 + dot product), on this machine: its A8
    inner loops multiply with NEON sdot, its W1A1 loops count bits with cnt."""
    flags = K.flags_of_features(asm.CROSS_TARGETS["apple-m1"][1])
    expected = K.expected_instructions("generic", flags)
    assert expected == {"popcount": ["cnt"], "dot": ["sdot"]}
    assert {"sdot"} <= asm.mnemonics(asm.cross_asm_lines("w1.58a8", asm.DOT_PATTERN))
    assert {"sdot"} <= asm.mnemonics(asm.cross_asm_lines("w1a8", asm.DOT_PATTERN))
    assert {"cnt"} <= asm.mnemonics(asm.cross_asm_lines("w1a1", asm.POPCOUNT_PATTERN))
    with pytest.raises(ValueError, match="cpu"):
        asm.cross_asm_lines("w1a1", "cnt", cpu="pentium")


@pytest.mark.skipif(not amx.available(), reason="no AMX-INT8 here (Intel Sapphire Rapids and later)")
@pytest.mark.parametrize("scheme", ["w1a8", "w1.58a8"])
@pytest.mark.parametrize("m", [16, 35, 128, 300])
def test_amx_kernels_are_exact_and_taken_by_the_avx512_path(scheme, m):
    """From 16 tokens and whole 64-byte k blocks, the avx512 path runs A8 GEMMs on AMX tiles
    (tdpbssd); the tokens past the last 16 go through the VNNI tiles; all exact."""
    rng = np.random.default_rng(m)
    k, n = (192, 130) if m < 100 else (1024, 64)
    x = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-1, 2, (n, k), dtype=np.int8) if scheme == "w1.58a8" else np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    packed = K.prepack_w158a8(w) if scheme == "w1.58a8" else K.prepack_w1a8(packing.pack_binary_rows(w), k)
    assert amx.usable(m, packed.data.shape[1] * (16 if scheme == "w1.58a8" else 32))
    gemm = K.w158a8_gemm if scheme == "w1.58a8" else K.w1a8_gemm
    with K.use("avx512"):
        for threads in (1, 2):
            assert np.array_equal(gemm(x, packed, threads=threads), x.astype(np.int64) @ w.astype(np.int64).T)
    assert "tdpbssd" in asm.mnemonics(K.asm_lines(amx.KERNELS[scheme][1], r"^\s*tdp"))


def test_amx_needs_16_tokens_and_whole_k_blocks():
    assert not amx.usable(15, 1024) and not amx.usable(64, 80) and not amx.usable(64, 0)


def test_asm_errors():
    with pytest.raises(ValueError, match="kernel name"):
        K.popcount_asm_lines("w3a3")
    with pytest.raises(TypeError, match="dispatcher"):
        K.asm_lines(42, "x")
    with pytest.raises(ValueError, match="path"):
        K.dot_asm_lines("w1a8", "sse2")


def record_assembly(folder: Path = DATA) -> None:  # pragma: no cover - run by hand
    """Write tests/data/asm_<path>_<scheme>.txt: the AVX-512 kernels compiled for Zen 4 in a
    subprocess (NUMBA_CPU_NAME=znver4), the AVX2 ones for Zen 3; only the instructions the
    tests look at (bit counts, shuffles, byte sums, multiply-adds)."""
    keep = r"^\s*(\{vex\}\s*)?(v?popcnt\w*|vpshufb|vpsadbw|vpdpbusd|vpmaddubsw|vpmaddwd|vpmulld|vpxorq?)\b"
    targets = {"avx512": ("znver4", cpu.COMPILE_TARGETS["znver4"]), "avx2": ("znver3", cpu.COMPILE_TARGETS["znver3"])}
    for path, (cpu_name, features) in targets.items():
        for scheme in ("w1a1", "w1.58a8"):
            program = (f"from labutils import kernels as K\nprint('\\n'.join(K.asm_lines({scheme!r}, {keep!r}, {path!r})))")
            env = {**os.environ, "NUMBA_CPU_NAME": cpu_name, "NUMBA_CPU_FEATURES": features, "LABBOOK_KERNEL_PATH": "",
                   "NUMBA_CACHE_DIR": str(folder / ".numba-cache")}
            done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
            header = f"; {path} kernel {scheme}, compiled with NUMBA_CPU_NAME={cpu_name} NUMBA_CPU_FEATURES={features}\n"
            (folder / f"asm_{path}_{scheme.replace('.', '')}.txt").write_text(header + done.stdout)
