"""The identity every row is keyed by: where an artifact comes from, its id and exact revision.

A leaf module (no imports from the package), so the Hub transport and ModelRef share one
definition without importing each other.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Source = Literal["local", "hub"]


def artifact_uid(source: Source, model_id: str, revision: str) -> str:
    """16 hex digits of sha256("source:model_id@revision"): the `model_uid` of every table."""
    return hashlib.sha256(f"{source}:{model_id}@{revision}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Pinned:
    """An artifact at a revision, without where its files are: enough to key an `errors` row."""

    source: Source
    model_id: str
    revision: str

    @property
    def uid(self) -> str:
        return artifact_uid(self.source, self.model_id, self.revision)
