"""Interoperability with published environment datasets (AgentWorldModel-1K)."""
