from __future__ import annotations

import sys
from pathlib import Path

# The shared test helpers live in tests/support; make the repo root importable even when
# pytest is launched as a bare `pytest` (which does not put the cwd on sys.path).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.fixtures import openai_server, openai_server_session  # noqa: E402, F401
