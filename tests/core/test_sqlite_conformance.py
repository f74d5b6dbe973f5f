"""The store conformance suite (musubi_core.testing.conformance) against SQLiteStore."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from musubi_core.store import SQLiteStore, Store
from musubi_core.testing.conformance import *  # noqa: F403


@pytest.fixture
def store_factory(tmp_path: Path) -> Callable[[], Store]:
    counter = itertools.count()
    return lambda: SQLiteStore(tmp_path / f"store-{next(counter)}.db")
