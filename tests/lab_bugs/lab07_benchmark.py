"""Planted bugs for lab07_benchmark (see lab_bugs/__init__.py)."""

from lab_bugs import Bug

VISIBLE = [
    Bug("ex1-answer", "layers * 2 * batch * heads", "layers * batch * heads"),  # Q·K^T only, P·V forgotten
    Bug("ex2-answer", 'table["int8"]["mul"] + table["int32"]["add"]', 'table["int8"]["mul"] + table["int8"]["add"]'),  # int8 accumulator
    Bug("ex3-answer", 'timings["baseline"].median / timings["candidate"].median',
        'timings["candidate"].median / timings["baseline"].median'),  # the ratio upside down
    # any run against any run: the pairs of rounds broken, so the load no longer cancels
    Bug("ex4-answer", "per_round = [b / o for b, o in zip(base.seconds, other.seconds)]",
        "per_round = [min(base.seconds) / max(other.seconds), max(base.seconds) / min(other.seconds)]"),
    Bug("ex5-answer", "else 100 * (teacher - student)", "else teacher - student"),  # a fraction, not points
]

HIDDEN = [
    Bug("ex1-answer", "h * config.num_labels", "h * 2"),  # the 2 labels of IMDb hard-coded
    Bug("ex2-answer", 'linear_mac_pj("fp32", 1.0, table)', 'linear_mac_pj("fp32", 1.0, measure.ENERGY_PJ)'),  # attention ignores table
    Bug("ex3-answer", 'timings["baseline"].median / timings["candidate"].median',
        'timings["baseline"].best / timings["candidate"].best'),  # best run, not the median
    Bug("ex4-answer", "if low > 1.0:", "if low >= 1.0:"),  # a round at exactly 1.0 counted as faster
    Bug("ex5-answer", "lambda v: v >= 10.0", "lambda v: v > 10.0"),  # "at least 10x" read as "more than"
]
