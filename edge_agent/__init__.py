"""Edge agent: runs unattended on every self-service terminal."""

__version__ = "0.1.0"
