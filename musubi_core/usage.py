"""What was spent and what replay saved: calls, tokens, seconds and money, per model and per
day (``musubi stats --cost``, and the savings of ``musubi view``).

Read from the record of calls (:meth:`~musubi_core.store.base.Store.call_usage`): an executed
call that used tokens spent them; a replayed call saved the tokens it carries and the seconds
of the execution it stands in for. Days are local days.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

from .prices import Prices
from .store.base import UsageRow

__all__ = ["BUCKET_S", "cost_lines", "money_text", "run_money", "summarize"]

# Time buckets read from the store: every time zone's offset is a multiple of 15 minutes, so
# 15-minute buckets fall in whole local days.
BUCKET_S = 900.0


def _zero() -> dict[str, Any]:
    return {"calls": 0, "tokens_in": 0, "tokens_out": 0, "tokens": 0, "seconds": 0.0,
            "money": 0.0, "unpriced_tokens": 0}


def _add(into: dict[str, Any], row: UsageRow, prices: Prices) -> None:
    into["calls"] += row.calls
    into["tokens_in"] += row.tokens_in
    into["tokens_out"] += row.tokens_out
    into["tokens"] += row.tokens_in + row.tokens_out
    into["seconds"] += row.saved_s if row.replayed else row.duration_s
    money = prices.cost(row.model, row.tokens_in, row.tokens_out)
    if money is None:
        into["unpriced_tokens"] += row.tokens_in + row.tokens_out
    else:
        into["money"] += money


def _side(row: UsageRow) -> str:
    return "saved" if row.replayed else "spent"


def _rounded(part: dict[str, Any]) -> dict[str, Any]:
    return {**part, "seconds": round(part["seconds"], 3), "money": round(part["money"], 9)}


def summarize(rows: Iterable[UsageRow], prices: Prices) -> dict[str, Any]:
    """Totals, per model and per local day, of rows read with ``bucket_s=BUCKET_S``."""
    totals = {"spent": _zero(), "saved": _zero()}
    models: dict[tuple[str | None, str], dict[str, Any]] = {}
    days: dict[str, dict[str, Any]] = {}
    for row in rows:
        # Calls without a model (a @step, a durable step) are grouped by their kind.
        key = (row.model, "" if row.model else row.kind)
        entry = models.setdefault(key, {
            "model": row.model, "kind": None if row.model else row.kind, "kinds": set(),
            "priced": prices.find(row.model) is not None, "spent": _zero(), "saved": _zero(),
        })
        entry["kinds"].add(row.kind)
        side = _side(row)
        _add(entry[side], row, prices)
        _add(totals[side], row, prices)
        if row.bucket_start is not None:
            day = dt.datetime.fromtimestamp(row.bucket_start).date().isoformat()
            _add(days.setdefault(day, {"day": day, "spent": _zero(), "saved": _zero()})[side],
                 row, prices)
    by_model = sorted(
        models.values(), key=lambda m: (-m["saved"]["tokens"], -m["saved"]["calls"],
                                        m["model"] or "", m["kind"] or ""),
    )
    unpriced = sorted({
        m["model"] for m in by_model
        if m["model"] and not m["priced"] and (m["spent"]["tokens"] or m["saved"]["tokens"])
    })
    return {
        "prices": {"as_of": prices.as_of, "path": prices.path, "describe": prices.describe()},
        "totals": {k: _rounded(v) for k, v in totals.items()},
        "by_model": [
            {**m, "kinds": sorted(m["kinds"]), "spent": _rounded(m["spent"]),
             "saved": _rounded(m["saved"])}
            for m in by_model
        ],
        "by_day": [
            {"day": d["day"], "spent": _rounded(d["spent"]), "saved": _rounded(d["saved"])}
            for d in sorted(days.values(), key=lambda d: d["day"])
        ],
        "unpriced_models": unpriced,
    }


def run_money(rows: Sequence[UsageRow], prices: Prices) -> dict[str, dict[str, Any]]:
    """Per run (rows read with ``run_ids``): money spent and saved, and whether some tokens
    had no price."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.run_id is None:
            continue
        entry = out.setdefault(row.run_id, {"spent": 0.0, "saved": 0.0, "unpriced": False})
        money = prices.cost(row.model, row.tokens_in, row.tokens_out)
        if money is None:
            entry["unpriced"] = entry["unpriced"] or bool(row.tokens_in or row.tokens_out)
        else:
            entry[_side(row)] += money
    return out


def money_text(amount: float | None) -> str:
    """``$1,234.50``, ``$0.42``, ``$0.000035`` (small amounts keep their digits); ``-`` when
    unknown."""
    if amount is None:
        return "-"
    if amount == 0 or amount >= 0.01:
        return f"${amount:,.2f}"
    return f"${amount:.6f}".rstrip("0")


def cost_lines(summary: dict[str, Any], table: Any) -> list[str]:
    """``musubi stats --cost``: spent and saved per model, for people (``table`` is
    :func:`musubi_core._render.table`)."""

    def money(part: dict[str, Any], priced: bool) -> str:
        if not part["tokens"]:
            return "-"
        return money_text(part["money"]) if priced else "no price"

    rows = [
        (m["model"] or f"({m['kind']})", m["spent"]["calls"], m["spent"]["tokens"],
         money(m["spent"], m["priced"]), m["saved"]["calls"], m["saved"]["tokens"],
         f"{m['saved']['seconds']:.2f}", money(m["saved"], m["priced"]))
        for m in summary["by_model"]
    ]
    spent, saved = summary["totals"]["spent"], summary["totals"]["saved"]
    rows.append(("total", spent["calls"], spent["tokens"], money_text(spent["money"]),
                 saved["calls"], saved["tokens"], f"{saved['seconds']:.2f}",
                 money_text(saved["money"])))
    lines = [
        f"cost: prices from {summary['prices']['describe']}",
        table(("model", "executed", "tokens spent", "spent", "replayed", "tokens saved",
               "seconds saved", "saved"), rows),
    ]
    if summary["unpriced_models"]:
        lines.append(
            f"no price for: {', '.join(summary['unpriced_models'])} (their tokens are not in the "
            'money totals; pass --prices FILE with [models."NAME"] input_per_million and '
            "output_per_million)"
        )
    return lines
