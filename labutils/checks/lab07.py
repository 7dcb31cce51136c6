"""Self-checks for Lab 7, the IMDb benchmark (``labs/source/lab07_benchmark``).

``bert_macs`` is compared with ``measure.count_macs`` on small random BERTs of the check's own
(other label counts, head counts and shapes), the energies with ``measure.energy_estimate`` on a
second energy table, ``speedup`` on a fake clock, ``paired_speedup`` with ``measure.paired_ratio`` on hand-made timings
(a machine that gets busy, a spread that only touches 1.0, unequal run counts), and the targets
with ``benchmark.check_targets`` on hand-made results with missing fields and targets met exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from unittest import mock

from labutils.checks._common import ExerciseError, _fail, _function, _ok, _run, _show

__all__ = ["check_lab7_bert_macs", "check_lab7_energy", "check_lab7_speedup", "check_lab7_paired_speedup",
           "check_lab7_targets"]

SCHEMES = ("fp32", "int8", "w1.58a8", "w1a8")


def check_lab7_bert_macs(bert_macs: Callable) -> bool:
    """Exercise 1: ``bert_macs(config, batch, length)`` equals ``measure.count_macs`` of a
    ``BertForSequenceClassification(config)`` on [batch, length] token ids, for small random BERTs
    with 2, 3 and 5 labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from labutils import measure

    _function(bert_macs, "bert_macs")
    shapes = [(24, 1, 3, 40, 2, 2, 16), (48, 3, 6, 80, 3, 3, 7), (32, 2, 2, 64, 5, 1, 11)]
    for seed, (h, layers, heads, ffn, labels, batch, length) in enumerate(shapes):
        config = BertConfig(vocab_size=100, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, num_labels=labels, max_position_embeddings=32)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = BertForSequenceClassification(config).eval()
        ids = torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
        expected = measure.count_macs(model, input_ids=ids)
        mine, call = _run(bert_macs, "bert_macs", config, batch, length)
        call = (f"bert_macs(config, {batch}, {length}) [hidden {h}, {layers} layer{'s' * (layers > 1)}, {heads} heads, "
                f"FFN {ffn}, {labels} labels]")
        if not isinstance(mine, dict) or set(mine) != {"linear", "attention", "total"}:
            raise _fail(call, f"return a dict with the keys linear, attention, total; got {_show(mine)}")
        if not all(type(v) is int for v in mine.values()):
            raise _fail(call, f"the counts must be Python ints (use // for head_dim), got "
                              f"{ {k: type(v).__name__ for k, v in mine.items()} }")
        messages = []
        tokens, head_dim = batch * length, h // heads
        attention = {
            expected["attention"] // 2: "count both products, Q·Kᵀ and P·V (2 · B · heads · L² · head_dim)",
            layers * 2 * batch * heads * length * head_dim: "attention grows with L², not L: each of the L queries "
                                                             "meets L keys",
            expected["attention"] // layers: f"that is one layer's; there are {layers}",
        }
        per_token = 4 * h * h + 2 * h * ffn
        linear = {
            layers * tokens * per_token: "add the head: the pooler (H × H) and the classifier (H × num_labels), once "
                                         "per sequence",
            layers * tokens * per_token + tokens * (h * h + h * labels): "the pooler and the classifier run once per "
                                                                          "sequence (on its first token), not per token",
            layers * tokens * per_token + batch * (h * h + 2 * h): f"the classifier has config.num_labels = {labels} "
                                                                   "outputs, not 2",
            layers * tokens * (4 * h * h + h * ffn) + batch * (h * h + h * labels): "the FFN has two matrices, H·I and I·H",
            tokens * per_token + batch * (h * h + h * labels): f"that is one layer's; there are {layers}",
        }
        for key, known in (("attention", attention), ("linear", linear)):
            if mine[key] != expected[key]:
                words = known.get(mine[key]) if mine[key] != expected[key] else None
                messages.append(f"{key} {mine[key]:,}, count_macs {expected[key]:,}" + (f": {words}" if words else ""))
        if not messages and mine["total"] != mine["linear"] + mine["attention"]:
            messages.append("total must be linear + attention")
        if messages:
            raise _fail(call, "; ".join(messages))
    return _ok("equal to measure.count_macs on three random BERTs (2, 3 and 5 labels, 1 to 3 layers)")


