"""How many multiply-accumulates per cycle each inner loop can issue on one core: a model, not a
measurement (chapter 6, section 6.2, and appendix B's roofline read it).

Every inner loop is counted per 512 MACs of one token: how many vector instructions it issues,
how many of them are multiplies, and how many are shuffles or shifts. A core issues at most
``ops`` vector instructions per cycle, of which ``mul`` multiplies and ``shuffle`` shuffles or
shifts, so the loop's bound is 512 MACs over its busiest resource::

    MACs/cycle = 512 / max(ops / ops_per_cycle, muls / muls_per_cycle, shuffles / shuffles_per_cycle)

One model per vendor and width (``ISA_MODELS``): AMD Zen 4 for AVX-512 ("avx512": its 512-bit
instructions take two of its four 256-bit pipes, so two issue per cycle and one multiplies),
Intel server cores with two 512-bit FMA ports ("avx512_intel": Ice Lake-SP, Sapphire Rapids;
ports 0 and 5 take 512-bit work, both multiply, only port 5 shuffles and counts bits, so
``vpopcntq`` issues once per cycle) and Zen 3 for AVX2 ("avx2"; chapter 6 cites them). Intel's
Haswell to Skylake cores issue three 256-bit vector instructions per cycle, so there the AVX2
column is an upper bound. ``model_for(path, vendor)`` picks the model of a CPU.
"""

from __future__ import annotations

__all__ = ["ISA_MODELS", "inner_loops", "loop_bounds", "macs_per_cycle", "model_for"]

# Per core: vector width in bits, vector instructions per cycle, of which multiplies, of which shuffles.
ISA_MODELS: dict[str, dict[str, int | str]] = {
    "avx512": {"label": "AVX-512 (Zen 4)", "bits": 512, "ops": 2, "mul": 1, "shuffle": 2},
    "avx512_intel": {"label": "AVX-512 (Intel, two FMA ports)", "bits": 512, "ops": 2, "mul": 2, "shuffle": 1},
    "avx2": {"label": "AVX2 (Zen 3)", "bits": 256, "ops": 4, "mul": 2, "shuffle": 2},
}
_MACS = 512  # every loop is counted per 512 MACs of one token


def model_for(path: str, vendor: str) -> str | None:
    """The ``ISA_MODELS`` key of a kernel path on a CPU of ``vendor`` (/proc/cpuinfo's vendor_id:
    "AuthenticAMD", "GenuineIntel"); None for the generic path, which has no instruction model."""
    if path == "avx512":
        return "avx512_intel" if vendor == "GenuineIntel" else "avx512"
    return "avx2" if path == "avx2" else None


def _model(isa: str) -> dict[str, int | str]:
    if isa not in ISA_MODELS:
        raise ValueError(f"no instruction model for {isa!r}: one of {sorted(ISA_MODELS)}")
    return ISA_MODELS[isa]


def inner_loops(isa: str) -> list[tuple[str, float, float, float, int]]:
    """The five inner loops of the kernels on ``isa`` (a key of ``ISA_MODELS``).

    Returns:
        Rows ``(inner loop, vector ops, multiplies, shuffles and shifts, weight bits)``, each per
        512 MACs of one token, in the order W1A1, W1A8 bit-planes, W1.58A8 bit-planes, W1.58A8 /
        W1A8 bytes, float32. Unpacking 2-bit codes (an AND and a shift per vector) is shared by
        the 4 tokens of a register tile, hence the ``/ 4``.
    """
    bits = int(_model(isa)["bits"])
    v = _MACS // bits  # registers per 512 weights (binary) or per 512 bytes / 64
    if bits == 512:
        xnor, xnor_shuffles = ("xor, vpopcntq, add", 3 * v), 0
        int8 = ("8 vpdpbusd (64 MACs each) + unpacking", 8 + 16 / 4, 8, 0)
    else:  # AVX2: Muła's nibble lookup; int8 pairs in int16 (codes <= 2, so exact), widened rarely
        xnor, xnor_shuffles = ("2 nibble planes × (xor, vpshufb, add)", 6 * v), 2 * v
        int8 = ("16 vpmaddubsw + 16 vpaddw (32 MACs each) + unpacking", 32 + 32 / 4, 16, 8 / 4)
    fma = _MACS // (bits // 32)  # one FMA covers bits / 32 float32 lanes
    return [
        (f"W1A1: {xnor[0]}", xnor[1], 0, xnor_shuffles, 1),
        ("W1A8 bit-planes: 8 × the W1A1 loop with AND", 8 * xnor[1], 0, 8 * xnor_shuffles, 1),
        ("W1.58A8 bit-planes: 8 × 2 masks × the W1A1 loop", 16 * xnor[1], 0, 16 * xnor_shuffles, 2),
        (f"W1.58A8 / W1A8 bytes: {int8[0]}", int8[1], int8[2], int8[3], 2),
        (f"float32: {fma} FMAs of {bits // 32} lanes", fma, fma, 0, 32),
    ]


def macs_per_cycle(isa: str) -> dict[str, float]:
    """The issue bound of every inner loop of ``inner_loops(isa)``: {loop name: MACs per cycle per core}."""
    m = _model(isa)
    return {
        name: _MACS / max(ops / m["ops"], mul / m["mul"], shuffles / m["shuffle"])
        for name, ops, mul, shuffles, _ in inner_loops(isa)
    }


def loop_bounds(isa: str) -> dict[str, float]:
    """MACs per cycle per core of the XNOR loop ("binary"), the int8 byte loop ("int8") and
    float32 FMAs ("f32") on ``isa``: the roofs of appendix B's roofline."""
    bounds = list(macs_per_cycle(isa).values())
    return {"binary": bounds[0], "int8": bounds[3], "f32": bounds[4]}
