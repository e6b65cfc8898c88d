"""One redaction function and one list of detectors, used by every sink Keel writes to.

Secrets (API keys, tokens, private keys, JWTs, credentials in URLs) and PII (e-mail
addresses, Luhn-valid card numbers, SSNs, phone numbers) are replaced by typed placeholders
``[REDACTED:<kind>]``, so a reader (a person, a model, a log search) still sees *what* was
there without seeing it. The same function runs on the final answer, memory, audit rows,
spans, Temporal summaries and details, the prompt sent to a provider, CLI output and the
readable copy of ``tool_effects``: a secret missed in one place is missed everywhere, and
fixed everywhere by one change here.

Where a maintained pattern exists it is taken from Yelp's ``detect-secrets`` plugins (their
``denylist`` regexes: AWS, GitHub, GitLab, Slack, Stripe, Twilio, SendGrid, npm, PyPI, ...)
rather than re-written; Keel keeps its own only where those are narrower than what must be
caught (whole PEM blocks, JWTs with their signature, ``sk-`` keys of OpenAI-compatible
vendors, ``sk-ant-`` keys, bearer tokens, ``password=...`` style assignments).

Pure and deterministic (no I/O), so workflows may call it through a pass-through import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

__all__ = ["DETECTORS", "Detector", "PII_KINDS", "SECRET_KINDS", "find", "redact", "redact_data"]


class Detector:
    """A named pattern; ``replace`` turns a match into its placeholder (keeping context)."""

    __slots__ = ("_check", "_group", "kind", "pattern", "pii")

    def __init__(
        self,
        kind: str,
        pattern: re.Pattern[str],
        *,
        pii: bool = False,
        check: Callable[[str], bool] | None = None,
        group: bool = False,
    ) -> None:
        self.kind, self.pattern, self.pii, self._check, self._group = kind, pattern, pii, check, group

    def replace(self, m: re.Match[str]) -> str:
        if self._check is not None and not self._check(m.group(0)):
            return m.group(0)
        placeholder = f"[REDACTED:{self.kind}]"
        keep = m.groupdict().get("keep")
        if keep is not None:  # Keel's own patterns: keep the label (``password=``, ``Bearer``)
            return keep + placeholder
        groups = [i for i in range(1, m.re.groups + 1) if m.group(i)] if self._group else []
        if groups:  # detect-secrets' patterns: the last non-empty group is the secret itself
            g = groups[-1]
            start, end = m.start(g) - m.start(0), m.end(g) - m.start(0)
            whole = m.group(0)
            return whole[:start] + placeholder + whole[end:]
        return placeholder


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total, alt = total + d, not alt
    return total % 10 == 0


def _is_card(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _ours(kind: str, pattern: str) -> Detector:
    return Detector(kind, re.compile(pattern))


def _plugin(kind: str, plugin: Any, *, group: bool = False) -> list[Detector]:
    """A detect-secrets plugin's patterns. ``group``: the pattern captures the secret itself
    (its last non-empty group) among context to keep (``://user:<password>@``); otherwise any
    groups are prefixes (``(ghp|gho)_...``) and the whole match goes."""
    return [Detector(kind, p, group=group) for p in plugin.denylist]


# Order matters: whole blocks (PEM) and structured tokens before generic shapes, so a JWT is
# one placeholder rather than three pieces.
DETECTORS: tuple[Detector, ...] = (
    _ours("private_key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)"),
    _ours("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}"),
    _ours("anthropic_key", r"\bsk-ant-[A-Za-z0-9_-]{16,}"),
    *_plugin("openai_key", OpenAIDetector),
    *_plugin("aws_key", AWSKeyDetector, group=True),
    *_plugin("github_token", GitHubTokenDetector),
    *_plugin("gitlab_token", GitLabTokenDetector),
    *_plugin("slack_token", SlackDetector),
    *_plugin("stripe_key", StripeDetector),
    *_plugin("twilio_key", TwilioKeyDetector),
    *_plugin("sendgrid_key", SendGridDetector),
    *_plugin("mailchimp_key", MailchimpDetector),
    *_plugin("npm_token", NpmDetector, group=True),
    *_plugin("pypi_token", PypiTokenDetector),
    *_plugin("square_secret", SquareOAuthDetector),
    *_plugin("discord_token", DiscordBotTokenDetector),
    *_plugin("telegram_token", TelegramBotTokenDetector),
    *_plugin("azure_storage_key", AzureStorageKeyDetector),
    *_plugin("basic_auth", BasicAuthDetector, group=True),
    # Broader than detect-secrets' OpenAI pattern (which needs the ``T3BlbkFJ`` marker of
    # legacy keys): every ``sk-`` key of OpenAI and compatible vendors (``sk-live-...``).
    _ours("openai_key", r"\bsk-(proj-|svcacct-)?[A-Za-z0-9_-]{20,}"),
    _ours("aws_key", r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    _ours("github_token", r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})"),
    _ours("slack_token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]+"),
    _ours("bearer_token", r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9\-._~+/]{16,}=*"),
    _ours(
        "secret",
        # ``password=``, ``db_password:``, ``client_secret =``, ``"api_key": "..."``
        r"(?i)(?P<keep>\b[a-z0-9_-]*?(password|passwd|secret|api[_-]?key|access[_-]?token|token)"
        r"[\"']?\s*[=:]\s*[\"']?)(?!\[REDACTED:)[^\s\"',;]{6,}",
    ),
    # PII: redacted unless a caller keeps it (``pii=False``).
    Detector("email", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"), pii=True),
    Detector("card", re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"), pii=True, check=_is_card),
    Detector("ssn", re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])"), pii=True),
    Detector(
        "phone",
        re.compile(r"(?<![\w-])(\+\d{1,3}[\s.-]?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}(?![\w-])"),
        pii=True,
    ),
)
"""Every detector, in the order they are applied."""

SECRET_KINDS = frozenset(d.kind for d in DETECTORS if not d.pii)
PII_KINDS = frozenset(d.kind for d in DETECTORS if d.pii)
_SECRETS = tuple(d for d in DETECTORS if not d.pii)


def _scoped(p: re.Pattern[str]) -> str:
    """``p`` as a self-contained alternative: local flags, no named groups."""
    src = p.pattern.replace("(?P<keep>", "(?:")
    flags = "i" if p.flags & re.IGNORECASE else ""
    if src.startswith("(?i)"):
        src, flags = src[4:], "i"
    return f"(?{flags}:{src})" if flags else f"(?:{src})"


def _any(detectors: tuple[Detector, ...]) -> re.Pattern[str]:
    return re.compile("|".join(_scoped(d.pattern) for d in detectors))


# One pass over the text finds out whether any detector can match: most strings (ids,
# statuses, amounts) have nothing to redact, and then cost one search instead of thirty.
_ANY_ALL, _ANY_SECRET = _any(DETECTORS), _any(_SECRETS)


def redact(text: str, *, pii: bool = True) -> str:
    """Replace secrets (and, unless ``pii=False``, PII) with ``[REDACTED:<kind>]``."""
    if not text or not (_ANY_ALL if pii else _ANY_SECRET).search(text):
        return text
    for det in DETECTORS if pii else _SECRETS:
        text = det.pattern.sub(det.replace, text)
    return text


def redact_data(obj: Any, *, pii: bool = True) -> Any:
    """``redact`` applied to every string (values and keys) inside dicts, lists and tuples."""
    if isinstance(obj, str):
        return redact(obj, pii=pii)
    if isinstance(obj, dict):
        return {
            redact_data(k, pii=pii) if isinstance(k, str) else k: redact_data(v, pii=pii)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact_data(v, pii=pii) for v in obj)
    return obj


def find(text: str, *, pii: bool = True) -> list[str]:
    """The kinds of secret (and PII) found in ``text``, in detector order (for flags and tests)."""
    found: list[str] = []
    if not text or not (_ANY_ALL if pii else _ANY_SECRET).search(text):
        return found
    for det in DETECTORS if pii else _SECRETS:
        if det.kind not in found and any(det.replace(m) != m.group(0) for m in det.pattern.finditer(text)):
            found.append(det.kind)
    return found
