"""Fixtures: a fresh fake server per test, wired into the environment the providers read."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from keel.activities.models import close_clients
from tests.providers.fake_anthropic import FakeAnthropic
from tests.providers.fake_openai import FakeOpenAI

FAKE_OPENAI_KEY = "sk-test-fake-openai-key-0123456789"
FAKE_ANTHROPIC_KEY = "sk-ant-test-fake-anthropic-key-0123456789"


@pytest.fixture
def fake_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url + "/v1")
    monkeypatch.delenv("KEEL_OPENAI_JSON_MODE", raising=False)
    yield server
    server.stop()


@pytest.fixture
def fake_anthropic(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropic]:
    server = FakeAnthropic().start()
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_ANTHROPIC_KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    """Each test gets fresh clients; closing them avoids unclosed-socket warnings."""
    yield
    await close_clients()
