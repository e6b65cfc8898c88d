"""Guardrails: fast local heuristics for hostile input; redaction re-exported from the core.

Everything here is a pure function (no I/O, no model call) so it is cheap enough to run on
every request and every tool output, and deterministic enough to test against a corpus
(``tests/adversarial/corpus.yaml``). Heuristics are a first line only: the real protection
is structural — the gate re-checks every tool call, and tool output reaches the planner
inside the ``EXECUTED STEPS`` block (redacted, scanned, flagged), as data, never as
instructions.

Detection matches several VIEWS of the text (issue 17): the text normalised (NFKC,
zero-width and bidi controls removed, homoglyphs folded to Latin, accents stripped,
whitespace collapsed, lower-cased); the text hidden in Unicode tag characters; rot13 of the
whole text; and every run that decodes as base64, base32, hex or ascii85. A hit found only in
a decoded view is reported as ``encoded``. Patterns cover English plus French, Spanish,
German, Italian, Portuguese, Dutch, Russian, Chinese and Japanese phrasings of the common
families, and markdown/HTML exfiltration, SQL and shell payloads. They are chosen so
ordinary support requests ("refund it if shipped", "email the customer") do not match; the
corpus is ``tests/adversarial/families.py``, its measured rates are in ``bench/RESULTS.md``.
``redact``/``redact_data`` live in ``keel.redact`` (one detector list for every sink,
workflows included); they are re-exported here for the activities.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata

from keel.models import Frozen
from keel.policy import GUARDRAIL_CATEGORIES
from keel.redact import redact, redact_data

__all__ = [
    "GuardrailVerdict",
    "detect_injection",
    "redact",
    "redact_data",
    "scan_input",
]

_DEFAULT_BLOCK = tuple(c for c in GUARDRAIL_CATEGORIES if c != "off_topic")


class GuardrailVerdict(Frozen):
    """``ok`` is False when a blocked category matched; ``score`` is the summed signal weight."""

    ok: bool
    category: str = ""
    reason: str = ""
    score: float = 0.0


# (signal name, category, weight, pattern over normalised text). Weight >= 1 blocks alone.
_SIGNALS: tuple[tuple[str, str, float, re.Pattern[str]], ...] = tuple(
    (n, c, w, re.compile(p))
    for n, c, w, p in (
        (
            "ignore-instructions",
            "injection",
            1.0,
            r"\b(ignore|disregard|forget|override|bypass)\b.{0,30}\b(previous|prior|above|earlier|"
            r"all|any|your|the|these|those)\b.{0,20}\b(instructions?|rules|prompts?|directions|guidelines"
            r"|polic(y|ies)|constraints|guardrails)",
        ),
        (
            "new-instructions",
            "injection",
            1.0,
            r"(^|\n|\.\s)\s*(new|updated|real|actual) (instructions?|task|orders)\s*:",
        ),
        (
            "fake-role-marker",
            "injection",
            1.0,
            r"(^|\n)\s*(system|assistant|developer)\s*:|\[/?(system|inst)\]|<\|?(im_start|system)\|?>",
        ),
        ("you-are-now", "jailbreak", 1.0, r"\byou are now\b|\bfrom now on,? you (are|will|must)\b"),
        (
            "jailbreak-persona",
            "jailbreak",
            1.0,
            r"\b(dan|do anything now|developer mode|jailbreak|jailbroken|god mode"
            r"|unfiltered mode)\b",
        ),
        (
            "roleplay-escape",
            "jailbreak",
            1.0,
            r"\b(pretend|act as if|imagine|role-?play)\b.{0,40}"
            r"\b(no|without|free of|unrestricted|not bound)\b.{0,20}"
            r"\b(rules|restrictions|limits|filters|polic(y|ies)|guidelines)",
        ),
        (
            "prompt-leak",
            "prompt_leak",
            1.0,
            r"\b(reveal|print|show|repeat|output|tell me|what (is|are)|leak|dump)\b.{0,30}"
            r"\b(your |the )?(system prompt|hidden (prompt|instructions)|initial instructions"
            r"|developer message)",
        ),
        (
            "tool-call-syntax",
            "smuggling",
            1.0,
            r"\b[a-z]+_[a-z_]+\s*\(\s*[a-z_\"'{)]"
            r"|\"(tool|function|name)\"\s*:\s*\"[a-z_]+\"\s*,\s*\"(args|arguments)\""
            r"|<\/?(tool_call|function_call|tool_use)\b|\bfunction_call\b",
        ),
        (
            "ignore-instructions-i18n",
            "injection",
            1.0,
            r"\b(ignore[zr]?|oublie[zr]?|ignora|ignoren|ignorar|olvida|ignoriere|ignorieren|vergiss"
            r"|dimentica|esqueca|negeer|vergeet)\b.{0,40}\b(instructions?|instrucciones|anweisungen"
            r"|istruzioni|instrucoes|instructies|consignes|regles|reglas|regeln|regole|regras"
            r"|vorherigen|precedentes?|anteriores|precedenti|vorige|previas)"
            r"|игнорир\w*.{0,30}инструкц|забудь.{0,30}(инструкц|правил)"
            r"|忽略.{0,12}(指令|指示|说明|规则)|无视.{0,12}(指令|规则)"
            r"|(指示|命令|ルール).{0,8}(を)?(無視|むし)",
        ),
        (
            "jailbreak-i18n",
            "jailbreak",
            1.0,
            r"\b(modo desarrollador|mode developpeur|entwicklermodus|modalita sviluppatore"
            r"|sans (aucune )?restrictions?|sin (ninguna )?restricci|ohne (jede )?einschrankung"
            r"|senza (alcuna )?restrizion|sem (nenhuma )?restric)"
            r"|без (каких-либо )?ограничен|режим разработчика"
            r"|没有(任何)?限制|开发者模式|制限なし|開発者モード",
        ),
        (
            "prompt-leak-i18n",
            "prompt_leak",
            1.0,
            r"\b(revele[zr]?|montre[zr]?|affiche[zr]?|muestra|revela|zeige|verrate|mostra|rivela)\b.{0,30}"
            r"\b(prompt|instructions? (systeme|cachees)|instrucciones (del sistema|ocultas)"
            r"|systemprompt|system-?anweisungen|istruzioni (di sistema|nascoste))"
            r"|(системн\w* (промпт|инструкц))|(系统提示|系统指令)|システムプロンプト",
        ),
        (
            "impersonation",
            "injection",
            1.0,
            r"\b(i am|this is) (the|your) (administrator|admin|developer|system|ceo)\b"
            r"|\b(skip|bypass|disable|turn off) (the )?(approval|verification|checks?|guardrails?|safety)\b"
            r"|\b(you have been|you are) (granted|given|authori[sz]ed)\b",
        ),
        (
            "exfil-markup",
            "injection",
            1.0,
            r"!\[[^\]]*\]\(\s*https?://[^)\s]*[?&=]|<\s*(img|iframe|script|object|embed|link|meta)\b"
            r"|\bjavascript:|\bon(error|load|click)\s*=|\bsrc\s*=\s*[\"']?https?://",
        ),
        (
            "sql-payload",
            "smuggling",
            1.0,
            r"('|\")\s*(or|and)\s+('?\d+'?\s*=\s*'?\d+|'[^']*'\s*=\s*')|;\s*(drop|delete|truncate|alter|insert"
            r"|update)\s+(table\s+)?\w+|\bunion\s+(all\s+)?select\b|--\s*$|/\*.*\*/|\bxp_cmdshell\b"
            r"|\bpg_sleep\s*\(|\bsleep\s*\(\s*\d",
        ),
        (
            "shell-payload",
            "smuggling",
            1.0,
            r"(;|&&|\|\|?)\s*(rm|curl|wget|nc|bash|sh|chmod|cat|python3?|perl)\b|\$\([^)]*\)|`[^`]+`"
            r"|\b(curl|wget)\b[^|]*\|\s*(ba)?sh\b|/etc/(passwd|shadow)|\brm\s+-rf\b",
        ),
        (
            "encoded-hint",
            "encoded",
            0.6,
            r"\b(base64|rot13|hex)[- ]?(encoded|decode|decoded)?\b.{0,40}"
            r"\b(decode|execute|follow|run|instructions?)\b",
        ),
        (
            "off-topic",
            "off_topic",
            1.0,
            r"\b(write (me )?(a |an )?(poem|song|essay|story)|stock tips|bitcoin|lottery"
            r"|homework)\b",
        ),
    )
)
_B64_RUN = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_B32_RUN = re.compile(r"\b[A-Z2-7]{16,}=*")
_HEX_RUN = re.compile(r"\b(?:[0-9a-fA-F]{2}[\s:]?){8,}")
_A85_RUN = re.compile(r"<~(.+?)~>|[!-u]{20,}", re.S)
_ZERO_WIDTH = re.compile(
    "[\u200b-\u200f\u2060-\u2064\ufeff\u00ad\u202a-\u202e\u2066-\u2069\U000e0000-\U000e007f]"
)
_DIACRITICS = re.compile("[\u0300-\u036f]")
_TAGS = re.compile("[\U000e0020-\U000e007e]+")
# Look-alikes an NFKC pass leaves alone (Cyrillic, Greek) folded to the Latin letter they imitate.
_HOMOGLYPHS = str.maketrans(
    "аеорсухіјѕԁɡһӏոԛѵԝАВЕКМНОРСТХІЈЅԌαβεικνορτυχΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxijsdghlnqvwABEKMHOPCTXIJSGabeiknoptuxABEZHIKMNOPTYX",
)


def _normalise(text: str) -> str:
    t = _ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))
    # Accents off (précédentes -> precedentes), but only Latin diacritics: kana voicing
    # marks are letters, not decoration.
    t = unicodedata.normalize("NFC", _DIACRITICS.sub("", unicodedata.normalize("NFD", t)))
    t = re.sub(r"[ \t\f\v]+", " ", t)
    return t.lower()


def _printable(raw: bytes) -> str | None:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return decoded if decoded.strip() and decoded.replace("\n", " ").isprintable() else None


def _decoded_runs(text: str) -> list[str]:
    """Hidden or encoded text a model could still read: base64/32, hex, ascii85, Unicode tags."""
    out: list[str] = []
    for m in _TAGS.finditer(text):
        out.append("".join(chr(ord(c) - 0xE0000) for c in m.group(0)))
    for m in _B64_RUN.finditer(text):
        run = m.group(0)
        for pad in (run, run.rstrip("=")):
            try:
                got = _printable(base64.b64decode(pad + "=" * (-len(pad) % 4), validate=True))
            except (binascii.Error, ValueError):
                continue
            if got:
                out.append(got)
                break
    for m in _B32_RUN.finditer(text):
        run = m.group(0).rstrip("=")
        try:
            got = _printable(base64.b32decode(run + "=" * (-len(run) % 8)))
        except (binascii.Error, ValueError):
            continue
        if got:
            out.append(got)
    for m in _HEX_RUN.finditer(text):
        digits = re.sub(r"[\s:]", "", m.group(0))
        if len(digits) % 2 == 0:
            got = _printable(bytes.fromhex(digits))
            if got:
                out.append(got)
    for m in _A85_RUN.finditer(text):
        run = m.group(1) if m.group(1) is not None else m.group(0)
        try:
            got = _printable(base64.a85decode(run.strip(), adobe=False))
        except (ValueError, binascii.Error):
            continue
        if got and sum(ch.isalpha() or ch == " " for ch in got) > 0.8 * len(got):
            out.append(got)
    return out


def _match(view: str) -> list[tuple[str, str, float]]:
    """Signals in one view, and in its homoglyph-folded twin (a Cyrillic o in a Latin word
    matches as Latin; real Russian text is matched unfolded)."""
    folded = view.translate(_HOMOGLYPHS)
    return [(n, c, w) for n, c, w, p in _SIGNALS if p.search(view) or (folded != view and p.search(folded))]


def _signals(text: str) -> list[tuple[str, str, float]]:
    hits = _match(_normalise(text))
    seen = {n for n, _, _ in hits}
    hidden = [*_decoded_runs(text), codecs.decode(text, "rot13")]
    for decoded in hidden:
        inner = [n for n, c, _ in _match(_normalise(decoded)) if c not in ("off_topic", "encoded")]
        inner = [n for n in inner if n not in seen]
        if inner:
            hits.append((f"decoded:{inner[0]}", "encoded", 1.0))
            seen.update(inner)
    return hits


def detect_injection(text: str) -> list[str]:
    """Signals of injected instructions in ``text`` (e.g. tool output), as ``category:signal``."""
    return [f"{c}:{n}" for n, c, _ in _signals(text) if c != "off_topic"]


def scan_input(
    text: str, *, block: tuple[str, ...] | None = None, off_topic: bool = False
) -> GuardrailVerdict:
    """Check a user request before anything else sees it.

    Args:
        text: the request message.
        block: categories that refuse the request (default: all but ``off_topic``); the
            policy's ``guardrails.input.block`` is passed here.
        off_topic: also evaluate the (crude) off-topic heuristic.
    """
    blocked = set(_DEFAULT_BLOCK if block is None else block)
    if off_topic:
        blocked.add("off_topic")
    hits = [h for h in _signals(text) if h[1] != "off_topic" or off_topic]
    score = sum(w for _, _, w in hits)
    by_cat: dict[str, list[str]] = {}
    for n, c, _ in hits:
        by_cat.setdefault(c, []).append(n)
    for cat, names in by_cat.items():
        weight = sum(w for n, c, w in hits if c == cat)
        if cat in blocked and (weight >= 1.0 or score >= 1.0):
            return GuardrailVerdict(
                ok=False,
                category=cat,
                score=round(score, 2),
                reason=f"request looks like {cat.replace('_', ' ')} ({', '.join(names)})",
            )
    flagged = ", ".join(f"{c}:{n}" for n, c, _ in hits)
    return GuardrailVerdict(ok=True, score=round(score, 2), reason=f"flagged: {flagged}" if hits else "")
