"""Keel's exceptions, one tree, and the ``ApplicationError`` type names shared across Temporal.

Every exception Keel raises for a caller to catch derives from :class:`KeelError`; each class
stays where it is raised (its module owns its message) and keeps the built-in base callers
already catch (``ValueError`` for bad configuration, ``RuntimeError`` for load and service
failures)::

    KeelError
    ├── ConfigError (ValueError)          what an operator wrote is invalid; one line, file:field
    │   ├── SettingsError                 keel.settings         KEEL_* variables, profiles
    │   ├── PolicyError                   keel.policy           the policy file
    │   ├── AgentError                    keel.agents           agent definitions
    │   ├── PricingError                  keel.pricing          price table / model without a price
    │   └── CodecConfigError              keel.codec            payload encryption keys
    ├── ToolLoadError (RuntimeError)      keel.activities.tools.loader   a tool module cannot load
    ├── ToolError                         keel.activities.tools.registry a tool's own failure
    │   └── LimitExceeded                 a policy limit the tool enforces refused the call
    ├── SandboxError                      keel.activities.sandbox        the sandbox cannot run
    ├── AuditError (RuntimeError)         keel.activities.audit          the audit chain refuses
    ├── LedgerError                       keel.budget           the budget ledger refuses
    │   ├── IdempotencyConflict           same key, different request
    │   ├── ReservationNotFound
    │   ├── ReservationClosed
    │   └── InvalidLedgerRequest
    ├── KeelClientError                   keel.client           keel.Client (Python API)
    │   ├── RunNotFoundError
    │   ├── RunExistsError
    │   └── RefusedError
    ├── RequestIdConflict                 keel.submit           a request id reused for another request
    ├── ServiceError (RuntimeError)       keel.devservices      embedded PostgreSQL / Temporal
    └── CliError                          keel.cli              a CLI usage error (exit code 2)

Not in the tree, on purpose: failures that cross the Temporal boundary are
``temporalio.exceptions.ApplicationError`` (with ``codec.UnknownKeyError`` a subclass of
it), typed by the names below; and the workflows' private control flow (``Abort``,
``ReferenceError_``, ``LocalActivityFailed``) that never reaches a caller.

The type names are part of the wire contract: activities raise them, workflows and retry
policies match them, and recorded histories and running workflows hold them. Rename a
constant if you must, never its value.

This module is the pure core: it imports nothing of Keel's, so workflows, activities and the
assembly all import it.
"""

from __future__ import annotations

__all__ = [
    "AUTH_ERROR",
    "BAD_REQUEST",
    "BUDGET_DENIED",
    "CIRCUIT_OPEN",
    "CODEC_TAMPERED",
    "IDEMPOTENCY_CONFLICT",
    "INVALID_JUDGEMENT",
    "INVALID_PLAN",
    "INVALID_REQUEST",
    "INVALID_TOOL_ARGUMENTS",
    "INTERNAL_ERROR",
    "POLICY_ERROR",
    "PRICING_ERROR",
    "PROVIDER_ERROR",
    "QUOTA_EXCEEDED",
    "RATE_LIMITED",
    "REFUSAL",
    "STEP_ABANDONED",
    "TIMEOUT",
    "TOOL_ENDED_TRANSACTION",
    "TOOL_PERMANENT_ERROR",
    "TOOL_TRANSIENT_ERROR",
    "TRUNCATED",
    "UNAVAILABLE",
    "UNKNOWN_CODEC_KEY",
    "UNKNOWN_TOOL",
    "ConfigError",
    "KeelError",
]


class KeelError(Exception):
    """Base of every exception Keel raises for a caller to catch (see the tree above)."""


class ConfigError(KeelError, ValueError):
    """Configuration an operator wrote is invalid; ``str(e)`` is one line naming where."""


# ---------------------------------------------------------------- ApplicationError type names
# Model providers (keel.activities.models.errors translates every SDK error to one of these).
RATE_LIMITED = "ProviderRateLimited"
UNAVAILABLE = "ProviderUnavailable"
TIMEOUT = "ProviderTimeout"
AUTH_ERROR = "ProviderAuthError"
BAD_REQUEST = "ProviderBadRequest"
QUOTA_EXCEEDED = "ProviderQuotaExceeded"
REFUSAL = "ProviderRefusal"
PROVIDER_ERROR = "ProviderError"
TRUNCATED = "ModelOutputTruncated"
CIRCUIT_OPEN = "CircuitOpen"
"""A provider's or tool's breaker is open and nothing else can take the call."""

# Budgets and pricing.
BUDGET_DENIED = "BudgetDenied"
"""The ledger refused a hold: the workflow stops the run as ``budget_exhausted``."""
PRICING_ERROR = "PricingError"
IDEMPOTENCY_CONFLICT = "IdempotencyConflict"

# The agent's own activities and workflow.
INVALID_PLAN = "InvalidPlan"
INVALID_JUDGEMENT = "InvalidJudgement"
INVALID_REQUEST = "InvalidRequest"
POLICY_ERROR = "PolicyError"
INTERNAL_ERROR = "KeelInternalError"
RUN_DEADLINE = "RunDeadline"
"""The run's deadline passed during its first plan (``begin_run``): the run stops as an escape
hatch, the plan's calls charged as any interrupted call is."""
PREPARE_STAGE = {"stage": "prepare"}
"""First detail of a ``begin_run`` error raised by its preparation (before any model call):
the run reports it as the preparation's failure, not the plan's."""

# Tools.
UNKNOWN_TOOL = "UnknownTool"
INVALID_TOOL_ARGUMENTS = "InvalidToolArguments"
TOOL_TRANSIENT_ERROR = "ToolTransientError"
TOOL_PERMANENT_ERROR = "ToolPermanentError"
TOOL_ENDED_TRANSACTION = "ToolEndedTransaction"
"""A tool committed or rolled back the effect's transaction itself: its effect is not recorded."""
STEP_ABANDONED = "StepAbandoned"
"""The run fenced the step off (it ended, or moved on) while this attempt waited: it must not act."""

# Payload codec.
UNKNOWN_CODEC_KEY = "UnknownCodecKey"
CODEC_TAMPERED = "CodecTampered"
