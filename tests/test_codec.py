"""The payload codec and the codec server, attacked as an operator with the wrong key would.

Unit level: every payload is AES-256-GCM ciphertext with its key id; rotation decrypts old
payloads and encrypts with the newest key; an unknown key id is a non-retryable error that
names it; a tampered payload is refused; plaintext passes through (old histories replay);
failure messages are encoded too. HTTP level: the codec server the dev services start, with
and without a bearer token, and CORS only for the UI origin.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.failure.v1 import Failure
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError

from keel.codec import (
    ENCODING,
    KEY_ID_METADATA,
    CodecConfigError,
    EncryptionCodec,
    UnknownKeyError,
    add_key,
    data_converter,
    ensure_key_file,
    load_keyring,
    new_key_line,
    open_sealed,
    parse_keys,
    seal,
)
from keel.devservices import DevServices, free_port
from keel.models import AgentRequest
from keel.settings import Settings

SECRET = "sk-live-4eC39HqLyjWDarjtT1zdp7dcFAKE"


def _ring(*ids: str):
    return parse_keys(",".join(new_key_line(i) for i in ids), "test")


def _req() -> AgentRequest:
    return AgentRequest(tenant="acme", user="alice", message=f"use {SECRET} for card 4242 4242 4242 4242")


async def test_payloads_are_ciphertext_with_key_id() -> None:
    conv = data_converter(_ring("k1"))
    [p] = await conv.encode([_req()])
    assert p.metadata["encoding"] == ENCODING and p.metadata[KEY_ID_METADATA] == b"k1"
    raw = p.SerializeToString()
    assert SECRET.encode() not in raw and b"4242" not in raw and b"acme" not in raw
    [back] = await conv.decode([p], [AgentRequest])
    assert back == _req()
    [q] = await conv.encode([_req()])
    assert q.data != p.data  # a fresh nonce per payload


async def test_rotation_old_payloads_decrypt_new_ones_use_the_newest_key() -> None:
    old = _ring("k1")
    both = dataclasses.replace(old, keys=(*old.keys, *_ring("k2").keys))
    [under_k1] = await data_converter(old).encode([_req()])
    [under_k2] = await data_converter(both).encode([_req()])
    assert under_k2.metadata[KEY_ID_METADATA] == b"k2"
    assert await data_converter(both).decode([under_k1, under_k2], [AgentRequest, AgentRequest]) == [
        _req(),
        _req(),
    ]
    with pytest.raises(UnknownKeyError) as e:
        await EncryptionCodec(old).decode([under_k2])
    assert e.value.non_retryable and e.value.type == "UnknownCodecKey"
    assert "'k2'" in e.value.message and "'k1'" in e.value.message


async def test_tampered_payload_is_refused() -> None:
    ring = _ring("k1")
    [p] = await EncryptionCodec(ring).encode([Payload(data=b"hello")])
    flipped = Payload(metadata=dict(p.metadata), data=p.data[:-1] + bytes([p.data[-1] ^ 1]))
    with pytest.raises(ApplicationError, match="failed authentication"):
        await EncryptionCodec(ring).decode([flipped])
    # a payload relabelled with another key id of the ring fails too (the id is bound as AAD)
    two = _ring("a", "b")
    [p] = await EncryptionCodec(two).encode([Payload(data=b"x")])
    relabelled = Payload(metadata={**dict(p.metadata), KEY_ID_METADATA: b"a"}, data=p.data)
    with pytest.raises(ApplicationError, match="failed authentication"):
        await EncryptionCodec(two).decode([relabelled])


async def test_plaintext_payloads_pass_through() -> None:
    [plain] = await pydantic_data_converter.encode([_req()])
    assert await data_converter(_ring("k1")).decode([plain], [AgentRequest]) == [_req()]


async def test_failure_messages_and_stack_traces_are_encrypted() -> None:
    conv = data_converter(_ring("k1"))
    try:
        raise ApplicationError(f"provider refused key {SECRET}", type="X")
    except ApplicationError as err:
        failure = Failure()
        await conv.encode_failure(err, failure)
    raw = failure.SerializeToString()
    assert SECRET.encode() not in raw and failure.message == "Encoded failure"
    back = await conv.decode_failure(failure)
    assert SECRET in str(back)


def test_bad_key_configuration_is_one_clear_line(tmp_path) -> None:
    for text, msg in [
        ("k1", "expected <key-id>:<base64 key>"),
        ("k1:not-base64!", "not valid base64"),
        (f"k1:{base64.b64encode(b'short').decode()}", "32 bytes, got 5"),
        (f"{new_key_line('k1')},{new_key_line('k1')}", "appears twice"),
        ("# only a comment", "no keys"),
    ]:
        with pytest.raises(CodecConfigError, match=msg) as e:
            parse_keys(text, "KEEL_CODEC_KEYS")
        assert "\n" not in str(e.value) and str(e.value).startswith("KEEL_CODEC_KEYS")
        assert "not-base64" not in str(e.value) or msg != "not valid base64"
    missing = Settings(state_dir=tmp_path)
    with pytest.raises(CodecConfigError, match=r"no payload encryption key.*codec\.keys"):
        load_keyring(missing)


def test_key_file_created_once_private_and_rotated(tmp_path) -> None:
    s = Settings(state_dir=tmp_path / "state")
    assert ensure_key_file(s.key_file) and not ensure_key_file(s.key_file)
    assert s.key_file.stat().st_mode & 0o777 == 0o600
    first = load_keyring(s)
    new = add_key(s.key_file, "k-next")
    ring = load_keyring(s)
    assert ring.ids == (*first.ids, "k-next") and ring.newest == new
    assert "k-next" in repr(ring) and base64.b64encode(ring.keys[-1][1]).decode() not in repr(ring)
    env_ring = load_keyring(dataclasses.replace(s, codec_keys=new_key_line("envkey")))
    assert env_ring.ids == ("envkey",)  # KEEL_CODEC_KEYS wins over the file


def test_sealed_values_at_rest() -> None:
    ring = _ring("k1")
    sealed = seal(ring, {"to": "bob@example.com", "key": SECRET})
    assert SECRET not in json.dumps(sealed) and sealed["kid"] == "k1"
    assert open_sealed(ring, sealed) == {"to": "bob@example.com", "key": SECRET}
    with pytest.raises(UnknownKeyError, match="'k1'"):
        open_sealed(_ring("other"), sealed)


def _body(payloads: list[Payload]) -> str:
    return json_format.MessageToJson(Payloads(payloads=payloads))


async def test_codec_server_over_http_token_and_cors(tmp_path) -> None:
    """The managed codec server decodes what workers encrypted, only with the token."""
    s = Settings(state_dir=tmp_path / "state", codec_port=free_port(), ui_url="http://127.0.0.1:18233")
    services = DevServices(s)
    services.start_codec_server(env={"KEEL_CODEC_TOKEN": "t0ken-for-test"})
    try:
        ring = load_keyring(s)  # the key file the dev services created on first use
        [enc] = await data_converter(ring).encode([_req()])
        url = s.codec_url
        async with httpx.AsyncClient(timeout=10) as http:
            body = _body([enc])
            headers = {"Content-Type": "application/json", "X-Namespace": "default"}
            denied = await http.post(f"{url}/decode", content=body, headers=headers)
            assert denied.status_code == 401 and SECRET not in denied.text
            wrong = await http.post(
                f"{url}/decode", content=body, headers={**headers, "Authorization": "Bearer nope"}
            )
            assert wrong.status_code == 401
            auth = {**headers, "Authorization": "Bearer t0ken-for-test"}
            ok = await http.post(f"{url}/decode", content=body, headers=auth)
            assert ok.status_code == 200, ok.text
            decoded = json_format.Parse(ok.text, Payloads()).payloads
            assert await pydantic_data_converter.decode(decoded, [AgentRequest]) == [_req()]
            # encode: what the server seals, a worker holding the key opens
            [plain] = await pydantic_data_converter.encode([_req()])
            sealed = await http.post(f"{url}/encode", content=_body([plain]), headers=auth)
            [again] = json_format.Parse(sealed.text, Payloads()).payloads
            assert again.metadata["encoding"] == ENCODING and SECRET.encode() not in again.data
            assert await data_converter(ring).decode([again], [AgentRequest]) == [_req()]
            # an unknown key id: a clear 400 naming it
            [foreign] = await data_converter(_ring("stranger")).encode([_req()])
            bad = await http.post(f"{url}/decode", content=_body([foreign]), headers=auth)
            assert bad.status_code == 400 and "'stranger'" in bad.json()["error"]
            junk = await http.post(f"{url}/decode", content="{not json", headers=auth)
            assert junk.status_code == 400
            # CORS: the UI origin may call it from the browser, another origin may not
            pre = await http.options(
                f"{url}/decode",
                headers={
                    "Origin": "http://127.0.0.1:18233",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
                },
            )
            assert pre.status_code == 204
            assert pre.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:18233"
            assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
            twin = await http.options(f"{url}/decode", headers={"Origin": "http://localhost:18233"})
            assert twin.headers.get("Access-Control-Allow-Origin") == "http://localhost:18233"
            evil = await http.options(f"{url}/decode", headers={"Origin": "https://evil.test"})
            assert "Access-Control-Allow-Origin" not in evil.headers
        assert services.status()["codec"].startswith("running")
    finally:
        services.stop_codec_server()
    assert not services.codec_running()


async def test_codec_server_without_token_is_open(tmp_path) -> None:
    s = Settings(state_dir=tmp_path / "state", codec_port=free_port())
    services = DevServices(s)
    services.start_codec_server(env={"KEEL_CODEC_TOKEN": ""})
    try:
        [enc] = await data_converter(load_keyring(s)).encode([_req()])
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(
                f"{s.codec_url}/decode", content=_body([enc]), headers={"Content-Type": "application/json"}
            )
        assert r.status_code == 200
        assert SECRET in base64.b64decode(json.loads(r.text)["payloads"][0]["data"]).decode()
    finally:
        services.stop_codec_server()


async def test_tool_effects_at_rest_redacted_and_sealed(db_pool) -> None:
    """A recorded effect is readable with SQL only redacted; a replay gets the exact result
    with the keys, and a clear non-retryable error naming the key id without them."""
    import uuid

    from psycopg.types.json import Jsonb

    from keel.activities.tools import effects
    from keel.models import ToolResult

    ring = _ring("rest-1")
    key = f"agent/acme/r-{uuid.uuid4().hex[:8]}/s1"
    result = ToolResult(ok=True, data={"to": "bob@example.com", "token": SECRET}, summary="sent")
    async with db_pool.connection() as conn:
        await conn.execute(
            "insert into tool_effects (idempotency_key, tool, tenant, ok, result) "
            "values (%s, 't', 'acme', true, %s)",
            (key, Jsonb(effects.at_rest(result, ring))),
        )
        raw = await (
            await conn.execute("select result::text from tool_effects where idempotency_key=%s", (key,))
        ).fetchone()
        assert raw is not None and SECRET not in raw[0] and "bob@example.com" not in raw[0]
        assert "[REDACTED:email]" in raw[0]
        exact = await effects.recorded(
            conn, key, dataclasses.replace(ring, keys=(*_ring("old").keys, *ring.keys))
        )
        assert exact is not None and exact.data == result.data and exact.replayed
        with pytest.raises(UnknownKeyError, match="'rest-1'") as e:
            await effects.recorded(conn, key, _ring("other"))
        assert e.value.non_retryable
        redacted = await effects.recorded(conn, key, None)  # no keys: the redacted copy only
        assert redacted is not None and redacted.data["to"] == "[REDACTED:email]"
