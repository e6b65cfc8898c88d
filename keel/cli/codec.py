"""``codec-server`` and ``codec-key``: reading encrypted runs, and rotating their keys."""

from __future__ import annotations

import argparse
import json
import os

from keel.cli._output import CliError
from keel.settings import load_settings

__all__ = ["register"]

TOKEN_ENV = "KEEL_CODEC_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "codec-server",
        help="serve Temporal's codec protocol so the Web UI and CLI show decrypted payloads",
        description="Decrypt (POST /decode) and encrypt (POST /encode) payloads for the Temporal "
        "Web UI and the temporal CLI, with this process's keys (KEEL_CODEC_KEYS or the key file). "
        f"With {TOKEN_ENV} set, callers must send 'Authorization: Bearer <token>' (else 401). "
        "CORS admits the UI origin(s) only.",
        epilog="examples:\n"
        "  starter.py codec-server                       # 127.0.0.1:8234, UI origin from KEEL_UI_URL\n"
        "  KEEL_CODEC_TOKEN=s3cret starter.py codec-server --host 0.0.0.0 --port 8081 \\\n"
        "      --origin https://temporal-ui.internal\n"
        "  temporal workflow show -w agent/acme/r-1 --codec-endpoint http://127.0.0.1:8234",
        formatter_class=raw,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: KEEL_CODEC_PORT or 8234)")
    p.add_argument(
        "--origin",
        action="append",
        default=[],
        metavar="URL",
        help="a Web UI origin CORS admits (repeatable; default: KEEL_UI_URL and its localhost twin)",
    )
    p.add_argument("--json", action="store_true", help="print the start-up banner as one JSON line")
    p.set_defaults(func=_serve)

    k = sub.add_parser(
        "codec-key",
        help="list payload keys, or add a new newest key (rotation)",
        description="Payload keys live in KEEL_CODEC_KEYS or the key file (KEEL_CODEC_KEY_FILE, "
        "default <state dir>/codec.keys). The last key encrypts; every key decrypts. 'add' appends "
        "a new key to the key file: restart workers and the codec server to start using it; runs "
        "started under older keys still finish.",
        epilog="examples:\n  starter.py codec-key list\n  starter.py codec-key add [--id k2026-12]\n"
        "  starter.py codec-key new        # print a fresh id:key entry for KEEL_CODEC_KEYS",
        formatter_class=raw,
    )
    k.add_argument("action", choices=["list", "add", "new"], help="what to do")
    k.add_argument("--id", default=None, help="key id for 'add'/'new' (default: from the time)")
    k.add_argument("--json", action="store_true", help="print JSON")
    k.set_defaults(func=_key)


def default_origins(ui_url: str) -> list[str]:
    """The UI origin plus its 127.0.0.1/localhost twin (browsers treat them as different)."""
    origin = ui_url.rstrip("/")
    twins = [origin]
    for a, b in (("//127.0.0.1", "//localhost"), ("//localhost", "//127.0.0.1")):
        if a in origin:
            twins.append(origin.replace(a, b))
    return twins


def _serve(args: argparse.Namespace) -> int:
    from keel.codec import CodecConfigError, load_keyring
    from keel.codec_server import serve

    settings = load_settings()
    try:
        keys = load_keyring(settings)
    except CodecConfigError as e:
        raise CliError(str(e)) from None
    port = args.port if args.port is not None else settings.codec_port
    if not 0 < port < 65536:
        raise CliError(f"--port must be 1-65535, got {port}")
    origins = args.origin or default_origins(settings.ui_url)
    token = os.environ.get(TOKEN_ENV, "")
    banner = {
        "url": f"http://{args.host}:{port}",
        "keys": list(keys.ids),
        "newest": keys.newest,
        "cors": origins,
        "token": bool(token),
    }
    print(
        json.dumps(banner)
        if args.json
        else f"codec server on {banner['url']} · keys {', '.join(keys.ids)} (newest {keys.newest}) "
        f"· CORS {', '.join(origins)} · token {'required' if token else 'off'}",
        flush=True,
    )
    serve(keys, host=args.host, port=port, origins=origins, token=token)
    return 0


def _key(args: argparse.Namespace) -> int:
    from keel.codec import CodecConfigError, add_key, load_keyring, new_key_line

    settings = load_settings()
    try:
        if args.action == "new":
            print(new_key_line(args.id))
            return 0
        if args.action == "add":
            if settings.codec_keys.strip():
                raise CliError(
                    "KEEL_CODEC_KEYS is set: append a 'starter.py codec-key new' entry to it instead"
                )
            kid = add_key(settings.key_file, args.id)
            print(
                json.dumps({"added": kid, "file": str(settings.key_file)})
                if args.json
                else f"added key {kid} to {settings.key_file} (newest: restart workers to encrypt with it)"
            )
            return 0
        keys = load_keyring(settings)
    except CodecConfigError as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps({"source": keys.source, "keys": list(keys.ids), "newest": keys.newest}))
    else:
        print(f"source   {keys.source}")
        for kid in keys.ids:
            print(f"key      {kid}" + ("  (newest: encrypts)" if kid == keys.newest else ""))
    return 0