_OTHER_TABLE = {"fp32": {"mul": 1.31, "add": 0.38}, "fp16": {"mul": 0.34, "add": 0.16},
                "int32": {"mul": 1.48, "add": 0.03}, "int8": {"mul": 0.07, "add": 0.007}}  # made up: another chip


def check_lab7_energy(linear_mac_pj: Callable, forward_energy_j: Callable) -> bool:
    """Exercise 2: ``linear_mac_pj(scheme, nonzero_fraction, table)`` and ``forward_energy_j(macs, scheme,
    nonzero_fraction, table)`` against ``measure.energy_estimate``, on its 45 nm table and another one."""
    from labutils import measure

    _function(linear_mac_pj, "linear_mac_pj")
    _function(forward_energy_j, "forward_energy_j")
    for table, table_name in ((measure.ENERGY_PJ, "measure.ENERGY_PJ"), (_OTHER_TABLE, "another chip's table")):
        for scheme in SCHEMES:
            for fraction in (1.0, 0.5, 0.0):
                macs = {"linear": 12_345_678, "attention": 987_654}
                expected = measure.energy_estimate(macs, scheme, table=table,
                                                   nonzero_fraction=fraction if scheme == "w1.58a8" else None)
                pj, call = _run(linear_mac_pj, "linear_mac_pj", scheme, fraction, table)
                call = f"linear_mac_pj({scheme!r}, {fraction}, {table_name})"
                want = expected["linear_pj_per_mac"]
                if not isinstance(pj, (int, float)) or not math.isclose(pj, want, rel_tol=1e-9, abs_tol=1e-15):
                    raise _fail(call, f"{pj!r} pJ, expected {want:.6g} pJ{_pj_words(pj, scheme, fraction, table)}")
                energy, call = _run(forward_energy_j, "forward_energy_j", macs, scheme, fraction, table)
                call = f"forward_energy_j({macs}, {scheme!r}, {fraction}, {table_name})"
                if not isinstance(energy, dict) or set(energy) != {"linear_j", "attention_j", "total_j"}:
                    raise _fail(call, f"return a dict with the keys linear_j, attention_j, total_j; got {_show(energy)}")
                for key in ("linear_j", "attention_j", "total_j"):
                    mine, ref = energy[key], expected[key]
                    if isinstance(mine, (int, float)) and math.isclose(mine, ref, rel_tol=1e-9, abs_tol=1e-30):
                        continue
                    words = ""
                    if isinstance(mine, (int, float)) and ref and math.isclose(mine, ref * 1e12, rel_tol=1e-9):
                        words = ": that is picojoules; give joules (1 pJ = 1e-12 J)"
                    elif key == "attention_j" and table is _OTHER_TABLE and isinstance(mine, (int, float)) and \
                            math.isclose(mine, macs["attention"] * sum(measure.ENERGY_PJ["fp32"].values()) * 1e-12, rel_tol=1e-9):
                        words = ": read the fp32 energies from table, not from measure.ENERGY_PJ"
                    elif key == "attention_j" and isinstance(mine, (int, float)) and \
                            math.isclose(mine, macs["attention"] * want * 1e-12, rel_tol=1e-9):
                        words = ": attention MACs (activations by activations) cost a float32 multiply + add in every scheme"
                    raise _fail(call, f"{key} {mine!r}, expected {ref:.6g}{words}")
    for bad in ("w1a1", "bf16", "FP32"):
        try:
            _run(linear_mac_pj, "linear_mac_pj", bad)
        except ExerciseError as err:
            if isinstance(err.__cause__, ValueError):
                continue
            if err.__cause__ is None:
                raise
            raise ExerciseError(f"linear_mac_pj({bad!r}) raised {type(err.__cause__).__name__}: raise a ValueError "
                                f"naming the scheme, which is not one of {SCHEMES}") from err.__cause__
        raise ExerciseError(f"linear_mac_pj({bad!r}) must raise a ValueError naming the scheme: it is not one of {SCHEMES}")
    return _ok("per-MAC and forward-pass energies equal measure.energy_estimate for the four schemes, nonzero "
               "fractions 0 to 1 and two tables; unknown schemes raise ValueError")


