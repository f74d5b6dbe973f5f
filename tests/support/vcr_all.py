"""The conftest.py that records every test of a suite with vcrpy, through pytest-recording,
for the side-by-side with musubi's test mode (``install(app)`` copies it into the app's
``tests/``: pytest-recording reads ``vcr_config`` from the suite's own fixtures).

Every collected test gets pytest-recording's ``vcr`` marker, so each test has its own YAML
cassette (pytest-recording's default place: ``tests/cassettes/<module>/<test>.yaml``);
``--record-mode`` is pytest-recording's (``once``, ``none``,
``new_episodes``, ``all``, ``rewrite``). ``VCR_MATCH_BODY=1`` adds the request body to vcrpy's
default matchers (method, scheme, host, port, path, query), as a team that wants a changed
prompt to be noticed would. Authorization headers are filtered out of the cassettes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest


def install(app: Path) -> None:
    """Make this file ``app``'s ``tests/conftest.py``."""
    shutil.copyfile(__file__, app / "tests" / "conftest.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.vcr)


@pytest.fixture(scope="module")
def vcr_config() -> dict[str, Any]:
    match_on = ["method", "scheme", "host", "port", "path", "query"]
    if os.environ.get("VCR_MATCH_BODY") == "1":
        match_on.append("body")
    return {"match_on": match_on, "filter_headers": ["authorization", "api-key"]}
