"""``llmlab serve``: an OpenAI-compatible HTTP server over the serving engine.

Taught in notebook 15 (serving and its metrics).  One concept per module:

* :mod:`~llmlab.serve.model`        ``ServedModel``: model, tokenizer, chat template, stop ids, name
* :mod:`~llmlab.serve.engine_loop`  ``EngineLoop``: the one thread that steps the engine
* :mod:`~llmlab.serve.text`         ``IncrementalText``: whole characters only, stop strings cut
* :mod:`~llmlab.serve.metrics`      ``ServerMetrics``: Prometheus gauges, histograms, counters
* :mod:`~llmlab.serve.errors`       errors in OpenAI's format
* :mod:`~llmlab.serve.api`          ``create_app``: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
* :mod:`~llmlab.serve.server`       ``Server``: uvicorn in a background thread (tests, notebooks)
"""

from llmlab.serve.api import ServingState, create_app
from llmlab.serve.engine_loop import EngineLoop, RequestStream, ServerShuttingDown, Update
from llmlab.serve.errors import OpenAIError, error_body
from llmlab.serve.metrics import ServerMetrics
from llmlab.serve.model import BUILTIN_NAME, ServedModel
from llmlab.serve.server import Server, ServerError, serve_forever
from llmlab.serve.text import IncrementalText

__all__ = [
    "BUILTIN_NAME", "EngineLoop", "IncrementalText", "OpenAIError", "RequestStream", "ServedModel", "Server",
    "ServerError", "ServerMetrics", "ServerShuttingDown", "ServingState", "Update", "create_app", "error_body",
    "serve_forever",
]
