"""The fast whole-tensor checks against the slow exact ones they replace."""
from __future__ import annotations

import math

import pytest
import torch

from zoospectra.numeric import all_finite, frobenius


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_every_nan_and_inf(dtype: torch.dtype) -> None:
    x = torch.randn(64, 33).to(dtype)
    assert all_finite(x)
    assert all_finite(x[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[17, 5] = bad
        assert not all_finite(y)
    y = x.clone()
    y[0, 0], y[0, 1] = float("inf"), float("-inf")          # inf - inf: the sum is NaN
    assert not all_finite(y)


def test_all_finite_survives_sum_overflow() -> None:
    x = torch.full((8, 8), torch.finfo(torch.float32).max / 2)    # finite values, but ...
    assert not bool(torch.isfinite(x.sum()))                       # ... their sum overflows
    assert all_finite(x)
    assert all_finite(torch.full((8, 8), 60000.0, dtype=torch.float16))   # fp16 sums in float32


@pytest.mark.parametrize("shape", [(4096, 1024), (1, 7), (5,), ()])
def test_frobenius_matches_float64(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1              # a mean shifts float32 sums off
    exact = math.sqrt(float((x.double() ** 2).sum()))
    assert frobenius(x) == pytest.approx(exact, rel=1e-7)
    assert frobenius(x.bfloat16()) == pytest.approx(math.sqrt(float((x.bfloat16().double() ** 2).sum())),
                                                    rel=1e-7)
    assert frobenius(x[:0] if x.dim() else x.reshape(1)[:0]) == 0.0
