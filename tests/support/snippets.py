"""The ```python snippets of a Markdown file, as the docs tests run them."""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets(path: Path) -> list[str]:
    """Every ```python block of ``path``, in order."""
    return [m.group(1) for m in FENCE.finditer(path.read_text(encoding="utf-8"))]
