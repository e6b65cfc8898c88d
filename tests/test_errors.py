"""One exception tree (``keel.errors``), and the ApplicationError type names as a wire contract."""

from __future__ import annotations

import pytest

from keel import errors
from keel.activities.audit import AuditError
from keel.activities.sandbox import SandboxError
from keel.activities.tools.loader import ToolLoadError
from keel.activities.tools.registry import LimitExceeded, ToolError
from keel.agents import AgentError
from keel.budget import (
    IdempotencyConflict,
    InvalidLedgerRequest,
    LedgerError,
    ReservationClosed,
    ReservationNotFound,
)
from keel.cli import CliError
from keel.client import KeelClientError, RefusedError, RunExistsError, RunNotFoundError
from keel.codec import CodecConfigError
from keel.devservices import ServiceError
from keel.errors import ConfigError, KeelError
from keel.policy import PolicyError
from keel.pricing import PricingError
from keel.settings import SettingsError
from keel.submit import RequestIdConflict

TREE: dict[type[Exception], tuple[type[BaseException], ...]] = {
    # class: the bases callers already catch it by, which it must keep
    SettingsError: (ConfigError, ValueError),
    PolicyError: (ConfigError, ValueError),
    AgentError: (ConfigError, ValueError),
    PricingError: (ConfigError, ValueError),
    CodecConfigError: (ConfigError, ValueError),
    ToolLoadError: (RuntimeError,),
    ToolError: (),
    LimitExceeded: (ToolError,),
    SandboxError: (),
    AuditError: (RuntimeError,),
    LedgerError: (),
    IdempotencyConflict: (LedgerError,),
    ReservationNotFound: (LedgerError,),
    ReservationClosed: (LedgerError,),
    InvalidLedgerRequest: (LedgerError,),
    KeelClientError: (),
    RunNotFoundError: (KeelClientError,),
    RunExistsError: (KeelClientError,),
    RefusedError: (KeelClientError,),
    RequestIdConflict: (),
    ServiceError: (RuntimeError,),
    CliError: (),
}


@pytest.mark.parametrize("cls", list(TREE), ids=lambda c: c.__name__)
def test_every_exception_is_a_keel_error_and_keeps_its_builtin_base(cls: type[Exception]) -> None:
    assert issubclass(cls, KeelError)
    for base in TREE[cls]:
        assert issubclass(cls, base), (cls, base)
    assert f"── {cls.__name__}" in errors.__doc__  # drawn in the tree


def test_a_keel_error_is_caught_as_its_old_builtin_and_keeps_its_message() -> None:
    with pytest.raises(ValueError, match=r"^policy.yaml: roles: bad$"):
        raise PolicyError("policy.yaml: roles: bad")
    with pytest.raises(KeelError):
        raise ToolError("upstream down")


def test_the_application_error_type_names_never_change() -> None:
    """Recorded histories and running workflows hold these strings: a new value would make a
    workflow miss the error it matches (a budget denial read as a plain failure)."""
    assert {n: getattr(errors, n) for n in errors.__all__ if n.isupper()} == {
        "AUTH_ERROR": "ProviderAuthError",
        "BAD_REQUEST": "ProviderBadRequest",
        "BUDGET_DENIED": "BudgetDenied",
        "CIRCUIT_OPEN": "CircuitOpen",
        "CODEC_TAMPERED": "CodecTampered",
        "IDEMPOTENCY_CONFLICT": "IdempotencyConflict",
        "INVALID_JUDGEMENT": "InvalidJudgement",
        "INVALID_PLAN": "InvalidPlan",
        "INVALID_REQUEST": "InvalidRequest",
        "INVALID_TOOL_ARGUMENTS": "InvalidToolArguments",
        "INTERNAL_ERROR": "KeelInternalError",
        "POLICY_ERROR": "PolicyError",
        "PRICING_ERROR": "PricingError",
        "PROVIDER_ERROR": "ProviderError",
        "QUOTA_EXCEEDED": "ProviderQuotaExceeded",
        "RATE_LIMITED": "ProviderRateLimited",
        "REFUSAL": "ProviderRefusal",
        "STEP_ABANDONED": "StepAbandoned",
        "TIMEOUT": "ProviderTimeout",
        "TOOL_ENDED_TRANSACTION": "ToolEndedTransaction",
        "TOOL_PERMANENT_ERROR": "ToolPermanentError",
        "TOOL_TRANSIENT_ERROR": "ToolTransientError",
        "TRUNCATED": "ModelOutputTruncated",
        "UNAVAILABLE": "ProviderUnavailable",
        "UNKNOWN_CODEC_KEY": "UnknownCodecKey",
        "UNKNOWN_TOOL": "UnknownTool",
    }


def test_no_type_name_is_spelled_out_outside_the_core() -> None:
    """Every raise and every match refers to the constants (a typo would silently never match)."""
    import re

    from keel.settings import PROJECT_ROOT

    names = {v for n, v in vars(errors).items() if n.isupper() and isinstance(v, str)}
    pattern = re.compile(r"""(type|error_type)=["'](\w+)["']|\.type (?:==|!=) ["'](\w+)["']""")
    found = []
    for folder in ("keel", "workflows", "activities"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            if path.name == "errors.py" and path.parent.name == "keel":
                continue
            for m in pattern.finditer(path.read_text(encoding="utf-8")):
                if (m.group(2) or m.group(3)) in names:
                    found.append(f"{path.relative_to(PROJECT_ROOT)}: {m.group(0)}")
    assert found == []
