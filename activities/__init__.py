"""All I/O: models, tools, ledger, memory, audit, guardrails — each an activity or its helper."""
