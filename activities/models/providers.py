"""Pick the provider for a model name (``openai:…``, ``anthropic:…``, ``offline``).

Apart from the package so that the package (the interface and the shared helpers) imports no
provider and the providers can import it without a cycle.
"""

from __future__ import annotations

from keel.activities.models import ModelProvider, served_provider, split_model
from keel.activities.models.offline import OfflineModel

__all__ = ["get_provider"]


def get_provider(model: str) -> ModelProvider:
    """Return the provider for ``model`` (``openai:…``, ``anthropic:…`` or ``offline``).

    Raises:
        ValueError: if the prefix names no known provider.
    """
    provider, _ = split_model(model)
    served = served_provider(provider)  # a test's scripted model (serve_provider), if any
    if served is not None:
        return served
    # The SDK providers are imported on first use, for start-up time only (no cycle hides
    # here; `make lint` proves it): the OpenAI and Anthropic SDKs take seconds to import, and
    # a worker or a test that only runs the offline model never needs them.
    if provider == "openai":
        from keel.activities.models.openai_provider import OpenAIProvider

        return OpenAIProvider()
    if provider == "anthropic":
        from keel.activities.models.anthropic_provider import AnthropicProvider

        return AnthropicProvider()
    return OfflineModel()
