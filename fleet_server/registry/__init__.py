"""Registry of offices and terminals."""
