"""Ingest: terminal events in, validated, stored exactly once, receipted."""
