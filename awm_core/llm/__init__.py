"""LLM access for every role: chat and structured output with accounting, cache and budget.

See docs/architecture.md ("LLM layer") for the contract and docs/llm.md for usage.
The fixture server, the embedder and the shared (PostgreSQL) budget are imported from their
modules (``awm_core.llm.fixture_server``, ``awm_core.llm.embed``, ``awm_core.llm.shared_budget``)
so this package stays light.
"""
from awm_core.llm.client import LLMClient, LLMResult, Structured, StructuredOutputError
from awm_core.llm.records import Budget, CallRecord, Ledger, ledger_path, read_ledger

__all__ = [
    "Budget", "CallRecord", "LLMClient", "LLMResult", "Ledger", "Structured", "StructuredOutputError",
    "ledger_path", "read_ledger",
]
