"""Run the app with uvicorn: in a background thread (tests, notebook 15) or in the foreground (``llmlab serve``).

Taught in notebook 15 (serving and its metrics)::

    with Server(ServedModel.from_checkpoint(load_checkpoint())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        print(client.completions.create(model=server.model_name, prompt="ROMEO:").choices[0].text)

Stopping ends every request in flight at once (a streaming client gets an error
event, a waiting one a 503), stops the engine thread, then uvicorn; nothing waits
longer than ``timeout`` seconds.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from llmlab.errors import LlmlabError
from llmlab.serve.api import ServingState, create_app
from llmlab.serve.model import ServedModel


class ServerError(LlmlabError, RuntimeError):
    """The server could not start (the port is taken, the app failed): the message says what to do."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one the system picks).

    Made with ``IPPROTO_TCP`` named: asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on
    connections accepted from such a socket.  With Nagle on, each small SSE chunk on a kept-alive
    connection waits for the client's delayed ACK (~40 ms), which the TTFT would include.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port} ({err.strerror or err}): pick another --port (0 picks a "
                          "free one) or stop what uses it.") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Uvicorn(uvicorn.Server):
    """uvicorn, but an exit (Ctrl-C, SIGTERM, ``Server.stop``) first ends the requests in flight."""

    def __init__(self, config: uvicorn.Config, state: ServingState) -> None:
        super().__init__(config)
        self.llmlab = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.llmlab.loop.request_stop()  # streams end now, so the graceful shutdown has nothing to wait for
        super().handle_exit(sig, frame)


def make_uvicorn(app: FastAPI, log_level: str = "warning", graceful_timeout: float = 5.0) -> _Uvicorn:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout, lifespan="on",
                            access_log=False)
    return _Uvicorn(config, app.state.llmlab)


class Server:
    """An OpenAI-compatible server in a background thread (notebook 15): ``with Server(served) as s: s.url``.

    ``served``: a :class:`ServedModel` (or an app from :func:`create_app`).  ``port=0``
    picks a free port; ``.url`` says which.  ``engine_options`` go to the Engine
    (``max_num_seqs``, ``block_size``, ``num_blocks`` …).
    """

    def __init__(self, served: ServedModel | FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, log_level: str = "warning", **engine_options: Any) -> None:
        self.app = served if isinstance(served, FastAPI) else create_app(served, api_key=api_key, **engine_options)
        self.host, self.port, self.log_level = host, port, log_level
        self.url: str | None = None
        self._uvicorn: _Uvicorn | None = None
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> ServingState:
        return self.app.state.llmlab

    @property
    def engine(self):
        return self.state.engine

    @property
    def engine_loop(self):
        return self.state.loop

    @property
    def model_name(self) -> str:
        return self.state.served.name

    def start(self, timeout: float = 60.0) -> Server:
        """Listen, start uvicorn and the engine thread, and wait until ``/health`` answers."""
        sock = bind(self.host, self.port)
        self.url = url_of(sock)
        self._uvicorn = make_uvicorn(self.app, self.log_level)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name="llmlab-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the server at {self.url} did not start within {timeout:g} s: see the log above.")
            time.sleep(0.01)
        _wait_healthy(self.url, deadline)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """End the requests in flight, stop the engine thread and uvicorn (at most ``timeout`` seconds)."""
        if self._uvicorn is None:
            return
        self.state.loop.request_stop()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._uvicorn.force_exit = True
                self._thread.join(2.0)
        self.state.loop.stop(timeout=2.0)
        self._uvicorn = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_healthy(url: str, deadline: float) -> None:
    import httpx

    while True:
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"{url}/health did not answer: see the log above.")
        time.sleep(0.05)


def serve_forever(served: ServedModel, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  log_level: str = "info", announce=print, **engine_options: Any) -> None:
    """``llmlab serve``: run in the foreground until Ctrl-C or SIGTERM (uvicorn handles both)."""
    app = create_app(served, api_key=api_key, **engine_options)
    sock = bind(host, port)
    url = url_of(sock)
    announce(url)
    make_uvicorn(app, log_level).run(sockets=[sock])
