"""Keel: durable, budgeted, permissioned AI agents on Temporal (shared payloads and settings)."""

__version__ = "0.1.0"
