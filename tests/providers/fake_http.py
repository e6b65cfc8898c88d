"""A scriptable local HTTP server, the base of the fake OpenAI and Anthropic APIs.

Each test pushes the responses it wants, in order; the server records every request it
receives, so a test can prove that the SDK did not retry on its own (Temporal owns retries).
Threaded ``http.server`` on 127.0.0.1 with an ephemeral port: no network, no extra packages.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeServer", "Recorded", "Scripted"]


@dataclass(frozen=True)
class Scripted:
    """One canned response: a dict body is sent as JSON, a str body verbatim."""

    status: int = 200
    body: dict[str, Any] | str = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass(frozen=True)
class Recorded:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeServer:
    """Serve scripted responses on ``path``; anything else, or an empty script, is a 404/500."""

    path = "/"

    def __init__(self, responder: Callable[[Recorded], Scripted] | None = None) -> None:
        self._script: deque[Scripted] = deque()
        self._responder = responder
        """Answers when the script is empty (a whole run's judge and answer calls)."""
        self.requests: list[Recorded] = []
        self.answered: list[tuple[Recorded, Scripted]] = []
        """Every request answered on ``path``, with the response sent (its usage is what a
        provider would bill): the ledger is checked against this log."""
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() of a never-started server waits forever
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def push(self, *responses: Scripted) -> None:
        with self._lock:
            self._script.extend(responses)

    def _next(self, recorded: Recorded) -> Scripted:
        with self._lock:
            self.requests.append(recorded)
            if recorded.method != "POST" or recorded.path != self.path:
                return Scripted(404, {"error": {"message": f"no route {recorded.path}"}})
            if self._script:
                reply = self._script.popleft()
            elif self._responder is not None:
                reply = self._responder(recorded)
            else:
                reply = Scripted(500, {"error": {"message": "fake server: script exhausted"}})
            self.answered.append((recorded, reply))
            return reply

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._serve()

            def do_GET(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = server._next(Recorded(self.command, self.path, headers, body))
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = (
                    reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode()
                )
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (a timeout test): nothing to answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
