"""Data-flow labels: where each value of a run came from, and which customer it is about.

The design anchor is CaMeL ("Defeating Prompt Injections by Design", 2025): control flow
comes from the trusted request, and every value carries a capability label the gate can
check. Here a ``Label`` says which sources a value was built from (``request``; ``plan1``
= a literal written by the first, trusted plan; ``plan2``... = a literal written by a plan
made after tool output was seen; ``s3:lookup_order`` = step s3's result) and which customers
(e-mail addresses) the value carries data about.

Labels are computed, never declared by the model: a ``${sN.field}`` reference inherits step
N's label; a literal the planner wrote is labelled with the plan that wrote it AND with every
earlier result whose distinctive values it contains (a model that copies a customer's e-mail
into a body instead of referencing it is caught the same way). A value is ``named`` by the
request when its text appears in the request as a whole token.

Pure and deterministic (stdlib + ``keel.models``): the workflow computes labels in its
sandbox and the gate reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from email_validator import EmailNotValidError, validate_email
from pydantic import Field

from keel.models import Frozen

__all__ = [
    "SUBJECT_FIELDS",
    "ExecutedCall",
    "Flow",
    "Label",
    "StepProvenance",
    "label_args",
    "label_result",
    "named_in",
    "parse_address",
    "step_provenance",
]

SUBJECT_FIELDS = ("customer_email", "to")
"""Result fields that name the customer a result is about (``lookup_order``'s customer,
``send_email``'s recipient)."""

_REF = re.compile(r"\$\{(s\d+(?:\.\d+)?f?)\.([A-Za-z_][A-Za-z0-9_]*)\}")
_MIN_TAINT_CHARS = 4  # shorter values ("1", "ok", "USD") are too common to track by text


class Label(Frozen):
    """Where one value came from; ``customers`` are lower-cased e-mail addresses."""

    sources: tuple[str, ...] = ()
    customers: tuple[str, ...] = ()

    def join(self, other: Label) -> Label:
        """The label of a value built from both (sources and customers are unions)."""
        return Label(
            sources=tuple(sorted({*self.sources, *other.sources})),
            customers=tuple(sorted({*self.customers, *other.customers})),
        )


class StepProvenance(Frozen):
    """Who decided a step: the trusted first plan, or a plan made after untrusted data.

    ``trusted`` is true for steps of the first plan (request + trusted configuration only),
    for read-only steps, and for a later step that repeats a trusted step exactly.
    """

    plan: int = 1
    """The plan (iteration) that wrote the step."""
    trusted: bool = True
    why: str = "first plan: request and trusted configuration only"


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int | float):
        yield str(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _texts(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _texts(v)


def named_in(request: str, value: Any) -> bool:
    """True when every text of ``value`` appears in ``request`` as a whole token (case-folded)."""
    texts = [t.strip() for t in _texts(value) if t.strip()]
    if not texts:
        return False
    folded = request.casefold()
    for t in texts:
        pat = r"(?<![\w@.-])" + re.escape(t.casefold()) + r"(?![\w@-])"
        if not re.search(pat, folded):
            return False
    return True


def _subjects(data: Mapping[str, Any]) -> set[str]:
    out: set[str] = set()
    for f in SUBJECT_FIELDS:
        v = data.get(f)
        if isinstance(v, str) and "@" in v:
            out.add(v.strip().casefold())
    return out


def label_result(step_id: str, tool: str, data: Mapping[str, Any], arg_labels: Mapping[str, Label]) -> Label:
    """The label of step ``step_id``'s result: the step itself, the customers it names, and
    whatever its arguments carried (a lookup keyed by a request-named order stays named)."""
    out = Label(sources=(f"{step_id}:{tool}",), customers=tuple(sorted(_subjects(data))))
    for lab in arg_labels.values():
        out = out.join(Label(customers=lab.customers))
    return out


def _taint(text: str, results: Mapping[str, Mapping[str, Any]], labels: Mapping[str, Label]) -> Label:
    """Labels of every earlier result whose distinctive values appear inside ``text``."""
    out = Label()
    folded = text.casefold()
    for step, data in results.items():
        lab = labels.get(step)
        if lab is None:
            continue
        for v in _texts(data):
            v = v.strip().casefold()
            if len(v) >= _MIN_TAINT_CHARS and v in folded:
                out = out.join(lab)
                break
    return out


def label_args(
    raw_args: Mapping[str, Any],
    resolved_args: Mapping[str, Any],
    *,
    plan: int,
    request: str,
    results: Mapping[str, Mapping[str, Any]],
    result_labels: Mapping[str, Label],
) -> dict[str, Label]:
    """Label each argument of a step as written by plan ``plan`` (``raw_args``, before
    ``${}`` resolution; ``resolved_args`` after, to see whether the request names the value).

    A reference keeps its step's label; literal text gets ``plan<N>`` plus the labels of any
    earlier results it copies; a value the request names gets ``request`` too.
    """
    out: dict[str, Label] = {}
    for name, raw in raw_args.items():
        lab = Label()
        for text in _texts(raw):
            for m in _REF.finditer(text):
                ref = result_labels.get(m.group(1))
                if ref is not None:
                    lab = lab.join(ref)
            literal = _REF.sub(" ", text)
            if literal.strip():
                lab = lab.join(Label(sources=(f"plan{plan}",)))
                lab = lab.join(_taint(literal, results, result_labels))
        if named_in(request, resolved_args.get(name, raw)):
            lab = lab.join(Label(sources=("request",)))
        out[name] = lab
    return out


_ROUTING = re.compile(r"[%!]")


def parse_address(value: Any) -> tuple[str, str] | str:
    """``(normalised address, domain)`` of ONE e-mail address, or why it is not one.

    Parsed by ``email-validator`` (RFC 5322 syntax, no display names, no quoted local parts);
    ``%`` and ``!`` in the local part are refused because some relays still route on them
    (``attacker%evil.test@example.com`` would be delivered to evil.test).
    """
    if not isinstance(value, str):
        return f"{value!r} is not a single e-mail address"
    try:
        parsed = validate_email(value.strip(), check_deliverability=False)
    except EmailNotValidError as e:
        return f"{value!r} is not a single e-mail address ({e})"
    if _ROUTING.search(parsed.local_part):
        return f"{value!r} has a routing character (% or !) in its local part"
    return parsed.normalized.casefold(), parsed.domain.casefold()


class ExecutedCall(Frozen):
    """A call this run already made (succeeded), for cumulative limits."""

    tool: str
    args: dict[str, Any] = Field(default_factory=dict)


class Flow(Frozen):
    """Where a call came from; built by the workflow, read by the gate (see module doc)."""

    request: str = ""
    labels: dict[str, Label] = Field(default_factory=dict)
    """One label per argument (``keel.labels.label_args``)."""
    provenance: StepProvenance = StepProvenance()
    prior: dict[str, float] = Field(default_factory=dict)
    """Sums from the database at run start: ``"<tool>|order|<key>"``, ``"<tool>|tenant_day"``."""
    executed: tuple[ExecutedCall, ...] = ()


def step_provenance(
    plan: int, tool: str, side_effects: bool, signature: str, trusted_calls: Iterable[tuple[str, str]]
) -> StepProvenance:
    """Plan-then-execute: the first plan is trusted; a later plan's read-only steps are too;
    a later side effect is trusted only when it repeats, exactly, a step of the first plan."""
    if plan <= 1:
        return StepProvenance(plan=plan)
    if not side_effects:
        return StepProvenance(plan=plan, why=f"read-only step of plan {plan}")
    if (tool, signature) in set(trusted_calls):
        return StepProvenance(plan=plan, why=f"plan {plan} repeats a step of the first plan")
    return StepProvenance(
        plan=plan,
        trusted=False,
        why=f"side effect added by plan {plan}, made after tool output was seen",
    )
