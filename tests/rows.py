"""Row comparison shared by the execution and crawl tests."""
from __future__ import annotations

import pytest


def assert_rows_close(got: list[tuple], want: list[tuple], rel: float = 1e-4) -> None:
    """Same rows; floats equal to float32-SVD precision (thread counts change LAPACK's rounding)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            if isinstance(a, float) and isinstance(b, float):
                assert a == pytest.approx(b, rel=rel, abs=1e-6), (g, w)
            else:
                assert a == b, (g, w)
