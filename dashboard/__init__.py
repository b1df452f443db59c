"""Dash dashboard over traces and probe reports: `python -m dashboard [TRACE_OR_DIR ...]` (docs/dashboard.md)."""
