"""Compact-architecture search methods: one file per method, registered by name (see base.py)."""

from edgecompact.methods.base import (
    Proposal,
    SearchContext,
    SearchResult,
    get_method,
    list_methods,
    register_method,
    run_method,
)

__all__ = ["Proposal", "SearchContext", "SearchResult", "get_method", "list_methods", "register_method",
           "run_method"]
