"""Test doubles: the scripted model provider (``models``) and the test tools (``tools``).

Neither is production code: the tools reach a worker only through the public tool-package
mechanism (``KEEL_TOOL_MODULES=tests.doubles.tools``, see ``keel.activities.tools.loader``),
the scripted model only through the provider seam (``keel.activities.models.serve_provider``).
"""
