"""A codec server: lets the Temporal Web UI and ``temporal`` CLI show decrypted payloads.

It speaks Temporal's codec-server protocol: ``POST /encode`` and ``POST /decode`` take and
return ``{"payloads": [...]}`` (the protobuf JSON of ``temporal.api.common.v1.Payloads``).
The UI calls it from the browser, so it answers CORS preflights for the UI's origin(s)
only. With a bearer token (``KEEL_CODEC_TOKEN``), every encode/decode must carry
``Authorization: Bearer <token>``, else 401: the keys stay on this server, and only callers
holding the token see plaintext. Bind it to loopback or put it behind the same access
control as the UI: whoever can call ``/decode`` can read payloads.

aiohttp is imported lazily by the CLI command, so ``starter.py --help`` stays fast.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payloads

from keel.codec import EncryptionCodec, KeyRing
from keel.redact import redact

__all__ = ["build_app", "serve"]

log = logging.getLogger(__name__)

_ALLOW_HEADERS = "content-type,x-namespace,authorization"
_MAX_BODY = 8 * 1024 * 1024


def build_app(keys: KeyRing, *, origins: Sequence[str], token: str = "") -> web.Application:
    """The aiohttp application; ``origins`` are the UI origins CORS admits (exact match)."""
    codec = EncryptionCodec(keys)
    allowed = {o.rstrip("/") for o in origins}

    def cors(req: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        origin = req.headers.get("Origin", "")
        if origin in allowed:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = _ALLOW_HEADERS
            resp.headers["Access-Control-Allow-Credentials"] = "true"
            resp.headers["Vary"] = "Origin"
        return resp

    def error(req: web.Request, status: int, message: str) -> web.StreamResponse:
        return cors(req, web.json_response({"error": message}, status=status))

    async def preflight(req: web.Request) -> web.StreamResponse:
        return cors(req, web.Response(status=204))

    def handler(fn: Callable[[Sequence], Awaitable[list]]) -> Callable[[web.Request], Awaitable]:
        async def handle(req: web.Request) -> web.StreamResponse:
            if token:
                got = req.headers.get("Authorization", "")
                if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                    return error(req, 401, "missing or wrong bearer token")
            if req.content_type != "application/json":
                return error(req, 415, "expected Content-Type: application/json")
            body = await req.read()
            try:
                payloads = json_format.Parse(body, Payloads())
            except (json_format.ParseError, DecodeError, UnicodeDecodeError) as e:
                return error(req, 400, f"body is not Payloads JSON: {str(e).splitlines()[0][:200]}")
            try:
                result = await fn(payloads.payloads)
            except Exception as e:  # an unknown key id, a tampered payload: one line, no payload
                message = getattr(e, "message", None) or str(e)
                log.warning("codec %s failed: %s", req.path, message)
                return error(req, 400, redact(message))
            resp = web.Response(
                text=json_format.MessageToJson(Payloads(payloads=result)), content_type="application/json"
            )
            return cors(req, resp)

        return handle

    app = web.Application(client_max_size=_MAX_BODY)
    app.add_routes(
        [
            web.post("/encode", handler(codec.encode)),
            web.post("/decode", handler(codec.decode)),
            web.options("/encode", preflight),
            web.options("/decode", preflight),
            # ``--codec-endpoint 'http://host/{namespace}'`` templating of the temporal CLI
            web.post("/{namespace}/encode", handler(codec.encode)),
            web.post("/{namespace}/decode", handler(codec.decode)),
            web.options("/{namespace}/encode", preflight),
            web.options("/{namespace}/decode", preflight),
        ]
    )
    return app


def serve(keys: KeyRing, *, host: str, port: int, origins: Sequence[str], token: str = "") -> None:
    """Run until interrupted (SIGINT/SIGTERM)."""
    web.run_app(
        build_app(keys, origins=origins, token=token),
        host=host,
        port=port,
        print=lambda *_: None,
        access_log=None,
        handle_signals=True,
    )
