"""``diffusionapi keys add|list|revoke``: writes the keys file (auth/keys.py). ``add`` prints the
new key once; the file keeps only its hash. Writes are atomic (temp file + rename), so a running
server never reads half a file; it notices the change on its next request."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from ..files import write_atomic
from .caller import Limits
from .keys import entry_caller, hash_key, new_key, parse_keys, read_file


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def dump_toml(keys: dict[str, dict]) -> str:
    """The keys table as TOML (the file's schema is flat: values, and one `limits` sub-table)."""
    out = ["# DiffusionAPI API keys: written by `diffusionapi keys`; hashes only (docs/tenants.md)\n"]
    for name, entry in keys.items():
        out.append(f"\n[keys.{json.dumps(name)}]\n")
        for k, v in entry.items():
            if k != "limits" and v is not None:
                out.append(f"{k} = {_toml_value(v)}\n")
        limits = entry.get("limits") or {}
        if limits:
            out.append(f"[keys.{json.dumps(name)}.limits]\n")
            out.extend(f"{k} = {_toml_value(v)}\n" for k, v in limits.items() if v is not None)
    return "".join(out)


def load(path: Path) -> dict[str, dict]:
    return dict(parse_keys(read_file(path))) if path.exists() else {}


def save(path: Path, keys: dict[str, dict]) -> None:
    for name, entry in keys.items():
        entry_caller(name, entry)  # never write a file the server would refuse
    text = json.dumps({"keys": keys}, indent=2) + "\n" if path.suffix.lower() == ".json" else dump_toml(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode(), fsync=True)
    os.chmod(path, 0o600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffusionapi keys", description="manage the API keys file")
    ap.add_argument("--file", default=os.environ.get("DIFFUSIONAPI_API_KEYS_FILE"),
                    help="the keys file (default: $DIFFUSIONAPI_API_KEYS_FILE)")
    sub = ap.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a key and print it (once)")
    add.add_argument("name")
    add.add_argument("--role", choices=("user", "admin"), default="user")
    add.add_argument("--share", type=float, default=1.0, help="weight in the round-robin between keys")
    add.add_argument("--max-priority", type=int, default=0, help="the highest request `priority` honoured")
    for limit in Limits.__dataclass_fields__:
        add.add_argument(f"--{limit.replace('_', '-')}", type=int, default=None, dest=limit)
    sub.add_parser("list", help="names, roles and limits (no keys: the file has none)")
    rev = sub.add_parser("revoke", help="remove a key: its next request is refused")
    rev.add_argument("name")
    args = ap.parse_args(argv)
    if not args.file:
        ap.error("no keys file: pass --file or set DIFFUSIONAPI_API_KEYS_FILE")
    path = Path(args.file)
    try:
        keys = load(path)
    except (OSError, ValueError, TypeError) as e:  # tomllib's TOMLDecodeError is a ValueError
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    if args.action == "list":
        for name, e in keys.items():
            limits = ", ".join(f"{k}={v}" for k, v in (e.get("limits") or {}).items()) or "no limits"
            print(f"{name}\t{e.get('role', 'user')}\tshare={e.get('share', 1.0)}\t"
                  f"max_priority={e.get('max_priority', 0)}\t{limits}")
        return 0
    if args.action == "revoke":
        if keys.pop(args.name, None) is None:
            print(f"no key named {args.name!r}", file=sys.stderr)
            return 1
        save(path, keys)
        print(f"revoked {args.name}")
        return 0
    if args.name in keys:
        print(f"a key named {args.name!r} exists; revoke it first", file=sys.stderr)
        return 1
    key = new_key()
    limits = {k: getattr(args, k) for k in Limits.__dataclass_fields__ if getattr(args, k) is not None}
    keys[args.name] = {"hash": hash_key(key), "role": args.role, "share": args.share,
                       "max_priority": args.max_priority,
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       **({"limits": limits} if limits else {})}
    try:
        save(path, keys)
    except ValueError as e:  # e.g. --share 0
        print(str(e), file=sys.stderr)
        return 1
    print(key)  # the only time the key is shown
    return 0


if __name__ == "__main__":
    sys.exit(main())
