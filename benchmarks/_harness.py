"""The measuring machinery: interleaved, shuffled blocks; medians; paired ratios.

A *comparison* holds several *variants* (musubi and the anchors beside it) that
do the same unit of work. Every round runs one small block of each variant in
a freshly shuffled order, so drift on a shared machine (another tenant, CPU
frequency, the page cache) lands on every variant alike. A variant's figure is
the median of its per-operation block times; a ratio is the median, over the
rounds, of the ratio taken *within* the round (paired), which cancels most of
the noise that a ratio of two medians would keep.

Correctness is part of the measurement: a variant may carry ``check`` (run
after every block) that asserts the block did what its name says, e.g. that a
"hit" never reached the model.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Skip(Exception):
    """A case cannot run here (an anchor is not installed, an adapter is missing)."""


@dataclass
class Variant:
    name: str
    op: Callable[[], Any]
    # Run after each timed block (not timed): assertions that the block really
    # hit / missed / wrote what it claims.
    check: Callable[[int], None] | None = None
    # Run before each timed block (not timed).
    setup: Callable[[], None] | None = None
    note: str = ""
    # One op stands for this many units (e.g. descendants invalidated, rows
    # written): figures are reported per unit.
    units: int = 1
    # Ops per block for this variant (default: the comparison's ops_per_block);
    # for anchors that are orders of magnitude slower.
    block: int | None = None
    # The op times itself and returns seconds per unit (e.g. a durable run
    # timing its steps inside the body, excluding opening the file).
    self_timed: bool = False


@dataclass
class Ratio:
    label: str
    num: str
    den: str
    budget: float | None = None  # the ratio must be <= budget (DESIGN §11)
    strict: bool = False  # True: must be < budget


@dataclass
class Comparison:
    name: str
    title: str
    variants: list[Variant]
    ratios: list[Ratio] = field(default_factory=list)
    ops_per_block: int = 200
    rounds: int = 15
    unit: str = "op"
    # Called once after the last round (not timed): final correctness assertions.
    finish: Callable[[], None] | None = None
    # Filled by run():
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Row:
    comparison: str
    variant: str
    median_us: float
    spread: float  # interquartile range / median
    n_blocks: int
    note: str = ""


@dataclass
class RatioRow:
    comparison: str
    label: str
    value: float
    budget: float | None
    strict: bool

    @property
    def met(self) -> bool | None:
        if self.budget is None:
            return None
        return self.value < self.budget if self.strict else self.value <= self.budget


def _block(variant: Variant, n: int) -> float:
    op = variant.op
    if variant.setup is not None:
        variant.setup()
    if variant.self_timed:
        inner = [float(op()) for _ in range(n)]
        if variant.check is not None:
            variant.check(n)
        return statistics.fmean(inner)
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            op()
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()
    if variant.check is not None:
        variant.check(n)
    return elapsed / (n * variant.units)


def run(comp: Comparison, *, rng: random.Random) -> tuple[list[Row], list[RatioRow]]:
    """Measure ``comp`` in shuffled interleaved blocks; return rows and ratios."""
    samples: dict[str, list[float]] = {v.name: [] for v in comp.variants}
    # Warm-up: one short block each (fills statement caches, imports lazily loaded code).
    for v in comp.variants:
        _block(v, max(1, (v.block or comp.ops_per_block) // 10))
    for _ in range(comp.rounds):
        order = list(comp.variants)
        rng.shuffle(order)
        for v in order:
            samples[v.name].append(_block(v, v.block or comp.ops_per_block))
    comp.samples = samples
    if comp.finish is not None:
        comp.finish()
    return summarise(comp)


def summarise(comp: Comparison) -> tuple[list[Row], list[RatioRow]]:
    samples = comp.samples
    rows = []
    for v in comp.variants:
        xs = samples[v.name]
        med = statistics.median(xs)
        if len(xs) >= 4:
            q = statistics.quantiles(xs, n=4)
            spread = (q[2] - q[0]) / med if med else 0.0
        else:
            spread = 0.0
        rows.append(Row(comp.name, v.name, med * 1e6, spread, len(xs), v.note))
    ratios = []
    for r in comp.ratios:
        paired = [a / b for a, b in zip(samples[r.num], samples[r.den], strict=True) if b > 0]
        ratios.append(RatioRow(comp.name, r.label, statistics.median(paired), r.budget, r.strict))
    return rows, ratios


def fmt_time(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    if us >= 10:
        return f"{us:.1f} µs"
    return f"{us:.2f} µs"
