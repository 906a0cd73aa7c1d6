"""Defences against hostile and careless clients (docs/security.md): request bodies, addresses,
access. Plain Python, no project imports above ``config``: every layer may use it."""
