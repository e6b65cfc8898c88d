"""Keel's custom search attributes, declared once.

The typed keys are what the workflow sets (tenant and user at start, outcome, spend and flags
as the run ends) and what clients filter by (``keel list``, the Web UI);
:data:`SEARCH_ATTRIBUTES` is the name → type table the dev server registers and ``keel
doctor`` checks (the compose stack's ``deploy/temporal/namespace.sh`` registers the same
names, and ``tests/test_compose.py`` compares them). Pure: workflow code imports it.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

__all__ = ["AGENT", "FLAGS", "OUTCOME", "SEARCH_ATTRIBUTES", "SPEND", "TENANT", "USER"]

TENANT = SearchAttributeKey.for_keyword("KeelTenant")
USER = SearchAttributeKey.for_keyword("KeelUser")
AGENT = SearchAttributeKey.for_keyword("KeelAgent")
OUTCOME = SearchAttributeKey.for_keyword("KeelOutcome")
SPEND = SearchAttributeKey.for_int("KeelSpendMicros")
FLAGS = SearchAttributeKey.for_keyword_list("KeelFlags")
"""Every flag of the run: escape hatches, degradations and anomaly flags (``keel.anomaly``)."""

SEARCH_ATTRIBUTES: dict[str, str] = {
    TENANT.name: "Keyword",
    USER.name: "Keyword",
    AGENT.name: "Keyword",
    OUTCOME.name: "Keyword",
    SPEND.name: "Int",
    FLAGS.name: "KeywordList",
}
"""Name → type (as ``temporal operator search-attribute create --type`` spells it)."""
