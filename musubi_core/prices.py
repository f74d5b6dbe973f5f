"""What tokens cost: a price table per model, to put money on what was spent and what replay
saved (``musubi stats --cost``, ``musubi view``).

A table is TOML, US dollars per million tokens, one table per model::

    as_of = "2025-06-01"              # optional: when these prices were read

    [models."gpt-4o-mini"]
    input_per_million = 0.15
    output_per_million = 0.60         # optional (embeddings have none)

The package ships a small dated default table (``prices.toml`` beside this module). A table the
user passes (``--prices FILE``, or ``$MUSUBI_PRICES``) is laid over it: a model in both takes
the user's prices. A model is found by its exact name, then without case, then without a date
or ``-latest`` suffix (``gpt-4o-mini-2024-07-18`` is priced as ``gpt-4o-mini``) or a provider
prefix (``openai/gpt-4o``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from importlib import resources
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DEFAULT_TABLE", "ModelPrice", "Prices", "load_prices", "parse_prices"]

DEFAULT_TABLE = "prices.toml"
ENV = "MUSUBI_PRICES"

_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-latest|@[\w.-]+)$")


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    """US dollars per million input and output tokens, and where the figures came from."""

    input_per_million: float
    output_per_million: float
    source: str

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_million + tokens_out * self.output_per_million) / 1e6


@dataclasses.dataclass(frozen=True)
class Prices:
    """A price table: models by name, the date of the default table, and the user's file."""

    models: Mapping[str, ModelPrice]
    as_of: str | None = None
    path: str | None = None

    def find(self, model: str | None) -> ModelPrice | None:
        """The price of ``model`` (see the module's doc for how a name is matched)."""
        if not model:
            return None
        lowered = {name.lower(): price for name, price in self.models.items()}
        for name in _candidates(model):
            price = self.models.get(name) or lowered.get(name.lower())
            if price is not None:
                return price
        return None

    def cost(self, model: str | None, tokens_in: int, tokens_out: int) -> float | None:
        """Dollars for these tokens of ``model``; None when the model has no price."""
        price = self.find(model)
        return None if price is None else price.cost(tokens_in, tokens_out)

    def describe(self) -> str:
        """One line for people: which tables priced the figures."""
        text = f"musubi's default table of {self.as_of}" if self.as_of else "musubi's default table"
        if self.path:
            text = f"{self.path} over {text}"
        return text + " (US dollars per million tokens)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "as_of": self.as_of,
            "path": self.path,
            "models": {
                name: {"input_per_million": p.input_per_million,
                       "output_per_million": p.output_per_million, "source": p.source}
                for name, p in sorted(self.models.items())
            },
        }


def _candidates(model: str) -> list[str]:
    names = [model]
    bare = model.rsplit("/", 1)[-1] if "/" in model else model
    names.append(bare)
    for name in (model, bare):
        shorter = _SUFFIX.sub("", name)
        while shorter != name:
            names.append(shorter)
            name, shorter = shorter, _SUFFIX.sub("", shorter)
    return list(dict.fromkeys(names))


def _number(value: Any, where: str, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number of US dollars per million tokens, "
                          f"got {value!r}", target=source)
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{where}: {key} must be zero or more, got {value!r}", target=source)
    return number


def parse_prices(text: str, source: str) -> tuple[dict[str, ModelPrice], str | None]:
    """The models of one TOML price table and its ``as_of`` date; a malformed table is a
    :class:`ConfigError` naming ``source`` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not a valid TOML price table: {err}",
                          target=source) from None
    models = data.get("models")
    if not isinstance(models, dict):
        raise ConfigError(
            f'{source}: no [models."NAME"] tables (e.g. [models."gpt-4o-mini"] with '
            "input_per_million = 0.15 and output_per_million = 0.60)",
            target=source,
        )
    out: dict[str, ModelPrice] = {}
    for name, entry in models.items():
        where = f'{source}: [models."{name}"]'
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table", target=source)
        unknown = set(entry) - {"input_per_million", "output_per_million"}
        if unknown:
            raise ConfigError(f"{where} has unknown keys {sorted(unknown)} (expected "
                              "input_per_million and output_per_million)", target=source)
        if "input_per_million" not in entry:
            raise ConfigError(f"{where} needs input_per_million", target=source)
        out[name] = ModelPrice(
            _number(entry["input_per_million"], where, "input_per_million", source),
            _number(entry.get("output_per_million", 0), where, "output_per_million", source),
            source,
        )
    as_of = data.get("as_of")
    return out, None if as_of is None else str(as_of)


def load_prices(path: str | None = None) -> Prices:
    """The default table, with ``path`` (or ``$MUSUBI_PRICES`` when ``path`` is None) laid
    over it."""
    default_text = resources.files("musubi_core").joinpath(DEFAULT_TABLE).read_text("utf-8")
    models, as_of = parse_prices(default_text, "default")
    path = path or os.environ.get(ENV) or None
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            raise ConfigError(f"cannot read the price table {path}: {err.strerror or err}",
                              target=path) from None
        mine, _ = parse_prices(text, path)
        models.update(mine)
    return Prices(models, as_of, path)
