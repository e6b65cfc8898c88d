"""Turn infrastructure exceptions into one readable line (no tracebacks for users)."""

from __future__ import annotations

from keel.settings import load_settings

__all__ = ["describe"]


def describe(e: BaseException) -> str:
    from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
    from temporalio.service import RPCError, RPCStatusCode

    from keel.codec import CodecConfigError, UnknownKeyError

    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, CodecConfigError):
        return text
    for link in _chain(e):  # a payload this process cannot decrypt: name the key
        if isinstance(link, UnknownKeyError):
            return link.message
    if isinstance(e, RuntimeError) and "connect" in text.lower():
        addr = _safe(lambda: load_settings().temporal_address)
        return f"cannot reach Temporal at {addr} — start it with 'make up' (or set TEMPORAL_ADDRESS)"
    if isinstance(e, RPCError):
        if e.status == RPCStatusCode.NOT_FOUND:
            return f"not found: {e.message}"
        if e.status == RPCStatusCode.ALREADY_EXISTS:
            return "a run with this id already exists (use a new --request-id)"
        if e.status == RPCStatusCode.UNAVAILABLE:
            return f"Temporal is unavailable at {_safe(lambda: load_settings().temporal_address)}"
        return f"temporal: {e.message}"
    if isinstance(e, WorkflowUpdateFailedError):
        refusal = e.cause
        return f"refused: {getattr(refusal, 'message', None) or refusal}"
    if isinstance(e, WorkflowFailureError):
        cause: BaseException | None = e.cause
        while cause is not None and cause.__cause__ is not None:
            cause = cause.__cause__
        return f"run failed: {getattr(cause, 'message', None) or cause}"
    try:
        import psycopg

        if isinstance(e, psycopg.OperationalError):
            return f"cannot reach PostgreSQL ({text}) — start it with 'make up' (or set KEEL_DATABASE_URL)"
    except ImportError:  # pragma: no cover
        pass
    return f"{type(e).__name__}: {text}"


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [e], {id(e)}
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and id(nxt) not in seen:
        out.append(nxt)
        seen.add(id(nxt))
    return out


def _safe(f: object) -> str:
    try:
        return str(f())  # type: ignore[operator]
    except Exception:
        return "?"
