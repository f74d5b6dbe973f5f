"""musubi for pytest: run a suite's LLM calls from a recording (see :mod:`musubi_pytest.plugin`).

The plugin is registered through a ``pytest11`` entry point when musubi is installed, and does
nothing unless pytest runs with ``--musubi-mode``.
"""

from musubi_pytest._session import Counts
from musubi_pytest.plugin import MusubiTest

__all__ = ["Counts", "MusubiTest"]
