"""Run a check in a forked child (a real ``os.fork``), as a fork-safety test needs."""

from __future__ import annotations

import os
from collections.abc import Callable


def in_forked_child(check: Callable[[], int]) -> int:
    """Fork; the child runs ``check`` and exits with what it returns (0: as expected), or 99
    when it raised. Returns the child's exit code to the parent."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = check()
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
