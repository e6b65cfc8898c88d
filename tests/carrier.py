"""A fake shipping carrier speaking HTTP, with Stripe-style idempotency keys.

It behaves like a real provider's idempotency layer: the first request under a key is
executed and its response stored; any later request with that key gets the stored response
and executes nothing. ``lose_first_response`` executes the first request and then drops the
connection without answering (the response lost in transit that makes retries dangerous);
``down`` answers 503 to everything.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Carrier", "running_carrier"]


@dataclass
class Carrier:
    url: str = ""
    lose_first_response: bool = False
    down: bool = False
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Idempotency-Key) of every request received."""
    shipments: dict[str, dict[str, Any]] = field(default_factory=dict)
    _answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(
        self, method: str, path: str, key: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        with self._lock:
            self.requests.append((method, path, key))
            if self.down:
                return 503, {"error": "carrier down"}
            if not key:
                return 400, {"error": "Idempotency-Key required"}
            if key in self._answers:
                return self._answers[key]
            if method == "POST" and path == "/v1/shipments":
                sid = f"shp_{len(self.shipments) + 1}"
                self.shipments[sid] = {"id": sid, "status": "booked", **body}
                answer = (200, dict(self.shipments[sid]))
            elif method == "POST" and path.startswith("/v1/shipments/") and path.endswith("/cancel"):
                sid = path.split("/")[3]
                if sid not in self.shipments:
                    answer = (404, {"error": "no such shipment"})
                else:
                    self.shipments[sid]["status"] = "cancelled"
                    answer = (200, dict(self.shipments[sid]))
            else:
                return 404, {"error": "not found"}
            self._answers[key] = answer
            if self.lose_first_response:
                self.lose_first_response = False
                return None  # executed, but the caller never hears about it
            return answer


@contextmanager
def running_carrier(**kw: Any) -> Iterator[Carrier]:
    carrier = Carrier(**kw)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            answer = carrier.handle("POST", self.path, self.headers.get("Idempotency-Key", ""), body)
            if answer is None:
                self.close_connection = True
                return
            status, payload = answer
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    carrier.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield carrier
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
