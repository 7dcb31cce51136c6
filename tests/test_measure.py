"""Tests for labutils.measure: threads, timing structure, peak memory, MAC counts, energy.

Timings are never asserted in seconds (2 shared cores): only how many runs, in which order.
"""

from __future__ import annotations

import copy
import math
import time
import warnings

import numba
import numpy as np
import pytest
import torch
from models_support import tiny_bert
from torch import nn

from labutils.measure import (
    ENERGY_PJ,
    ENERGY_PJ_7NM,
    SCHEMES,
    MemoryPeak,
    Timing,
    count_macs,
    energy_estimate,
    interleaved_timings,
    peak_memory,
    threads,
    time_callable,
)

MB = 1e6

# --------------------------------------------------------------------------- threads


def test_threads_sets_and_restores_torch_and_numba():
    before = torch.get_num_threads(), numba.get_num_threads()
    with threads(1):
        assert torch.get_num_threads() == 1
        assert numba.get_num_threads() == 1
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_threads_restores_after_an_exception():
    before = torch.get_num_threads(), numba.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), threads(1):
        raise RuntimeError("boom")
    assert (torch.get_num_threads(), numba.get_num_threads()) == before


def test_threads_caps_numba_at_its_pool():
    with threads(numba.config.NUMBA_NUM_THREADS + 3):
        assert torch.get_num_threads() == numba.config.NUMBA_NUM_THREADS + 3
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize(
    "bad, error",
    [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)],
)
def test_threads_rejects_bad_counts(bad, error):
    with pytest.raises(error, match="threads"), threads(bad):
        pass


# --------------------------------------------------------------------------- timing


def test_time_callable_counts_warmup_and_runs():
    calls = []
    timing = time_callable(lambda: calls.append(1), warmup=2, repeat=4)
    assert len(calls) == 2 + 4
    assert isinstance(timing, Timing) and timing.runs == 4 == len(timing.seconds)
    assert timing.best == min(timing.seconds)
    assert timing.best <= timing.median <= max(timing.seconds)
    assert timing.as_dict() == {
        "seconds": timing.seconds,
        "median": timing.median,
        "best": timing.best,
        "runs": 4,
    }


def test_time_callable_min_time_adds_runs_up_to_ten_times_repeat():
    timing = time_callable(
        lambda: None, warmup=0, repeat=3, min_time=60.0
    )  # never reached
    assert timing.runs == 30


def test_time_callable_min_time_stops_once_spent():
    timing = time_callable(lambda: time.sleep(0.01), warmup=0, repeat=2, min_time=0.05)
    assert 2 <= timing.runs < 20 and sum(timing.seconds) >= 0.05


def test_interleaved_timings_runs_round_robin():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    timings = interleaved_timings(fns, warmup=1, repeat=3)
    assert order == ["a", "b", "c"] * (
        1 + 3
    )  # one warm-up round, then three timed rounds
    assert list(timings) == ["a", "b", "c"]
    for t in timings.values():
        assert t.runs == 3 and t.best <= t.median <= max(t.seconds)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: time_callable(42), TypeError),
        (lambda: time_callable(lambda: None, repeat=0), ValueError),
        (lambda: time_callable(lambda: None, warmup=-1), ValueError),
        (lambda: time_callable(lambda: None, min_time=-1.0), ValueError),
        (lambda: interleaved_timings({}), ValueError),
        (lambda: interleaved_timings([lambda: None]), TypeError),
        (lambda: interleaved_timings({"a": 1}), TypeError),
        (lambda: Timing.from_seconds([]), ValueError),
    ],
)
def test_timing_rejects_bad_input(call, error):
    with pytest.raises(error):
        call()


# --------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_200mb_torch_tensor():
    peak = peak_memory(
        lambda: torch.ones(50_000_000)
    )  # float32: 200 MB, every page written
    assert isinstance(peak, MemoryPeak) and peak.method == "linux-vmhwm"
    assert peak.peak_bytes == pytest.approx(200 * MB, rel=0.15)
    assert (
        peak.baseline_bytes > 10 * MB
    )  # the interpreter and torch are resident already


def test_peak_memory_sees_a_100mb_numpy_array():
    peak = peak_memory(lambda: np.ones(12_500_000))  # float64: 100 MB
    assert peak.peak_bytes == pytest.approx(100 * MB, rel=0.15)


