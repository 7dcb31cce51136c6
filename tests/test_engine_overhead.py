"""labutils.engine.overhead: the experiments run by name and report what they say they report
(their figures are measurements, recorded in results/engine; nothing here checks a time)."""

from __future__ import annotations

import pytest

from labutils.engine import overhead


def test_experiments_are_named_and_unknown_names_refused():
    assert {"two_pools", "conversions", "allocation", "dispatch", "step", "threads", "bandwidth"} == set(overhead.EXPERIMENTS)
    with pytest.raises(ValueError, match="experiment must be"):
        overhead.run_experiment("nope")


def test_a_paired_experiment_reports_both_variants_and_their_ratio():
    out = overhead.run_experiment("allocation", calls=5, rounds=2)
    assert out["a_us"] > 0 and out["b_us"] > 0 and out["a_over_b"]["ratio"] > 0
    assert out["a_over_b"]["verdict"] in ("faster", "slower", "no difference")
