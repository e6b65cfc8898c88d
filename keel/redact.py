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


_DIGITS = re.compile(r"\d+")  # the very ``\d`` of the patterns (Unicode decimal digits)


class Gate:
    """A necessary condition of a pattern's match, checked before the pattern is searched.

    Searching a text with Python's ``re`` costs about 25 ns a character per pattern, even
    when the pattern cannot match (a leading word boundary or look-behind defeats its
    literal scan), so thirty-nine patterns over a 2 kB memory block cost 1.4 ms. Almost every
    match must contain some literal (``sk-ant-``, ``AKIA``, ``@``, ``://``) or some digits,
    and ``in`` finds a literal in microseconds. A gate holds what every match of its pattern
    contains: ``any_of`` (one of these substrings; ``ci``: compared as the pattern compares
    them, case-insensitively by the same engine), ``all_of`` (each of these), ``min_digits``
    and ``min_run`` (that many digits in all, and in a row). When a gate fails the pattern
    cannot match, so skipping it changes nothing (``tests/test_redact.py`` compares against
    every pattern searched).
    """

    __slots__ = ("_all", "_any", "_any_ci", "_digits", "_run")

    def __init__(
        self,
        any_of: tuple[str, ...] = (),
        *,
        ci: bool = False,
        all_of: tuple[str, ...] = (),
        min_digits: int = 0,
        min_run: int = 0,
    ) -> None:
        self._any = () if ci else any_of
        self._any_ci = tuple(re.compile(re.escape(w), re.IGNORECASE) for w in any_of) if ci else ()
        self._all, self._digits, self._run = all_of, min_digits, min_run

    def admits(self, text: str, digits: _Digits) -> bool:
        if self._any and not any(w in text for w in self._any):
            return False
        if self._any_ci and not any(r.search(text) for r in self._any_ci):
            return False
        if self._all and not all(w in text for w in self._all):
            return False
        if self._digits or self._run:
            total, run = digits.counts()
            return total >= self._digits and run >= self._run
        return True


_GITHUB = ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")

