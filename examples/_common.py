"""Shared bits of the examples: the tiny-budget switch and the digits data."""

import os
import sys

QUICK = "--quick" in sys.argv or os.environ.get("PCCORE_EXAMPLE_QUICK") == "1"
"""Run on a tiny budget (the test suite sets PCCORE_EXAMPLE_QUICK=1)."""


def digits(limit: int | None = None):
    """Digits as (x_train, y_train, x_test, y_test) NumPy arrays (needs `pccore[data]`)."""
    from pccore import datasets

    d = datasets.load_digits(seed=0).subset(limit, limit)
    return d.x_train, d.y_train, d.x_test, d.y_test
