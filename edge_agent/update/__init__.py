"""Updates on the terminal: TUF-verified downloads, A/B install, launcher and health gate."""
