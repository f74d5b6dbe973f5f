"""What ``musubi check`` says about a SQLite file that cannot be opened as a store.

A store that opens is checked by ``Store.check()``. A damaged file may not open
at all, and every error on the way says "run ``musubi check``", so this module
looks at the file directly, read-only: its header (is it SQLite, is it whole)
and, when asked, SQLite's own integrity check.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "x.db")
>>> _ = open(path, "wb").write(b"not a database at all" * 10)
>>> damage(path)[0].startswith("not a SQLite database")
True
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

__all__ = ["ADVICE", "damage"]

_MAGIC = b"SQLite format 3\x00"

ADVICE = (
    "restore the file from a backup; or keep what SQLite can still read: "
    "sqlite3 {path} .recover | sqlite3 recovered.db, then point musubi at recovered.db; "
    "or move the file away and musubi starts a new store (every step runs again once)"
)


def damage(path: str, *, deep: bool = False) -> list[str]:
    """The damage visible in the file at ``path``: the header always (cheap),
    SQLite's integrity check too when ``deep``. Empty when nothing is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            header = fh.read(100)
    except OSError as exc:
        return [f"cannot read the file: {exc}"]
    if size == 0:
        return []  # an empty file is a new, empty database
    if len(header) < 100 or not header.startswith(_MAGIC):
        return [
            "not a SQLite database: the file does not start with SQLite's header "
            "(it was overwritten, or is another kind of file)"
        ]
    problems = []
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is current only when these two counters agree.
    header_is_current = header[24:28] == header[92:96]
    if page_size and size % page_size:
        problems.append(
            f"truncated or padded: {size} bytes is not a whole number of {page_size}-byte pages"
        )
    if header_is_current and pages * page_size > size:
        problems.append(
            f"truncated: the header says {pages} pages ({pages * page_size} bytes), "
            f"the file has {size} bytes"
        )
    if deep:
        problems += _integrity(path)
    return problems


def _integrity(path: str) -> list[str]:
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            rows = conn.execute("PRAGMA integrity_check(20)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [f"SQLite cannot read its pages: {exc}"]
    return [f"SQLite: {row[0]}" for row in rows if row[0] != "ok"]
