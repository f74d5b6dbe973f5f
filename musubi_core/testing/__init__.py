"""Test helpers for musubi backends.

:mod:`musubi_core.testing.conformance` is the store conformance suite: pytest
test functions that every :class:`~musubi_core.store.Store` implementation must
pass. A backend's test module imports them and provides one fixture::

    # tests/test_my_store_conformance.py
    import pytest
    from musubi_core.testing.conformance import *  # noqa: F403

    @pytest.fixture
    def store_factory(tmp_path):
        return lambda: MyStore(tmp_path / f"{uuid.uuid4().hex}.db")

``store_factory()`` must return a new, empty, open store each time it is
called; the suite closes the stores it creates.

Importing :mod:`musubi_core` never imports pytest; only importing
``musubi_core.testing.conformance`` does.
"""

from __future__ import annotations

__all__: list[str] = []