_PLUGIN_GATES: dict[tuple[str, int], Gate] = {
    (p, re.compile(p, f).flags): g
    for p, f, g in (
        ("sk-[A-Za-z0-9-_]*[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}", 0, Gate(("T3BlbkFJ",))),
        ("(?:A3T[A-Z0-9]|ABIA|ACCA|AKIA|ASIA)[0-9A-Z]{16}", 0, Gate(("A3T", "ABIA", "ACCA", "AKIA", "ASIA"))),
        (
            r"aws.{0,20}?(?:key|pwd|pw|password|pass|token).{0,20}?[\'\"]([0-9a-zA-Z/+]{40})[\'\"]",
            re.IGNORECASE,
            Gate(("aws",), ci=True),
        ),
        ("(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9_]{36}", 0, Gate(_GITHUB)),
        (
            "(glpat|gldt|glft|glsoat|glrt)-[A-Za-z0-9_\\-]{20,50}(?!\\w)",
            0,
            Gate(("glpat-", "gldt-", "glft-", "glsoat-", "glrt-")),
        ),
        ("GR1348941[A-Za-z0-9_\\-]{20,50}(?!\\w)", 0, Gate(("GR1348941",))),
        ("glcbt-([0-9a-fA-F]{2}_)?[A-Za-z0-9_\\-]{20,50}(?!\\w)", 0, Gate(("glcbt-",))),
        ("glimt-[A-Za-z0-9_\\-]{25}(?!\\w)", 0, Gate(("glimt-",))),
        ("glptt-[A-Za-z0-9_\\-]{40}(?!\\w)", 0, Gate(("glptt-",))),
        ("glagent-[A-Za-z0-9_\\-]{50,1024}(?!\\w)", 0, Gate(("glagent-",))),
        ("gloas-[A-Za-z0-9_\\-]{64}(?!\\w)", 0, Gate(("gloas-",))),
        ("xox(?:a|b|p|o|s|r)-(?:\\d+-)+[a-z0-9]+", re.IGNORECASE, Gate(("xox",), ci=True)),
        (
            "https://hooks\\.slack\\.com/services/T[a-zA-Z0-9_]+/B[a-zA-Z0-9_]+/[a-zA-Z0-9_]+",
            re.IGNORECASE | re.VERBOSE,
            Gate(("https://hooks.slack.com/services/",), ci=True),
        ),
        ("(?:r|s)k_live_[0-9a-zA-Z]{24}", 0, Gate(("k_live_",))),
        ("AC[a-z0-9]{32}", 0, Gate(("AC",))),
        ("SK[a-z0-9]{32}", 0, Gate(("SK",))),
        ("SG\\.[a-zA-Z0-9_-]{22}\\.[a-zA-Z0-9_-]{43}", 0, Gate(("SG.",))),
        ("[0-9a-z]{32}-us[0-9]{1,2}", 0, Gate(("-us",))),
        ("\\/\\/.+\\/:_authToken=\\s*((npm_.+)|([A-Fa-f0-9-]{36})).*", 0, Gate(("/:_authToken=",))),
        ("pypi-AgEIcHlwaS5vcmc[A-Za-z0-9-_]{70,}", 0, Gate(("pypi-AgEIcHlwaS5vcmc",))),
        ("pypi-AgENdGVzdC5weXBpLm9yZw[A-Za-z0-9-_]{70,}", 0, Gate(("pypi-AgENdGVzdC5weXBpLm9yZw",))),
        ("sq0csp-[0-9A-Za-z\\\\\\-_]{43}", 0, Gate(("sq0csp-",))),
        (
            "[MNO][a-zA-Z\\d_-]{23,25}\\.[a-zA-Z\\d_-]{6}\\.[a-zA-Z\\d_-]{27}",
            0,
            Gate(("M", "N", "O"), all_of=(".",)),
        ),
        ("\\d{8,10}:[0-9A-Za-z_-]{35}", 0, Gate((":",), min_run=8)),
        ("AccountKey=[a-zA-Z0-9+\\/=]{88}", 0, Gate(("AccountKey=",))),
        (
            "://[^:/\\?\\#\\[\\]@!\\$\\&'\\(\\)\\*\\+,;=\\s]+:([^:/\\?\\#\\[\\]@!\\$\\&'\\(\\)\\*\\+,;=\\s]+)@",
            0,
            Gate(("://",), all_of=("@",)),
        ),
    )
}
"""Gates of the ``detect-secrets`` patterns, by pattern: one that changes upstream finds no
gate here and is searched every time (slower, never wrong); a test lists those."""


class Detector:
    """A named pattern; ``replace`` turns a match into its placeholder (keeping context)."""

    __slots__ = ("_check", "_group", "gate", "kind", "pattern", "pii")

    def __init__(
        self,
        kind: str,
        pattern: re.Pattern[str],
        *,
        pii: bool = False,
        check: Callable[[str], bool] | None = None,
        group: bool = False,
        gate: Gate | None = None,
    ) -> None:
        self.kind, self.pattern, self.pii, self._check, self._group = kind, pattern, pii, check, group
        self.gate = gate if gate is not None else _PLUGIN_GATES.get((pattern.pattern, pattern.flags))
        """What every match of ``pattern`` contains (``None``: no shortcut, always search)."""

    def may_match(self, text: str, digits: _Digits) -> bool:
        return self.gate is None or self.gate.admits(text, digits)

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


def _ours(kind: str, pattern: str, gate: Gate) -> Detector:
    return Detector(kind, re.compile(pattern), gate=gate)


def _plugin(kind: str, plugin: Any, *, group: bool = False) -> list[Detector]:
    """A detect-secrets plugin's patterns. ``group``: the pattern captures the secret itself
    (its last non-empty group) among context to keep (``://user:<password>@``); otherwise any
    groups are prefixes (``(ghp|gho)_...``) and the whole match goes."""
    return [Detector(kind, p, group=group) for p in plugin.denylist]


