"""Logging for operators: one setup for the server, API nodes and cluster workers.

``DIFFUSIONAPI_LOG_FORMAT=text`` (default) writes ``time level logger: message`` lines;
``json`` writes one JSON object per line -- ``ts``, ``level``, ``logger``, ``msg``, plus the
record's structured fields (``job_id``, ``event``, ``kind``, ``model``, ``caller``, ``seconds`` ...,
given as ``extra=`` by :mod:`diffusionapi.jobs.observe` and the HTTP middleware) and, for
uvicorn's access lines, ``client``, ``method``, ``path``, ``status``. uvicorn's own loggers are
pointed at the same handler, so its start-up and access lines come out in the same format.

Who is calling (``caller``) is set per request by the HTTP middleware in a context variable:
the job records of a submit or a cancel name it without every function passing it along.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar

# "203.0.113.7 key:1a2b3c" -- the client address and which credential it used (a hash prefix,
# never the secret). Set by api/observe.py for the duration of a request.
CALLER: ContextVar[str | None] = ContextVar("diffusionapi_caller", default=None)

# Attributes every LogRecord has: anything else on a record is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_SECRET_FIELD = re.compile(r"key|secret|token|auth|password", re.I)
_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@/]*@")

_handler: logging.Handler | None = None  # ours, replaced (not added twice) when configured again


def caller() -> str:
    return CALLER.get() or "internal"


def fields(record: logging.LogRecord) -> dict:
    """The structured fields of ``record`` (what ``extra=`` put on it)."""
    out = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
        client, method, path, _version, status = record.args
        out.update(client=client, method=method, path=path, status=status)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        for k, v in fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(log_format: str = "text", level: str = "INFO", *, stream=None) -> logging.Handler:
    """Send the root logger, ``diffusionapi.*`` and uvicorn's loggers to one handler in
    ``log_format``. Safe to call again (the app factory runs once per app): our handler is
    replaced, handlers others added (pytest's, a host application's) are left alone."""
    global _handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    targets = [root] + [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access")]
    for lg in targets:
        if _handler is not None and _handler in lg.handlers:
            lg.removeHandler(_handler)
    for name in ("uvicorn", "uvicorn.access"):
        lg = logging.getLogger(name)
        # uvicorn's dictConfig handlers print in its own format: ours replace them.
        for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)  # libraries (httpx logs every request at INFO) stay quiet
    logging.getLogger("diffusionapi").setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings as log records too (py.warnings), not raw stderr text
    _handler = handler
    return handler


def masked_settings(settings) -> dict:
    """The settings as the start-up record shows them: secrets replaced, URL passwords too."""
    out = {}
    for k, v in settings.model_dump(mode="json").items():
        if v is not None and _SECRET_FIELD.search(k) and not k.endswith(("_hosts", "_sec")):
            v = "***"
        elif isinstance(v, str):
            v = _URL_PASSWORD.sub(r"\1***@", v)
        out[k] = v
    return out


def log_settings(settings, role: str) -> None:
    shown = masked_settings(settings)
    logging.getLogger("diffusionapi").info(
        "%s starting; settings: %s", role, " ".join(f"{k}={v}" for k, v in shown.items()),
        extra={"event": "startup", "role": role, "settings": shown})
