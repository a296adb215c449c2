"""Flow-run heartbeats that stop as soon as the run ends.

Against a lasting Prefect server every flow run sends heartbeats (every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, Prefect's default 180), so that an automation can
mark a silent run crashed. Prefect 3.9's heartbeat thread sleeps in one-second steps and is joined
when the run ends: every flow run waits up to a second (half a second on average) for nothing, a
quarter of a fully cached ``oncoflow extract``. :func:`install` puts in its place a heartbeat
context with the same events (Prefect's own event template and emitter, the same first beat at
the start and the same interval) whose thread waits on the stop event instead, so joining it
returns at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

#: Name of the heartbeat thread of a flow run.
THREAD_NAME = "flow-run-heartbeat"


@contextlib.contextmanager
def prompt_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """Send the heartbeats of a flow run from a thread that stops when the run ends.

    Parameters
    ----------
    engine
        Prefect's flow-run engine (``prefect.flow_engine.FlowRunEngine``).
    join_on_exit
        Join the heartbeat thread at the end (Prefect's async engine passes False).

    Yields
    ------
    None
        While the run's body executes.
    """
    seconds = engine.heartbeat_seconds  # None: heartbeats off; else at least Prefect's minimum
    if seconds is None:
        yield
        return
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run and run.state and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # a missed beat must never fail the run (as in Prefect)
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            if stop.wait(seconds):
                return

    # the thread runs in a copy of this context, so it sees this run's Prefect settings
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(beat,), name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install() -> None:
    """Use :func:`prompt_heartbeats` for this process's flow runs (idempotent)."""
    import prefect.flow_engine as engine

    engine._send_heartbeats = prompt_heartbeats  # type: ignore[assignment]
