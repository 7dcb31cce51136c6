"""tests/nbval_outputs.py: the check that fails a cell gluing a numpy scalar."""

from __future__ import annotations

from nbval_outputs import numpy_glue


def glued(name: str, text: str, display: bool = False) -> dict:
    """A display_data output as myst-nb's ``glue(name, value, display=display)`` writes it: hidden
    values under the record's MIME prefix, displayed ones under plain ``text/plain``."""
    prefix = "" if display else "application/papermill.record/"
    return {"output_type": "display_data", "data": {prefix + "text/plain": text},
            "metadata": {"scrapbook": {"name": name, "mime_prefix": prefix}}}


def test_numpy_scalars_are_named() -> None:
    outputs = [glued("ch4_avg_bits", "np.float64(4.4868)"), glued("ch4_ok", "4.4868"),
               glued("ch4_count", "np.int64(3)", display=True), {"output_type": "stream", "name": "stdout", "text": "np.float64(1.0)"}]
    assert numpy_glue(outputs) == ["ch4_avg_bits = np.float64(4.4868)", "ch4_count = np.int64(3)"]


def test_python_values_and_plain_outputs_pass() -> None:
    outputs = [glued("a", "0.25"), glued("b", "'Intel Xeon'"), glued("c", "12"),
               {"output_type": "execute_result", "data": {"text/plain": "np.float64(2.0)"}, "metadata": {}}]
    assert numpy_glue(outputs) == []