# Order matters: whole blocks (PEM) and structured tokens before generic shapes, so a JWT is
# one placeholder rather than three pieces.
DETECTORS: tuple[Detector, ...] = (
    _ours(
        "private_key",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(-----END [A-Z ]*PRIVATE KEY-----|$)",
        Gate(("-----BEGIN ",)),
    ),
    _ours("jwt", r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}", Gate(("eyJ",))),
    _ours("anthropic_key", r"\bsk-ant-[A-Za-z0-9_-]{16,}", Gate(("sk-ant-",))),
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
    _ours("openai_key", r"\bsk-(proj-|svcacct-)?[A-Za-z0-9_-]{20,}", Gate(("sk-",))),
    _ours("aws_key", r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", Gate(("AKIA", "ASIA"))),
    _ours(
        "github_token",
        r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})",
        Gate((*_GITHUB, "github_pat_")),
    ),
    _ours(
        "slack_token",
        r"\bxox[abposr]-[A-Za-z0-9-]{10,}|https://hooks\.slack\.com/services/[A-Za-z0-9/]+",
        Gate(("xox", "https://hooks.slack.com/services/")),
    ),
    _ours("bearer_token", r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9\-._~+/]{16,}=*", Gate(("bearer",), ci=True)),
    _ours(
        "secret",
        # ``password=``, ``db_password:``, ``client_secret =``, ``"api_key": "..."``
        r"(?i)(?P<keep>\b[a-z0-9_-]*?(password|passwd|secret|api[_-]?key|access[_-]?token|token)"
        r"[\"']?\s*[=:]\s*[\"']?)(?!\[REDACTED:)[^\s\"',;]{6,}",
        # every keyword contains one of these (``access_token``: ``token``)
        Gate(("passw", "secret", "api", "token"), ci=True),
    ),
    # PII: redacted unless a caller keeps it (``pii=False``).
    Detector(
        "email",
        re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
        pii=True,
        gate=Gate(("@",)),
    ),
    Detector(
        "card",
        re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])"),
        pii=True,
        check=_is_card,
        gate=Gate(min_digits=13),
    ),
    Detector(
        "ssn",
        re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])"),
        pii=True,
        gate=Gate(all_of=("-",), min_digits=9, min_run=4),
    ),
    Detector(
        "phone",
        re.compile(r"(?<![\w-])(\+\d{1,3}[\s.-]?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}(?![\w-])"),
        pii=True,
        gate=Gate(min_digits=10, min_run=4),
    ),
)
"""Every detector, in the order they are applied."""

SECRET_KINDS = frozenset(d.kind for d in DETECTORS if not d.pii)
PII_KINDS = frozenset(d.kind for d in DETECTORS if d.pii)
_SECRETS = tuple(d for d in DETECTORS if not d.pii)


class _Digits:
    """The text's digits (how many, and the longest run), counted once and only if a gate
    asks. Substitutions never add digits (a placeholder has none, a kept label comes from the
    text) nor lengthen a run of them (a placeholder starts and ends with a bracket), so the
    first count bounds every later one."""

    __slots__ = ("_counts", "_text")

    def __init__(self, text: str) -> None:
        self._text, self._counts = text, (-1, -1)

    def counts(self) -> tuple[int, int]:
        if self._counts[0] < 0:
            runs = [len(r) for r in _DIGITS.findall(self._text)]
            self._counts = (sum(runs), max(runs, default=0))
        return self._counts


def redact(text: str, *, pii: bool = True) -> str:
    """Replace secrets (and, unless ``pii=False``, PII) with ``[REDACTED:<kind>]``."""
    if not text:
        return text
    digits = _Digits(text)
    for det in DETECTORS if pii else _SECRETS:
        if det.may_match(text, digits):
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
    if not text:
        return found
    digits = _Digits(text)
    for det in DETECTORS if pii else _SECRETS:
        if det.kind in found or not det.may_match(text, digits):
            continue
        if any(det.replace(m) != m.group(0) for m in det.pattern.finditer(text)):
            found.append(det.kind)
    return found