def _pj_words(pj: object, scheme: str, fraction: float, table: dict) -> str:
    """': why' for a wrong picojoule figure, where it is a known mistake."""
    if not isinstance(pj, (int, float)):
        return ": return a float"
    add32, add8, mul8 = table["int32"]["add"], table["int8"]["add"], table["int8"]["mul"]
    known = {"int8": [(mul8 + add8, "the int8 MAC accumulates in int32: an int8 multiply + an int32 add"),
                      (add32, "the int8 MAC has a multiply too: int8 multiply + int32 add")],
             "w1.58a8": [(add32, "multiply the int32 add by nonzero_fraction: zero weights are skipped"),
                         (fraction * add8, "the adds are int32 adds (the accumulator), not int8"),
                         (fraction * (mul8 + add32), "a ±1 weight needs no multiply: one int32 add")],
             "w1a8": [(fraction * add32, "a ±1 weight is never 0: nothing to skip, one int32 add"),
                      (mul8 + add32, "a ±1 weight needs no multiply: one int32 add")],
             "fp32": [(table["fp32"]["mul"], "a MAC is a multiply and an add")]}
    for wrong, words in known.get(scheme, []):
        if math.isclose(pj, wrong, rel_tol=1e-9, abs_tol=1e-15):
            return f": {words}"
    return ""


class _FakeClock:
    """Stands in for time.perf_counter: the time moves only when a fake model runs."""

    def __init__(self) -> None:
        self.now, self.calls = 0.0, []

    def __call__(self) -> float:
        return self.now

    def model(self, name: str, durations: list[float]) -> Callable[[], None]:
        count = [0]

        def run() -> None:
            self.calls.append(name)
            self.now += durations[count[0] % len(durations)]
            count[0] += 1

        return run


def check_lab7_speedup(speedup: Callable) -> bool:
    """Exercise 3: ``speedup(baseline_fn, candidate_fn, repeat, warmup)`` is the ratio of the medians,
    timed round-robin after the warmup runs (on a fake clock: exact)."""
    import statistics

    _function(speedup, "speedup")
    cases = [([3.0], [1.0], 5, 1), ([2.0, 8.0, 4.0], [1.0, 1.0, 0.25], 3, 0), ([1.0], [4.0, 2.0], 4, 3)]
    for base, cand, repeat, warmup in cases:
        clock = _FakeClock()
        with mock.patch("time.perf_counter", clock):
            ratio, call = _run(speedup, "speedup", clock.model("baseline", base), clock.model("candidate", cand),
                               repeat=repeat, warmup=warmup)
        call = f"speedup(baseline taking {base} s in turn, candidate {cand} s, repeat={repeat}, warmup={warmup})"
        rounds = warmup + repeat
        if clock.calls != ["baseline", "candidate"] * rounds:
            if len(clock.calls) != 2 * rounds:
                raise _fail(call, f"the models ran {len(clock.calls)} times, expected 2 × ({warmup} warmup + {repeat} "
                                  "timed): pass warmup and repeat on to measure.interleaved_timings")
            raise _fail(call, "not round-robin (baseline, candidate, baseline, ...): time them together with "
                              "measure.interleaved_timings({...})")
        if isinstance(ratio, bool) or not isinstance(ratio, float):
            raise _fail(call, f"return a Python float, got {type(ratio).__name__}")
        timed_b = [base[(warmup + i) % len(base)] for i in range(repeat)]
        timed_c = [cand[(warmup + i) % len(cand)] for i in range(repeat)]
        expected = statistics.median(timed_b) / statistics.median(timed_c)
        if not math.isclose(ratio, expected, rel_tol=1e-12):
            words = next((w for v, w in (
                (1 / expected, "upside down: median(baseline) / median(candidate), > 1 when the candidate is faster"),
                (min(timed_b) / min(timed_c), "that is the ratio of the best runs; compare the medians"),
                (statistics.mean(timed_b) / statistics.mean(timed_c), "that is the ratio of the means; compare the medians"),
            ) if math.isclose(ratio, v, rel_tol=1e-12)), None)
            raise _fail(call, f"{ratio}, expected {expected}" + (f": {words}" if words else ""))
    return _ok("the median ratio, timed round-robin after the warmup runs, for equal and unequal runs")


# Hand-made seconds of (baseline, candidate) in interleaved rounds, each with what it shows.
_PAIRED_CASES = [
    ([1.0, 2.0, 4.0, 2.0, 1.0], [0.8, 1.6, 3.3, 1.7, 0.85], "a machine that gets busy: every round 1.18x to 1.25x"),
    ([1.0, 1.0, 1.0], [0.9, 1.1, 0.95], "rounds that disagree"),
    ([1.0, 1.0, 1.0], [2.0, 1.5, 1.25], "slower in every round"),
    ([2.0, 3.0, 2.2], [2.0, 2.0, 2.0], "a worst round of exactly 1.0"),
    ([1.0, 4.0, 2.0], [0.9, 1.0, 2.5], "rounds 1.11x, 4x and 0.8x"),
    ([5.0], [4.0], "one round"),
]