def test_peak_memory_of_a_freed_buffer_counts_and_does_not_leak_into_the_next():
    def allocate_and_free():
        x = torch.ones(25_000_000)  # 100 MB, freed before returning
        del x

    assert peak_memory(allocate_and_free).peak_bytes == pytest.approx(
        100 * MB, rel=0.15
    )
    assert peak_memory(lambda: sum(range(1000))).peak_bytes < 5 * MB


def test_peak_memory_is_about_zero_for_small_work():
    peak = peak_memory(lambda: [i * i for i in range(1000)])
    assert 0 <= peak.peak_bytes < 5 * MB
    assert peak.as_dict()["method"] == "linux-vmhwm"


def test_peak_memory_needs_a_callable():
    with pytest.raises(TypeError, match="fn"):
        peak_memory(torch.ones(3))


def _without_clear_refs(monkeypatch, tmp_path):
    """Make this Linux process look like macOS/Windows to peak_memory: no resettable peak."""
    from labutils import measure

    monkeypatch.setattr(measure, "_CLEAR_REFS", tmp_path / "missing")
    return measure


def test_peak_memory_support_on_linux_says_vmhwm():
    from labutils.measure import peak_memory_support

    method, why = peak_memory_support()
    assert method == "linux-vmhwm" and "VmHWM" in why


def test_peak_memory_without_clear_refs_falls_back_and_sees_200mb(monkeypatch, tmp_path):
    measure = _without_clear_refs(monkeypatch, tmp_path)
    method, why = measure.peak_memory_support()
    assert method == "lifetime-peak or sampled-rss" and "clear_refs" in why
    peak = peak_memory(lambda: torch.ones(50_000_000))  # 200 MB, every page written
    assert peak.method in ("lifetime-peak", "sampled-rss")
    assert peak.peak_bytes == pytest.approx(200 * MB, rel=0.15)
    assert peak.baseline_bytes > 10 * MB


def test_peak_memory_sampled_rss_sees_a_freed_buffer(monkeypatch, tmp_path):
    """With no lifetime peak (as if ru_maxrss were missing), polling alone still sees a buffer
    that lived 50 ms, far longer than the 1 ms poll, and reports the method it used."""
    measure = _without_clear_refs(monkeypatch, tmp_path)
    monkeypatch.setattr(measure, "_lifetime_peak_bytes", lambda: None)

    def allocate_hold_free():
        x = torch.ones(25_000_000)  # 100 MB
        time.sleep(0.05)
        del x

    peak = peak_memory(allocate_hold_free)
    assert peak.method == "sampled-rss"
    assert peak.peak_bytes == pytest.approx(100 * MB, rel=0.15)


def test_peak_memory_prefers_a_lifetime_peak_that_rose(monkeypatch, tmp_path):
    """A spike between two polls: only the lifetime peak (which rose during the call) sees it."""
    measure = _without_clear_refs(monkeypatch, tmp_path)
    rss = iter([1000, 1000, 1200, 1200, 1200, 1200])  # before, then polls: at most 1200
    monkeypatch.setattr(measure, "_current_rss_reader", lambda: lambda: next(rss, 1200))
    lifetime = iter([5000, 9000])  # before, after the call
    monkeypatch.setattr(measure, "_lifetime_peak_bytes", lambda: next(lifetime))
    peak = peak_memory(lambda: None)
    assert (peak.method, peak.peak_bytes, peak.baseline_bytes) == ("lifetime-peak", 8000, 1000)


def test_peak_memory_ignores_a_lifetime_peak_set_before_the_call(monkeypatch, tmp_path):
    measure = _without_clear_refs(monkeypatch, tmp_path)
    rss = iter([1000, 1000, 1300])
    monkeypatch.setattr(measure, "_current_rss_reader", lambda: lambda: next(rss, 1100))
    monkeypatch.setattr(measure, "_lifetime_peak_bytes", lambda: 50_000)  # from earlier work
    peak = peak_memory(lambda: None)
    assert (peak.method, peak.peak_bytes) == ("sampled-rss", 300)


