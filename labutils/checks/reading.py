"""Self-checks for reading measurements: the exercises of chapter 6 and appendices C and D that
hand the reader committed timings and ask what they say.

The book reports a speed-up one way everywhere (chapter 7, :func:`labutils.measure.paired_ratio`):
from interleaved rounds, the ratio of the two medians, the spread of the per-round ratios (round i
against round i), and a verdict read from the spread. Against a target, the median decides met or
missed and the target is "on the line" when the rounds fall on both sides of it. The checks below
recompute that from the same timings and name the usual misreadings: the ratio upside down, the
median of the per-round ratios, the best or the mean samples, rounds sorted (which breaks the pairs).

    from labutils.checks import check_paired_reading
    check_paired_reading(my_ratio, my_spread, my_verdict, base_seconds, other_seconds)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from labutils.checks._common import ExerciseError, _filled, _number, _ok
from labutils.measure import Timing, paired_ratio

__all__ = ["check_paired_reading", "check_target_reading", "check_step_floor", "check_run_hours"]

_REL_TOL = 5e-3  # answers rounded to three figures pass


def _close(x: float, y: float) -> bool:
    return math.isclose(float(x), float(y), rel_tol=_REL_TOL)


def _rounds(values: Sequence[float], name: str) -> np.ndarray:
    rounds = np.asarray(values, dtype=np.float64)
    if rounds.ndim != 1 or rounds.size == 0 or not np.all(rounds > 0):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of positive times, got {values!r}")
    return rounds


def _spread(spread: object) -> tuple[float, float]:
    _filled(spread, "the spread")
    if isinstance(spread, (str, bytes)) or not isinstance(spread, Sequence) or len(spread) != 2:
        raise ExerciseError(f"the spread must be a pair (lowest, highest per-round ratio), got {spread!r}")
    return _number(spread[0], "the spread's low"), _number(spread[1], "the spread's high")


def _check_ratio_and_spread(ratio: object, spread: object, base: np.ndarray, other: np.ndarray,
                            labels: tuple[str, str]) -> dict:
    """``measure.paired_ratio`` of the rounds when ``ratio`` and ``spread`` agree with it, else an
    ExerciseError naming the misreading."""
    truth = paired_ratio(Timing.from_seconds(base.tolist()), Timing.from_seconds(other.tolist()))
    base_name, other_name = labels
    mine = _number(ratio, "the ratio")
    per_round = base / other
    want = truth["ratio"]
    if not _close(mine, want):
        misreadings = ((1 / want, f"upside down: {base_name}'s median time over {other_name}'s, above 1 when {other_name} is faster"),
                       (float(np.median(per_round)), "the median of the per-round ratios; the figure is the ratio of the medians"),
                       (float(base.min() / other.min()), "the ratio of the best samples: the book reports medians"),
                       (float(base.mean() / other.mean()), "the ratio of the means, which slow rounds pull: use the medians"))
        hint = next((text for value, text in misreadings if _close(mine, value)), f"the median of {base_name}'s times over the median of {other_name}'s")
        raise ExerciseError(f"the ratio {mine:.4g} is not {want:.4g}: {hint}")
    low, high = _spread(spread)
    want_low, want_high = truth["spread"]
    if not (_close(low, want_low) and _close(high, want_high)):
        unsorted = np.sort(base) / np.sort(other)
        if _close(low, want_high) and _close(high, want_low):
            hint = "give (lowest, highest)"
        elif _close(low, 1 / want_high) and _close(high, 1 / want_low):
            hint = f"upside down: {base_name}'s round i over {other_name}'s round i"
        elif _close(low, unsorted.min()) and _close(high, unsorted.max()):
            hint = "the rounds were sorted, which breaks the pairs: divide round i by round i, in the order they ran"
        elif _close(low, base.min() / other.max()) and _close(high, base.max() / other.min()):
            hint = "that is any round against any round, unpaired: pair round i with round i"
        else:
            hint = f"divide {base_name}'s round i by {other_name}'s round i, then take the smallest and the largest"
        raise ExerciseError(f"the spread ({low:.4g}, {high:.4g}) is not ({want_low:.4g}, {want_high:.4g}): {hint}")
    return truth


def check_paired_reading(ratio: float, spread: Sequence[float], verdict: str, base: Sequence[float],
                         other: Sequence[float], labels: tuple[str, str] = ("the baseline", "the other")) -> bool:
    """What :func:`labutils.measure.paired_ratio` reports for interleaved rounds ``base[i]``, ``other[i]``
    (times, any unit): ``ratio`` the median of ``base`` over the median of ``other`` (how many times
    faster ``other`` is), ``spread`` the (lowest, highest) per-round ratio, ``verdict`` "faster" when
    every round's ratio is above 1, "slower" when every one is below, else "no difference"."""
    b, o = _rounds(base, "base"), _rounds(other, "other")
    truth = _check_ratio_and_spread(ratio, spread, b, o, labels)
    want, (low, high), expected = truth["ratio"], truth["spread"], truth["verdict"]
    _filled(verdict, "the verdict")
    if verdict != expected:
        raise ExerciseError(f"the verdict {verdict!r} is not {expected!r}: 'faster' only when every round's ratio is "
                            "above 1.0, 'slower' only when every one is below, otherwise 'no difference'")
    return _ok(f"{want:.3g}x by the medians, rounds {low:.3g}-{high:.3g}x: {expected}")


