"""Fleet server: registry, ingest, health and usage for the kiosk fleet."""

__version__ = "0.1.0"
