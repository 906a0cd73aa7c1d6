"""Who is calling: named API keys (keys.py), the caller they stand for (caller.py), the CLI that
writes the keys file (cli.py)."""
