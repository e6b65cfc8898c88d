"""Deterministic code only: the AgentWorkflow and the pure decision/policy logic it calls."""