def _paired_words(spread: list[float], base: list[float], other: list[float]) -> str:
    """What a wrong spread is, when it is a known mistake."""
    def same(a: list[float], b: list[float]) -> bool:
        return all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b))

    unpaired = [min(base) / max(other), max(base) / min(other)]
    by_sorted = [b / o for b, o in zip(sorted(base), sorted(other))]
    upside = [o / b for b, o in zip(base, other)]
    if same(spread, unpaired):
        return (": that is any baseline run against any candidate run, unpaired; pair round i with round i, "
                "base.seconds[i] / other.seconds[i], which ran under the same load")
    if same(spread, [min(by_sorted), max(by_sorted)]):
        return ": you sorted the runs, which breaks the pairs: keep round i of both together, in the order they ran"
    if same(spread, [min(upside), max(upside)]):
        return ": upside down: base.seconds[i] / other.seconds[i], > 1 when other is faster"
    return ""


def check_lab7_paired_speedup(paired_speedup: Callable) -> bool:
    """Exercise 4: ``paired_speedup(base, other)`` for two ``measure.Timing`` of one interleaved run
    equals ``measure.paired_ratio``: the ratio of the medians, the spread of the per-round ratios
    and the verdict; unequal run counts raise ``ValueError``."""
    from labutils import measure

    _function(paired_speedup, "paired_speedup")
    for base_s, other_s, label in _PAIRED_CASES:
        base, other = measure.Timing.from_seconds(base_s), measure.Timing.from_seconds(other_s)
        mine, _ = _run(paired_speedup, "paired_speedup", base, other)
        call = f"paired_speedup(base {base_s} s, other {other_s} s) [{label}]"
        expected = measure.paired_ratio(base, other)
        if not isinstance(mine, dict) or set(mine) != {"ratio", "spread", "verdict"}:
            raise _fail(call, f"return a dict with the keys ratio, spread, verdict; got {_show(mine)}")
        ratio, spread, verdict = mine["ratio"], mine["spread"], mine["verdict"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isclose(ratio, expected["ratio"], rel_tol=1e-12):
            words = ""
            if isinstance(ratio, (int, float)) and ratio and math.isclose(1 / ratio, expected["ratio"], rel_tol=1e-12):
                words = ": upside down: median(base) / median(other), > 1 when other is faster"
            elif isinstance(ratio, (int, float)) and math.isclose(ratio, base.best / other.best, rel_tol=1e-12):
                words = ": that is the ratio of the best runs; compare the medians"
            raise _fail(call, f"ratio {ratio!r}, expected {expected['ratio']:.6g}{words}")
        if (not isinstance(spread, (list, tuple)) or len(spread) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spread)):
            raise _fail(call, f"spread must be [low, high], two numbers; got {_show(spread)}")
        if not all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(spread, expected["spread"])):
            raise _fail(call, f"spread {list(spread)}, expected {expected['spread']}" + _paired_words(list(spread), base_s, other_s))
        if verdict != expected["verdict"]:
            words = ""
            if expected["spread"][0] == 1.0 or expected["spread"][1] == 1.0:
                words = (": a round at exactly 1.0 is no faster: 'faster' needs every round above 1.0 (low > 1.0), "
                         "'slower' every round below (high < 1.0)")
            elif verdict in ("faster", "slower") and expected["verdict"] == "no difference":
                words = ": the rounds disagree on the direction (the spread contains 1.0): 'no difference'"
            raise _fail(call, f"verdict {verdict!r}, expected {expected['verdict']!r}{words}")
    try:
        paired_speedup(measure.Timing.from_seconds([1.0, 2.0]), measure.Timing.from_seconds([1.0]))
    except ValueError:
        pass
    except NotImplementedError:
        raise  # unreachable after the cases above, which call it first
    except Exception as err:
        raise ExerciseError(f"paired_speedup(2 runs, 1 run) raised {type(err).__name__}: {err}; raise a ValueError: "
                            "runs of different counts cannot be paired") from err
    else:
        raise ExerciseError("paired_speedup(2 runs, 1 run) returned a result: raise a ValueError, runs of different "
                            "counts cannot be paired (zip would silently drop a run)")
    return _ok("ratio, per-round spread and verdict equal measure.paired_ratio on six hand-made runs (a busy machine, "
               "a round at exactly 1.0, one round), and unequal run counts are refused")


