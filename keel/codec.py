"""Payload encryption: what Temporal stores is ciphertext, readable only with Keel's keys.

Every client and worker (``keel.client.connect``) gets a data converter whose
``PayloadCodec`` seals each payload with AES-256-GCM (``cryptography``), following the shape
of Temporal's own encryption sample: the whole serialized payload (its metadata included)
is encrypted, and the outer payload carries ``encoding: binary/encrypted`` and the key id.
The key id is also bound as associated data, so a payload cannot be passed off as sealed
under another key. Failures use ``DefaultFailureConverterWithEncodedAttributes``: messages
and stack traces go into an encoded (thus encrypted) payload too.

Keys come from the environment (``KEEL_CODEC_KEYS=id1:<base64>,id2:<base64>``) or a key
file (``KEEL_CODEC_KEY_FILE``, default ``<state dir>/codec.keys``, one ``id:<base64>`` per
line), never from payloads. The LAST key is the newest: it encrypts; every listed key
decrypts. Rotation = append a key (``starter.py codec-key add``), restart workers; runs
started under the old key finish, because their history still decrypts. Remove a key only
once no retained history uses it. The embedded dev setup writes a key file on first use
(``ensure_key_file``) so ``make demo`` needs no setup.

A payload without Keel's encoding metadata passes through unchanged: histories recorded
before encryption (and the golden histories of the replay tests) still replay.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)
from temporalio.exceptions import ApplicationError

from keel.errors import CODEC_TAMPERED, UNKNOWN_CODEC_KEY, ConfigError
from keel.settings import Settings

__all__ = [
    "ENCODING",
    "KEY_ID_METADATA",
    "CodecConfigError",
    "EncryptionCodec",
    "KeyRing",
    "UnknownKeyError",
    "add_key",
    "data_converter",
    "ensure_key_file",
    "load_keyring",
    "new_key_line",
    "open_sealed",
    "parse_keys",
    "seal",
]

ENCODING = b"binary/encrypted"
"""Outer payload encoding of a sealed payload (the value Temporal's samples and UI expect)."""
KEY_ID_METADATA = "encryption-key-id"
"""Metadata key naming the key a payload was sealed with."""
_NONCE = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SEALED_MARK = "keel-sealed-v1"
"""Marks a JSON value sealed at rest by :func:`seal` (``tool_effects``)."""


class CodecConfigError(ConfigError):
    """Keys are missing or malformed; the message names the source and the problem."""


class UnknownKeyError(ApplicationError):
    """A payload is sealed under a key this process does not hold (non-retryable: a retry
    on the same worker cannot succeed; deploy the key)."""

    def __init__(self, key_id: str, known: Sequence[str]) -> None:
        super().__init__(
            f"payload is encrypted with unknown key id {key_id!r} (this process holds "
            f"{', '.join(repr(k) for k in known) or 'no keys'}); add that key to KEEL_CODEC_KEYS "
            "or the key file",
            type=UNKNOWN_CODEC_KEY,
            non_retryable=True,
        )
        self.key_id = key_id


@dataclasses.dataclass(frozen=True)
class KeyRing:
    """Known AES-256 keys, oldest first; the last one encrypts."""

    keys: tuple[tuple[str, bytes], ...]
    source: str = ""
    _ciphers: dict[str, AESGCM] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise CodecConfigError(f"{self.source or 'key ring'}: no keys")
        object.__setattr__(self, "_ciphers", {kid: AESGCM(key) for kid, key in self.keys})

    def __repr__(self) -> str:  # never print key material
        return f"KeyRing(ids={self.ids!r}, source={self.source!r})"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.keys)

    @property
    def newest(self) -> str:
        return self.keys[-1][0]

    def encrypt(self, data: bytes) -> tuple[str, bytes]:
        """``(key id, nonce + ciphertext + tag)`` under the newest key."""
        kid = self.newest
        nonce = os.urandom(_NONCE)
        return kid, nonce + self._ciphers[kid].encrypt(nonce, data, kid.encode())

    def decrypt(self, kid: str, blob: bytes) -> bytes:
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise UnknownKeyError(kid, self.ids)
        try:
            return cipher.decrypt(blob[:_NONCE], blob[_NONCE:], kid.encode())
        except InvalidTag:
            raise ApplicationError(
                f"payload sealed under key id {kid!r} failed authentication (tampered, or a "
                "different key with the same id)",
                type=CODEC_TAMPERED,
                non_retryable=True,
            ) from None