def check_target_reading(ratio: float, spread: Sequence[float], met: bool, on_the_line: bool, base: Sequence[float],
                         other: Sequence[float], goal: float, labels: tuple[str, str] = ("the baseline", "the other")) -> bool:
    """A target read by the book's rule (chapter 7): ``ratio`` and ``spread`` as in
    :func:`check_paired_reading`; ``met`` when the ratio of the medians reaches ``goal``; ``on_the_line``
    when the per-round ratios fall on both sides of it."""
    b, o = _rounds(base, "base"), _rounds(other, "other")
    truth = _check_ratio_and_spread(ratio, spread, b, o, labels)
    want, (low, high) = truth["ratio"], truth["spread"]
    for value, name in ((met, "met"), (on_the_line, "on_the_line")):
        _filled(value, name)
        if not isinstance(value, (bool, np.bool_)):
            raise ExerciseError(f"{name} must be True or False, got {value!r}")
    if bool(met) != (want >= goal):
        raise ExerciseError(f"met: the median ratio {want:.3f} decides against the goal {goal:g}: met when it reaches the goal "
                            "(the spread does not decide it)")
    crosses = low < goal < high
    if bool(on_the_line) != crosses:
        raise ExerciseError(f"on_the_line: do the rounds, {low:.3f}-{high:.3f}, fall on both sides of {goal:g}?")
    return _ok(f"{want:.3g}x (rounds {low:.3g}-{high:.3g}): {'met' if want >= goal else 'missed'}{', on the line' if crosses else ''}")


def check_step_floor(floor_ms: float, fraction: float, run: dict) -> bool:
    """Appendix D's exercise: the time a decode step's bytes take at the plain read's median rate,
    ``floor_ms = run["step_mb"] / run["read_gb_s"]`` (MB over GB/s is ms), and the measured step as a
    fraction of it, ``run["step_ms"] / floor_ms``; ``run`` an experiment-8 record
    (``results/engine/bandwidth-*.jsonl``)."""
    floor, share = _number(floor_ms, "floor_ms"), _number(fraction, "fraction")
    want = run["step_mb"] / run["read_gb_s"]
    if not _close(floor, want):
        ratio = floor / want
        if any(math.isclose(ratio, f, rel_tol=_REL_TOL) for f in (1e3, 1e-3, 1e6, 1e-6)):
            hint = "the units: MB are 1e6 bytes and GB/s 1e9 bytes a second, so MB / (GB/s) is already ms"
        elif _close(floor, run["step_mb"] / run["read_gb_s_best"]):
            hint = "use the plain read's median rate, read_gb_s, not its best"
        elif _close(floor, run["codes_mb"] / run["read_gb_s"]):
            hint = "a step reads its codes, the head's table and the cache: all of step_mb, not codes_mb"
        elif _close(floor * want, 1) or _close(floor, run["read_gb_s"] / run["step_mb"]):
            hint = "time is bytes over rate, not rate over bytes"
        else:
            hint = "the step's bytes (step_mb) over the plain read's rate (read_gb_s)"
        raise ExerciseError(f"floor_ms = {floor:.4g}: {hint}")
    if not _close(share, run["step_ms"] / want):
        upside_down = _close(share, want / run["step_ms"])
        raise ExerciseError(f"fraction = {share:.4g}: {'upside down: the measured step over the floor' if upside_down else 'the measured step_ms over floor_ms'}")
    return _ok(f"the step's {run['step_mb']:.0f} MB take {want:.1f} ms at {run['read_gb_s']:.1f} GB/s; "
               f"the step took {run['step_ms']:.1f} ms, {run['step_ms'] / want:.2f} of that")


def check_run_hours(commits: Sequence[str], slowdown: float, earlier: dict, later: dict) -> bool:
    """Appendix C's exercise: the two runs' commits (``run["provenance"]["commit"]``, seven
    characters, the earlier first) and how many times slower FP32 ran at batch 1, 128 tokens in the
    earlier run; ``earlier``, ``later``: two ``bench imdb --stage cpu`` files (``cpu.json``)."""
    _filled(commits, "commits")
    want_commits = (earlier["provenance"]["commit"][:7], later["provenance"]["commit"][:7])
    mine = tuple(str(c)[:7] for c in commits)
    if mine != want_commits:
        order = " (the earlier first)" if mine[::-1] == want_commits else ""
        raise ExerciseError(f"commits {tuple(commits)} are not the runs' provenance commits{order}: run['provenance']['commit'][:7]")
    fp32 = [run["latency"]["fp32"]["b1"]["L128"]["median_ms"] for run in (earlier, later)]
    want = fp32[0] / fp32[1]
    slower = _number(slowdown, "slowdown")
    if not _close(slower, want):
        hint = "upside down: the earlier run's median over the later one's" if _close(1 / slower, want) else \
            "FP32's median_ms at b1, L128 in each run, the earlier over the later"
        raise ExerciseError(f"slowdown {slower:.4g} is not {want:.4g}: {hint}")
    return _ok(f"FP32, the same torch code at {want_commits[0]} and {want_commits[1]}, ran {want:.2f}x slower in the earlier run")
