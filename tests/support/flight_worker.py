"""One worker of the single-flight tests (tests/core/test_single_flight.py).

    python -m tests.support.flight_worker TARGET EXEC_LOG KEYS

Opens an engine on TARGET (a SQLite path or a PostgreSQL URL), prints ``ready``, waits for a
line on stdin (so that every worker starts at once), then calls ``slow(key)`` (a
``@step(single_flight=True)``) for each of the comma-separated KEYS and prints one JSON line:
the values and the warnings it saw. Every execution of ``slow`` appends ``exec KEY PID`` to
EXEC_LOG (one ``write(2)`` on an ``O_APPEND`` descriptor, so a SIGKILL leaves whole lines).
Environment: ``FLIGHT_DELAY`` seconds a body takes; ``FLIGHT_HOLD`` a file the body waits on
while it exists; ``FLIGHT_TIMEOUT`` the engine's single-flight timeout.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

from musubi_core import Engine, step, use_engine
from musubi_core.store import open_store


def main(target: str, exec_log: str, keys: str) -> int:
    delay = float(os.environ.get("FLIGHT_DELAY", "0.2"))
    hold = os.environ.get("FLIGHT_HOLD")

    @step(name="tests.flight.slow", single_flight=True)
    def slow(key: str) -> str:
        fd = os.open(exec_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"exec {key} {os.getpid()}\n".encode())
        finally:
            os.close(fd)
        while hold and os.path.exists(hold):
            time.sleep(0.01)
        time.sleep(delay)
        return key.upper()

    engine = Engine(open_store(target))
    if "FLIGHT_TIMEOUT" in os.environ:
        engine.single_flight_timeout = float(os.environ["FLIGHT_TIMEOUT"])
    print("ready", flush=True)
    sys.stdin.readline()
    with warnings.catch_warnings(record=True) as caught, use_engine(engine):
        warnings.simplefilter("always")
        values = [slow(key).value for key in keys.split(",")]
    engine.close()
    print(json.dumps({"values": values, "warnings": [str(w.message) for w in caught]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