def parse_keys(text: str, source: str) -> KeyRing:
    """Parse ``id:base64`` entries separated by commas or newlines (``#`` starts a comment)."""
    keys: list[tuple[str, bytes]] = []
    for n, raw in enumerate(re.split(r"[,\n]", text), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        kid, sep, b64 = entry.partition(":")
        kid, b64 = kid.strip(), b64.strip()
        where = f"{source}: entry {n}"
        if not sep or not _KEY_ID.match(kid):
            raise CodecConfigError(
                f"{where}: expected <key-id>:<base64 key>, key id of letters, digits, . _ -"
            )
        try:
            key = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise CodecConfigError(f"{where} ({kid}): the key is not valid base64") from None
        if len(key) != 32:
            raise CodecConfigError(f"{where} ({kid}): an AES-256 key is 32 bytes, got {len(key)}")
        if any(kid == k for k, _ in keys):
            raise CodecConfigError(f"{where}: key id {kid!r} appears twice")
        keys.append((kid, key))
    if not keys:
        raise CodecConfigError(f"{source}: no keys")
    return KeyRing(tuple(keys), source)


def new_key_line(kid: str | None = None) -> str:
    """A fresh ``id:base64`` entry (id from the UTC time unless given)."""
    kid = kid or f"k{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"
    if not _KEY_ID.match(kid):
        raise CodecConfigError(f"key id {kid!r}: letters, digits, . _ - only (1-64)")
    return f"{kid}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def ensure_key_file(path: Path) -> bool:
    """Create ``path`` with one fresh key (mode 0600) unless it exists; True if created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write("# Keel payload keys: <id>:<base64 AES-256 key>; the last line encrypts.\n")
        f.write(new_key_line() + "\n")
    return True


def add_key(path: Path, kid: str | None = None) -> str:
    """Append a new newest key to the key file (rotation); returns its id."""
    line = new_key_line(kid)
    existing = parse_keys(path.read_text(), str(path)) if path.exists() else None
    new_id = line.split(":", 1)[0]
    if existing is not None and new_id in existing.ids:
        raise CodecConfigError(f"{path}: key id {new_id!r} already exists")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
    return new_id


def load_keyring(settings: Settings) -> KeyRing:
    """Keys from ``KEEL_CODEC_KEYS`` if set, else from the key file."""
    if settings.codec_keys.strip():
        return parse_keys(settings.codec_keys, "KEEL_CODEC_KEYS")
    key_file = settings.key_file
    try:
        text = key_file.read_text()
    except FileNotFoundError:
        raise CodecConfigError(
            f"no payload encryption key: set KEEL_CODEC_KEYS or KEEL_CODEC_KEY_FILE, or run "
            f"'starter.py dev up' to create {key_file}"
        ) from None
    except OSError as e:
        raise CodecConfigError(f"{key_file}: cannot read the key file ({e.strerror})") from None
    return parse_keys(text, str(key_file))


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over each whole payload; the key id travels in the metadata."""

    def __init__(self, keys: KeyRing) -> None:
        super().__init__()
        self.keys = keys

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            kid, blob = self.keys.encrypt(p.SerializeToString())
            out.append(Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: kid.encode()}, data=blob))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                out.append(p)  # plaintext (recorded before encryption): passes through
                continue
            kid = p.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
            out.append(Payload.FromString(self.keys.decrypt(kid, p.data)))
        return out


def data_converter(keys: KeyRing) -> DataConverter:
    """The pydantic converter with the encryption codec and encoded failure attributes."""
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def seal(keys: KeyRing, value: Any) -> dict[str, str]:
    """A JSON value sealed for storage at rest (same keys, same rotation as payloads)."""
    kid, blob = keys.encrypt(json.dumps(value, separators=(",", ":"), default=str).encode())
    return {"v": SEALED_MARK, "kid": kid, "ct": base64.b64encode(blob).decode()}


def open_sealed(keys: KeyRing, sealed: dict[str, str]) -> Any:
    """The value :func:`seal` sealed; unknown key ids raise :class:`UnknownKeyError`."""
    if sealed.get("v") != SEALED_MARK:
        raise CodecConfigError("not a sealed value")
    return json.loads(keys.decrypt(sealed["kid"], base64.b64decode(sealed["ct"])))
