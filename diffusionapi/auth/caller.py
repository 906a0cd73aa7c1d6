"""A caller of the service: the name, role, limits and scheduling weight of one API key.

Light on purpose (no FastAPI, no torch): the keys CLI, the middleware, the job service and the
queues all import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

Role = Literal["admin", "user"]


@dataclass(frozen=True)
class Limits:
    """Per-key limits; None is no limit. Names are the ones the keys file, the 429 bodies and
    docs/tenants.md use."""
    max_queued: int | None = None              # jobs of this key waiting or running at once
    images_per_day: int | None = None          # images submitted per UTC day
    pixel_steps_per_minute: int | None = None  # width x height x steps x images, rolling minute
    requests_per_minute: int | None = None     # API calls of any kind, rolling minute

    @classmethod
    def from_dict(cls, data: dict | None) -> "Limits":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for k, v in data.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"limit {k}: expected a whole number >= 0, got {v!r}")
        return cls(**data)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Caller:
    """Who submits or asks. ``name`` None: nobody configured any key (an open service: admin)."""
    name: str | None = None
    role: Role = "admin"
    limits: Limits = field(default_factory=Limits)
    max_priority: int = 0   # a request's `priority` is capped to this
    share: float = 1.0      # weight in the fair round-robin between keys

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str | None) -> bool:
        """Whether a job owned by ``owner`` exists for this caller (isolation: jobs/service.py)."""
        return self.is_admin or (owner is not None and owner == self.name)


OPEN = Caller()  # no credentials configured: everyone is this one admin, as before keys existed
