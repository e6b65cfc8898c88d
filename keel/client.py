"""One way to build a Temporal client, shared by worker, starter and tests."""

from __future__ import annotations

from temporalio.client import Client

from keel.codec import data_converter, load_keyring
from keel.settings import Settings

__all__ = ["connect"]


async def connect(settings: Settings) -> Client:
    """Connect with the pydantic converter and the encryption codec: every payload Temporal
    stores (inputs, results, failures, summaries) is ciphertext under the settings' keys."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(load_keyring(settings)),
    )
