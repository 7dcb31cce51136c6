"""The measurement-reading self-checks (labutils.checks.reading) accept the book's reading of a paired
run and name the usual misreadings."""

from __future__ import annotations

import numpy as np
import pytest

from labutils import measure
from labutils.checks import ExerciseError, check_paired_reading, check_run_hours, check_step_floor, check_target_reading

# round 4 is loaded: the spread crosses 1.0 although the medians say 1.65x
BASE = [10.2, 10.0, 10.4, 13.1, 10.1, 10.3, 10.2, 12.5, 10.0]
OTHER = [6.1, 5.9, 6.3, 14.0, 6.0, 7.9, 6.2, 6.4, 5.4]


def wrong(match: str):
    return pytest.raises(ExerciseError, match=match)


def _truth(base=BASE, other=OTHER) -> dict:
    return measure.paired_ratio(measure.Timing.from_seconds(base), measure.Timing.from_seconds(other))


def test_paired_reading_agrees_with_paired_ratio():
    truth = _truth()
    assert truth["verdict"] == "no difference"
    assert check_paired_reading(truth["ratio"], truth["spread"], truth["verdict"], BASE, OTHER)
    assert check_paired_reading(round(truth["ratio"], 2), [round(x, 3) for x in truth["spread"]], "no difference", BASE, OTHER)
    quiet = [x for i, x in enumerate(BASE) if i != 3], [x for i, x in enumerate(OTHER) if i != 3]
    assert check_paired_reading(*_truth(*quiet).values(), *quiet)  # every round faster: "faster"
    assert check_paired_reading(*_truth(*quiet[::-1]).values(), *quiet[::-1])  # and the other way round: "slower"


def test_paired_reading_names_the_misreadings():
    truth = _truth()
    spread = truth["spread"]
    per_round = np.array(BASE) / np.array(OTHER)
    with wrong("upside down"):
        check_paired_reading(1 / truth["ratio"], spread, "no difference", BASE, OTHER)
    with wrong("median of the per-round ratios"):
        check_paired_reading(float(np.median(per_round)), spread, "no difference", BASE, OTHER)
    with wrong("best samples"):
        check_paired_reading(min(BASE) / min(OTHER), spread, "no difference", BASE, OTHER)
    with wrong("means"):
        check_paired_reading(float(np.mean(BASE) / np.mean(OTHER)), spread, "no difference", BASE, OTHER)
    with wrong(r"\(lowest, highest\)"):
        check_paired_reading(truth["ratio"], spread[::-1], "no difference", BASE, OTHER)
    with wrong("sorted"):
        sorted_pairs = np.sort(BASE) / np.sort(OTHER)
        check_paired_reading(truth["ratio"], (sorted_pairs.min(), sorted_pairs.max()), "no difference", BASE, OTHER)
    with wrong("unpaired"):
        check_paired_reading(truth["ratio"], (min(BASE) / max(OTHER), max(BASE) / min(OTHER)), "no difference", BASE, OTHER)
    with wrong("every round"):
        check_paired_reading(truth["ratio"], spread, "faster", BASE, OTHER)
    with wrong("still None"):
        check_paired_reading(None, spread, "faster", BASE, OTHER)
    with wrong("a pair"):
        check_paired_reading(truth["ratio"], 1.2, "faster", BASE, OTHER)
    with pytest.raises(ValueError, match="as many"):
        check_paired_reading(truth["ratio"], spread, "faster", BASE, OTHER[:-1])


def test_target_reading_by_the_books_rule():
    truth = _truth()
    low, high = truth["spread"]
    # the median reaches 1.5, the rounds fall on both sides of it: met, on the line
    assert check_target_reading(truth["ratio"], truth["spread"], True, True, BASE, OTHER, goal=1.5)
    assert check_target_reading(truth["ratio"], truth["spread"], False, True, BASE, OTHER, goal=1.8)
    assert check_target_reading(truth["ratio"], truth["spread"], True, False, BASE, OTHER, goal=low * 0.9)
    with wrong("the median ratio"):
        check_target_reading(truth["ratio"], truth["spread"], False, True, BASE, OTHER, goal=1.5)
    with wrong("both sides"):
        check_target_reading(truth["ratio"], truth["spread"], True, False, BASE, OTHER, goal=1.5)
    with wrong("True or False"):
        check_target_reading(truth["ratio"], truth["spread"], "met", True, BASE, OTHER, goal=1.5)
    assert high > 1.8


RUN = {"step_mb": 214.0, "codes_mb": 170.0, "read_gb_s": 11.7, "read_gb_s_best": 13.3, "step_ms": 15.9}


def test_step_floor():
    floor = RUN["step_mb"] / RUN["read_gb_s"]
    assert check_step_floor(floor, RUN["step_ms"] / floor, RUN)
    with wrong("units"):
        check_step_floor(floor * 1e3, 1.0, RUN)
    with wrong("median rate"):
        check_step_floor(RUN["step_mb"] / RUN["read_gb_s_best"], 1.0, RUN)
    with wrong("codes_mb"):
        check_step_floor(RUN["codes_mb"] / RUN["read_gb_s"], 1.0, RUN)
    with wrong("bytes over rate"):
        check_step_floor(RUN["read_gb_s"] / RUN["step_mb"], 1.0, RUN)
    with wrong("upside down"):
        check_step_floor(floor, floor / RUN["step_ms"], RUN)


def _cpu_run(commit: str, fp32_ms: float) -> dict:
    return {"provenance": {"commit": commit}, "latency": {"fp32": {"b1": {"L128": {"median_ms": fp32_ms}}}}}


def test_run_hours():
    earlier, later = _cpu_run("abcdef0123", 30.0), _cpu_run("9876543210", 25.0)
    assert check_run_hours(("abcdef0", "9876543"), 1.2, earlier, later)
    with wrong("earlier first"):
        check_run_hours(("9876543", "abcdef0"), 1.2, earlier, later)
    with wrong("upside down"):
        check_run_hours(("abcdef0", "9876543"), 25 / 30, earlier, later)
    with wrong("still None"):
        check_run_hours(None, 1.2, earlier, later)
