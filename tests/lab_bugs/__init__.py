"""Planted bugs for the labs' autograding tests (tests/test_labs.py), one module per lab.

Each module ``lab_bugs/<lab>.py`` defines two lists of :class:`Bug`:

- ``VISIBLE``: one bug per exercise that the exercise's visible tests catch at once;
- ``HIDDEN``: one bug per exercise that passes the visible tests and only the hidden tests catch.

A new lab needs its module here (the tests fail without one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bug:
    """Replace ``old`` by ``new`` in the solution cell ``cell`` (``old`` must occur there)."""

    cell: str
    old: str
    new: str
