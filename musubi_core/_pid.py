"""This process's id, kept current across fork: ``PID[0]``.

Hot paths compare it (is this thread's connection, writer or call counter this process's?),
and ``os.getpid()`` is a system call (0.2 µs) each time. The fork hook is registered when this
module is first imported, before any module that imports it registers its own, so every other
``after_in_child`` hook already reads the child's id.
"""

from __future__ import annotations

import os

__all__ = ["PID"]

PID = [os.getpid()]


def _after_fork_in_child() -> None:
    PID[0] = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)
