"""musubi: never pay twice for the same expensive step.

Every expensive step becomes a node in a lineage DAG kept in a local SQLite
file. Reaching the same node again replays its stored output; invalidating a
node marks its descendants stale so the next run recomputes only what changed.

>>> import tempfile, os
>>> from musubi_core import Engine, SQLiteStore, step, use_engine
>>> @step
... def double(x: int) -> int:
...     return 2 * x
>>> with Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))) as engine:
...     with use_engine(engine):
...         print(double(21).value, double(21).replayed)
42 True
"""

from ._tagged import register_encoder
from .codec import Codec, JSONCodec, allow, register_decoder
from .context import current_node, current_run
from .decorators import StepFunction, merge, step
from .engine import Engine, Lookup, Outcome, get_engine, use_engine
from .errors import (
    ConfigError,
    CorruptNodeError,
    DecodeError,
    DivergenceError,
    DuplicateStepError,
    EffectInDoubtError,
    IdentityError,
    InvalidStepNameError,
    LockedError,
    MusubiError,
    NodeNotFoundError,
    ReadOnlyStoreError,
    ReplayMissError,
    SchemaError,
    SerializationError,
    StepFailedError,
    StoreError,
)
from .identity import NodeKey, input_hash
from .modes import Mode
from .policy import Decision, ReplayReason, StepConfiguration, StepType
from .record import trace
from .result import Result
from .runner import Context, arun, run
from .store import PostgresStore, SQLiteStore, Store

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "ConfigError",
    "Context",
    "CorruptNodeError",
    "DecodeError",
    "Decision",
    "DivergenceError",
    "DuplicateStepError",
    "EffectInDoubtError",
    "Engine",
    "IdentityError",
    "InvalidStepNameError",
    "JSONCodec",
    "LockedError",
    "Lookup",
    "Mode",
    "MusubiError",
    "NodeKey",
    "NodeNotFoundError",
    "Outcome",
    "PostgresStore",
    "ReadOnlyStoreError",
    "ReplayMissError",
    "ReplayReason",
    "Result",
    "SQLiteStore",
    "SchemaError",
    "SerializationError",
    "StepConfiguration",
    "StepFailedError",
    "StepFunction",
    "StepType",
    "Store",
    "StoreError",
    "__version__",
    "allow",
    "arun",
    "current_node",
    "current_run",
    "get_engine",
    "input_hash",
    "merge",
    "register_decoder",
    "register_encoder",
    "run",
    "step",
    "trace",
    "use_engine",
]
