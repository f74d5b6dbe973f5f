"""Recording what happened: runs, calls, flows, and the one writer that commits them.

Deciding what replays is the engine's concern (:mod:`musubi_core.engine`,
:mod:`musubi_core.policy`); this package only records. Everything written goes through one
:class:`Recorder` per store, whatever wrote it (``@step``, durable runs, the LangChain and
LlamaIndex adapters).
"""

from .preview import PREVIEW_CHARS, preview
from .recorder import Recorder, flush_recorders, recorder_for
from .runs import Frame, RunState, current_frame, in_call, joinable, new_call_id, new_run_id, trace

__all__ = [
    "PREVIEW_CHARS",
    "Frame",
    "Recorder",
    "RunState",
    "current_frame",
    "flush_recorders",
    "in_call",
    "joinable",
    "new_call_id",
    "new_run_id",
    "preview",
    "recorder_for",
    "trace",
]
