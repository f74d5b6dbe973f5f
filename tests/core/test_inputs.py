"""Bad input in process: store targets (``open_store`` / ``$MUSUBI_DB`` through
``get_engine``), durable run ids too long for the lock file's name, and ages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import musubi_core
import musubi_core.engine as engine_module
from musubi_core import (
    ConfigError,
    InvalidStepNameError,
    MusubiError,
    SQLiteStore,
    get_engine,
    run,
    step,
    use_engine,
)
from musubi_core._duration import age_seconds, to_seconds
from musubi_core.store import open_store, resolve_target


@pytest.fixture
def no_default_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine_module, "_DEFAULT", None)


@pytest.mark.parametrize(
    "target", ["mysql://x/y", "redis://u:secret@h:6379/0", "s3://bucket/key.db", "HTTP://x/y"]
)
def test_an_unknown_url_scheme_is_a_config_error_before_anything_is_created(
    tmp_path: Path, no_default_engine: None, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(target)
    err = info.value
    assert isinstance(err, MusubiError) and isinstance(err, ValueError)
    assert "secret" not in str(err) and "secret" not in err.target
    for form in ("sqlite:///", "sqlite:////", "postgresql://", "MUSUBI_DB"):
        assert form in str(err)
    monkeypatch.setenv("MUSUBI_DB", target)
    with pytest.raises(ConfigError):
        get_engine()
    assert os.listdir(tmp_path) == []


def test_sqlite_urls_name_a_relative_or_absolute_file(
    tmp_path: Path, no_default_engine: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    relative = open_store("sqlite:///rel.db")
    absolute = open_store(f"sqlite:///{tmp_path / 'abs.db'}")  # sqlite:////tmp/...
    assert isinstance(relative, SQLiteStore) and isinstance(absolute, SQLiteStore)
    assert relative.path == str(tmp_path / "rel.db")
    assert absolute.path == str(tmp_path / "abs.db")
    relative.close()
    absolute.close()
    monkeypatch.setenv("MUSUBI_DB", "sqlite:///env.db")

    @step()
    def double(x: int) -> int:
        return 2 * x

    engine = get_engine()
    try:
        with use_engine(engine):
            assert double(2).value == 4
        assert engine.store.path == str(tmp_path / "env.db")  # type: ignore[attr-defined]
    finally:
        engine.close()
    assert sorted(os.listdir(tmp_path)) >= ["abs.db", "env.db", "rel.db"]
    assert not any(name.startswith("sqlite:") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("target", ["sqlite://", "sqlite:///", "sqlite://host/x.db"])
def test_a_sqlite_url_without_a_file_is_a_config_error(
    no_default_engine: None, target: str
) -> None:
    with pytest.raises(ConfigError, match="sqlite:///"):
        open_store(target)


def test_a_directory_is_not_a_store(tmp_path: Path, no_default_engine: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="is a directory") as info:
        open_store(str(tmp_path))
    assert str(tmp_path / "musubi.db") in str(info.value)
    monkeypatch.setenv("MUSUBI_DB", str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        get_engine()
    assert os.listdir(tmp_path) == []


def test_postgres_targets_and_sqlite_uris_pass_through() -> None:
    for target in ("postgresql://u@h/db", "postgres://h/db", "host=h dbname=d",
                   "file:/tmp/x.db?mode=ro", ":memory:"):
        assert resolve_target(target) == target
    assert "ConfigError" in musubi_core.__all__


# -- run ids ----------------------------------------------------------------------------


def test_a_run_id_too_long_for_the_lock_file_name_is_refused_up_front(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    with pytest.raises(InvalidStepNameError) as info:
        run(db, lambda ctx: ctx.step("a", lambda: 1), run_id="r" * 300)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "run id" in message and "at most 128 characters" in message
    assert "300 characters" in message and "r" * 100 not in message  # not the whole id
    assert os.listdir(tmp_path) == []
    # The longest id allowed works: its lock file name fits.
    assert run(db, lambda ctx: ctx.step("a", lambda: 1), run_id="r" * 128) == 1


def test_a_malformed_run_id_is_an_invalid_step_name_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidStepNameError, match="invalid run id"):
        run(tmp_path / "x.db", lambda ctx: None, run_id="no spaces")
    assert os.listdir(tmp_path) == []


# -- ages and durations --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 2592000.0), ("12h", 43200.0), ("45min", 2700.0), ("90s", 90.0), ("500ms", 0.5),
     ("2w", 1209600.0), ("1h30min", 5400.0), ("1 min", 60.0)],
)
def test_ages_in_unambiguous_units(text: str, seconds: float) -> None:
    assert age_seconds(text) == seconds


@pytest.mark.parametrize(
    ("text", "says"),
    [("5m", "write minutes as 'min' (5min)"), ("5M", "(5min)"), ("1h30m", "(1h30min)"),
     ("30", "no unit"), ("3mo", "invalid age"), ("-1d", "invalid age"), ("", "invalid age")],
)
def test_ambiguous_ages_are_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        age_seconds(text)


def test_sleep_durations_take_min_and_still_take_m() -> None:
    assert to_seconds("5min") == to_seconds("5m") == 300.0
    assert to_seconds("1w") == 604800.0
