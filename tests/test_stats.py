"""labutils.stats: McNemar's exact test, the prediction records, seed summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labutils import stats


def test_mcnemar_counts_only_the_discordant_pairs():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 1, 0, 1, 1, 1], dtype=bool)
    result = stats.mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (2, 2)
    assert result["p_value"] == 1.0 and result["difference_points"] == 0.0


@pytest.mark.parametrize("a_only,b_only", [(0, 6), (3, 12), (10, 25), (40, 60)])
def test_mcnemar_p_is_the_exact_binomial_tail(a_only, b_only):
    """p = 2 * sum_{i <= min} C(n, i) / 2^n, computed here with integers."""
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    a = np.array([True] * a_only + [False] * b_only + [True] * 50)
    b = np.array([False] * a_only + [True] * b_only + [True] * 50)
    assert stats.mcnemar(a, b)["p_value"] == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_mcnemar_on_a_large_test_set_is_finite_and_small_for_a_clear_difference():
    rng = np.random.default_rng(0)
    a = rng.random(25_000) < 0.88
    b = a.copy()
    b[np.flatnonzero(~a)[:400]] = True  # B fixes 400 of A's mistakes, breaks 100 of its hits
    b[np.flatnonzero(a)[:100]] = False
    result = stats.mcnemar(a, b)
    assert result["b_only"] == 400 and result["a_only"] == 100
    assert 0 < result["p_value"] < 1e-30 and result["difference_points"] == pytest.approx(1.2)


def test_mcnemar_rejects_unpaired_input():
    with pytest.raises(ValueError, match="alike"):
        stats.mcnemar([True, False], [True])
    with pytest.raises(ValueError, match="non-empty"):
        stats.mcnemar([], [])


def test_predictions_round_trip_and_name_their_order():
    rng = np.random.default_rng(1)
    predictions, labels = rng.integers(0, 2, 1001), rng.integers(0, 2, 1001)
    record = stats.encode_predictions(predictions, labels, "file")
    assert record["n"] == 1001 and record["order"] == "file" and record["labels_sha256"] == stats.labels_digest(labels)
    assert np.array_equal(stats.decode_predictions(record), predictions)
    assert len(record["data"]) < 1001 // 8 * 4 // 3 + 8  # a bit per review, base64
    with pytest.raises(ValueError, match="0 or 1"):
        stats.encode_predictions([0, 2], [0, 1], "file")
    with pytest.raises(ValueError, match="encoding"):
        stats.decode_predictions({**record, "encoding": "csv"})


def test_seed_summary():
    summary = stats.seed_summary([0.89, 0.88, 0.90])
    assert summary["seeds"] == 3 and summary["mean"] == pytest.approx(0.89)
    assert summary["stdev"] == pytest.approx(0.01) and (summary["min"], summary["max"]) == (0.88, 0.90)
    assert stats.seed_summary([0.5])["stdev"] is None