def test_ru_maxrss_units_follow_the_platform(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS."""
    import resource

    from labutils import measure

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(measure.sys, "platform", "darwin")
    assert measure._lifetime_peak_bytes() >= maxrss  # bytes as they come
    monkeypatch.setattr(measure.sys, "platform", "linux")
    assert measure._lifetime_peak_bytes() >= 1024 * maxrss


def test_peak_memory_says_what_it_cannot_measure(monkeypatch, tmp_path):
    """No clear_refs and no way to read RSS (no psutil, not Windows): a clear error, and
    peak_memory_support says the same without raising."""
    measure = _without_clear_refs(monkeypatch, tmp_path)
    monkeypatch.setattr(measure, "_current_rss_reader", lambda: None)
    method, why = measure.peak_memory_support()
    assert method is None and "psutil" in why and "clear_refs" in why
    with pytest.raises(RuntimeError, match="cannot be measured.*psutil"):
        peak_memory(lambda: None)


def test_peak_memory_on_windows_reads_psapi(monkeypatch):
    """Off Windows the psapi reader is absent, so it cannot be mistaken for a measurement."""
    from labutils import measure

    monkeypatch.setattr(measure.sys, "platform", "linux")
    assert measure._windows_memory() is None


# --------------------------------------------------------------------------- MACs


def test_count_macs_of_linears_is_the_hand_formula():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(3, 5, 16)  # 15 rows
    macs = count_macs(model, x)
    expected = 15 * (16 * 32 + 32 * 8)
    assert macs == {"linear": expected, "attention": 0, "total": expected}


def _bert_inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # padding is still computed: MACs do not change
    return {"input_ids": ids, "attention_mask": mask}


def _bert_formula(config, batch: int, length: int) -> tuple[int, int]:
    h, i, layers = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
    )
    heads, head_dim = config.num_attention_heads, h // config.num_attention_heads
    tokens = batch * length
    linear = (
        layers * tokens * (4 * h * h + 2 * h * i)
    )  # Q, K, V, output; FFN up and down
    linear += batch * (
        h * h + h * config.num_labels
    )  # pooler and classifier: one row per review
    attention = 2 * layers * batch * heads * length * length * head_dim  # Q·K^T and P·V
    return linear, attention


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_count_macs_of_tiny_bert_matches_its_config(attn):
    model = tiny_bert(attn=attn).eval()
    linear, attention = _bert_formula(model.config, batch=3, length=24)
    macs = count_macs(model, **_bert_inputs(3, 24))
    assert macs == {
        "linear": linear,
        "attention": attention,
        "total": linear + attention,
    }


def test_count_macs_same_for_eager_and_sdpa_and_leaves_no_hooks():
    inputs = _bert_inputs(2, 16)
    eager, sdpa = tiny_bert(attn="eager").eval(), tiny_bert(attn="sdpa").eval()
    assert count_macs(eager, **inputs) == count_macs(sdpa, **inputs)
    assert all(not m._forward_hooks for m in sdpa.modules())


def test_count_macs_same_for_bitlinear_and_packed_models():
    from labutils.bitlinear import BitLinear, BitNetConfig, quantize_
    from labutils.kernels import PackedBitLinear, pack_model

    inputs = _bert_inputs(2, 16)
    model = tiny_bert().eval()
    expected = count_macs(model, **inputs)
    student = copy.deepcopy(model)
    quantize_(student, BitNetConfig(weight_bits=1.58, act_bits=8, norm=None))
    assert any(isinstance(m, BitLinear) for m in student.modules())
    assert count_macs(student, **inputs) == expected
    packed = pack_model(student, act="int8")
    assert any(isinstance(m, PackedBitLinear) for m in packed.modules())
    assert count_macs(packed, **inputs) == expected


def test_count_macs_counts_a_bitlinear_with_a_norm_once():
    from labutils.bitlinear import BitNetConfig, quantize_

    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, BitNetConfig(weight_bits=1.58, act_bits=8, norm="rms"))
    assert count_macs(model, torch.randn(6, 8))["linear"] == 6 * 8 * 4


def test_count_macs_counts_torch_dynamic_int8():
    model = tiny_bert().eval()
    inputs = _bert_inputs(2, 16)
    with (
        warnings.catch_warnings()
    ):  # torch.ao's deprecation warnings are not under test
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
        assert count_macs(int8, **inputs) == count_macs(model, **inputs)


def test_count_macs_rejects_a_non_module():
    with pytest.raises(TypeError, match="model"):
        count_macs(lambda x: x, torch.ones(2))


# --------------------------------------------------------------------------- energy


def test_energy_table_is_horowitz_and_bitnet():
    assert ENERGY_PJ["fp32"] == {"mul": 3.7, "add": 0.9}
    assert ENERGY_PJ["fp16"] == {"mul": 1.1, "add": 0.4}
    assert ENERGY_PJ["int32"] == {"mul": 3.1, "add": 0.1}
    assert ENERGY_PJ["int8"] == {"mul": 0.2, "add": 0.03}
    assert ENERGY_PJ_7NM["int8"] == {"mul": 0.07, "add": 0.007}


def test_energy_exact_arithmetic():
    macs = {"linear": 1_000_000, "attention": 10_000, "total": 1_010_000}
    attention_j = 10_000 * (3.7 + 0.9) * 1e-12
    per_mac = {
        "fp32": 3.7 + 0.9,
        "int8": 0.2 + 0.1,  # int8 multiply, int32 accumulate
        "w1.58a8": 0.1,
        "w1a8": 0.1,
        "w1a1": ((64 + 120) * 0.1 / 32 + 0.1) / 64,
    }
    for scheme, pj in per_mac.items():
        e = energy_estimate(macs, scheme)
        assert e["linear_pj_per_mac"] == pytest.approx(pj)
        assert e["linear_j"] == pytest.approx(1_000_000 * pj * 1e-12)
        assert e["attention_j"] == pytest.approx(attention_j)
        assert e["total_j"] == pytest.approx(e["linear_j"] + e["attention_j"])
        assert math.fsum(e["breakdown_j"].values()) == pytest.approx(e["total_j"])
        assert isinstance(e["assumptions"], str) and e["assumptions"]
    assert "W1A1" in energy_estimate(macs, "w1a1")["assumptions"]


def test_energy_nonzero_fraction_scales_ternary_adds():
    macs = {"linear": 1_000_000, "attention": 0}
    e = energy_estimate(macs, "w1.58a8", nonzero_fraction=0.6)
    assert e["linear_j"] == pytest.approx(0.6 * 1_000_000 * 0.1e-12)
    assert e["breakdown_j"]["linear_mul"] == 0.0


def test_energy_orders_the_schemes():
    macs = count_macs(tiny_bert().eval(), **_bert_inputs(1, 16))
    total = {s: energy_estimate(macs, s)["total_j"] for s in SCHEMES}
    assert (
        total["fp32"]
        > total["int8"]
        > total["w1.58a8"]
        >= total["w1a8"]
        > total["w1a1"]
        > 0
    )
    linear_only = {"linear": macs["linear"], "attention": 0}
    assert (
        energy_estimate(linear_only, "w1.58a8", nonzero_fraction=0.5)["total_j"]
        < energy_estimate(linear_only, "w1a8")["total_j"]
    )


def test_energy_at_7nm_with_bitnets_int8_adds():
    macs = {"linear": 1_000_000, "attention": 0}
    e = energy_estimate(macs, "w1.58a8", table=ENERGY_PJ_7NM, accumulator="int8")
    assert e["linear_j"] == pytest.approx(1_000_000 * 0.007e-12)
    fp32 = energy_estimate(macs, "fp32", table=ENERGY_PJ_7NM, accumulator="int8")
    assert fp32["linear_j"] == pytest.approx(1_000_000 * (1.31 + 0.38) * 1e-12)
    with pytest.raises(ValueError, match="int32"):  # the 7 nm table has no int32 row
        energy_estimate(macs, "w1a8", table=ENERGY_PJ_7NM)


@pytest.mark.parametrize(
    "macs, scheme, kwargs, error",
    [
        ({"linear": 10, "attention": 0}, "int4", {}, ValueError),
        ({"linear": -1, "attention": 0}, "fp32", {}, ValueError),
        ({"linear": 10, "attention": -5}, "fp32", {}, ValueError),
        ({"linear": 10}, "fp32", {}, ValueError),
        ({"linear": 1.5, "attention": 0}, "fp32", {}, TypeError),
        ([10, 0], "fp32", {}, TypeError),
        (
            {"linear": 10, "attention": 0},
            "w1.58a8",
            {"nonzero_fraction": 1.5},
            ValueError,
        ),
        ({"linear": 10, "attention": 0}, "int8", {"nonzero_fraction": 0.5}, ValueError),
        ({"linear": 10, "attention": 0}, "int8", {"accumulator": "int16"}, ValueError),
    ],
)
def test_energy_rejects_bad_input(macs, scheme, kwargs, error):
    with pytest.raises(error):
        energy_estimate(macs, scheme, **kwargs)
