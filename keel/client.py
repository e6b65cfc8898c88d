"""One way to build a Temporal client, shared by worker, starter and tests."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from keel.settings import Settings

__all__ = ["connect"]


async def connect(settings: Settings) -> Client:
    """Connect with the pydantic converter (typed payloads, readable in the Web UI)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
