"""Stores: the :class:`Store` protocol and its SQLite implementation."""

from .base import (
    ArtifactWrite,
    ClaimOutcome,
    EdgeRecord,
    EdgeWrite,
    NodeRecord,
    NodeWrite,
    ParentState,
    RunRecord,
    RunStepRecord,
    RunStepWrite,
    RunStore,
    Store,
)
from .schema import SCHEMA_VERSION
from .sqlite import SQLiteStore

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactWrite",
    "ClaimOutcome",
    "EdgeRecord",
    "EdgeWrite",
    "NodeRecord",
    "NodeWrite",
    "ParentState",
    "RunRecord",
    "RunStepRecord",
    "RunStepWrite",
    "RunStore",
    "SQLiteStore",
    "Store",
]