def _row(accuracy: float | None, file_bytes: int | None = None, ms: float | None = None) -> dict:
    entry: dict = {"label": "hand-made", "accuracy": accuracy}
    if file_bytes is not None:
        entry["file_bytes"] = file_bytes
    if ms is not None:
        entry["latency"] = {"b32": {"L256": {"median_ms": ms, "best_ms": 0.9 * ms}}}
    return entry


def _results() -> list[tuple[str, dict]]:
    """Hand-made results (made-up numbers, not measurements), each with a description."""
    return [
        ("the lab's example_results", {"rows": {
            "fp32": _row(0.9112, 90_866_000, 2_410.0), "int8": _row(0.9074, 64_012_000, 1_180.0),
            "w1.58a8": _row(0.9031, 8_710_000, 1_320.0), "w1a8": _row(0.8890, 8_090_000, 1_250.0),
            "w1a1": _row(0.7650, 8_090_000, 640.0)}}),
        ("targets met exactly", {"rows": {
            "fp32": _row(0.95, 90_000_000, 30.0), "int8": _row(0.9, None, 20.0), "w1.58a8": _row(0.95, 9_000_000, 20.0)}}),
        ("a student better than its teacher", {"rows": {
            "fp32": _row(0.85, 100, 10.0), "w1.58a8": _row(0.87, 10, 10.0), "w1a8": _row(0.9, 9)}}),
        ("only the fp32 row", {"rows": {"fp32": _row(0.9)}}),
        ("an accuracy not measured (None)", {"rows": {"fp32": _row(None, 1000), "w1.58a8": _row(0.91, 100)}}),
    ]


def check_lab7_targets(target_values: Callable, verdicts: Callable) -> bool:
    """Exercise 5: ``target_values(results)`` and ``verdicts(results)`` agree with
    ``benchmark.check_targets``, also where rows or fields are missing and where a target is met exactly."""
    from labutils import benchmark

    _function(target_values, "target_values")
    _function(verdicts, "verdicts")
    keys = [key for key, _ in benchmark.TARGETS]
    for label, results in _results():
        hint = "return None where a number the target needs is missing" if label.startswith(("only", "an acc")) else ""
        values, call_v = _run(target_values, "target_values", results, _as=f"target_values({label})", _hint=hint)
        passed, call_p = _run(verdicts, "verdicts", results, _as=f"verdicts({label})", _hint=hint)
        for mine, call in ((values, call_v), (passed, call_p)):
            if not isinstance(mine, dict) or set(mine) != set(keys):
                raise _fail(call, f"return a dict with the six keys {keys}; got {_show(mine)}")
        messages = []
        for target in benchmark.check_targets(results):
            key, want, ok = target["key"], target["value"], target["pass"]
            value = values[key]
            if want is None:
                if value is not None or passed[key] is not None:
                    messages.append(f"{key}: not measured here, so value and verdict are None (got {value!r}, {passed[key]!r})")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isclose(value, want, rel_tol=1e-9):
                words = ""
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if math.isclose(value * 100, want, rel_tol=1e-9):
                        words = ": a fraction; give percent (points): × 100"
                    elif value and math.isclose(1 / value, want, rel_tol=1e-9):
                        words = ": upside down (fp32 or INT8 over W1.58A8)"
                    elif math.isclose(-value, want, rel_tol=1e-9):
                        words = ": the gap is teacher minus student"
                shown = f"{value:.6g}" if isinstance(value, float) else repr(value)
                messages.append(f"{key} = {shown}, expected {want:.6g}{words}")
            elif passed[key] is not ok:
                exact = math.isclose(want, {"teacher_accuracy": 89.0, "w158a8_gap": 1.0, "w1a8_gap": 2.0,
                                            "w158a8_size": 10.0, "w158a8_vs_fp32_latency": 1.5,
                                            "w158a8_vs_int8_latency": 1.0}[key], rel_tol=1e-12)
                words = ": a target met exactly is met (>= and <=, not > and <)" if exact else ""
                messages.append(f"verdict {key} ({target['text']}) is {passed[key]!r}, expected {ok}{words}")
        if messages:
            raise _fail(f"target_values / verdicts({label})", "; ".join(messages))
    return _ok("values and verdicts equal benchmark.check_targets on five hand-made results, missing fields and "
               "targets met exactly included")
