"""The fleet console: server-rendered pages (Jinja2) behind a password login with sessions and CSRF."""
