"""Serving a model split over tensor-parallel ranks: rank 0 serves HTTP and schedules, the others follow.

Taught in notebook 15 (serving and its metrics), on top of notebook 12's
:mod:`llmlab.parallel.engine`: rank 0's Engine broadcasts each batch to the other
ranks (its ``BroadcastRunner``), and every rank runs the forward pass
(:func:`llmlab.parallel.engine.follow`).  A server can sit idle for hours, but every
collective has a bounded timeout (so that a dead rank is noticed), so while idle rank 0
sends a **heartbeat** every :data:`HEARTBEAT_S` seconds, which the followers skip.
"""

from __future__ import annotations

import os

HEARTBEAT_S = 10.0
"""Seconds between heartbeats of an idle server: well under the collectives' timeout (60 s by default).
``LLMLAB_SERVE_HEARTBEAT_S`` overrides it (the tests send many to check that the followers skip them)."""


def heartbeat_seconds() -> float:
    """:data:`HEARTBEAT_S`, or ``$LLMLAB_SERVE_HEARTBEAT_S`` when set to a positive number."""
    try:
        value = float(os.environ.get("LLMLAB_SERVE_HEARTBEAT_S", HEARTBEAT_S))
    except ValueError:
        return HEARTBEAT_S
    return value if value > 0 else HEARTBEAT_S
