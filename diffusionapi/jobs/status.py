"""One job's state, as the store writes it, the worker updates it and the routes report it.

This is the one place that lists a job's states and the fields a finished job carries;
``schemas.QueueStatusResponse`` is built from it (``api/jobs.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from .states import FINAL_STATES, JobState  # noqa: F401 - the one list of states (states.py)


class ImageRecord(BaseModel):
    """One image a job made: its file, seed and infotext."""
    output_path: str          # as the seed shows it (relative to the working directory when inside it)
    output_file: str          # absolute, for reading it back
    seed: int
    infotext: str
    width: int
    height: int


class JobStatus(BaseModel):
    # Unknown keys are kept (a record written by a newer version still reads).
    model_config = ConfigDict(extra="allow")

    state: JobState
    current_phase: str
    progress: float = 0.0
    error: str | None = None
    # Set when done (first image's values at the top level, as the seed's response has them).
    payload: dict[str, Any] | None = None
    output_path: str | None = None
    output_file: str | None = None
    width: int | None = None
    height: int | None = None
    file_type: Literal["jpg", "png"] | None = None
    jpeg_quality: int | None = None
    generation_time_sec: float | None = None
    load_time_sec: float | None = None
    memory_before_mb: float | None = None
    memory_after_mb: float | None = None
    seed: int | None = None
    infotext: str | None = None
    images: list[ImageRecord] | None = None
    # While running, with previews on: the latest one (base64 JPEG) and its sampler step.
    # Kept in memory by the backend, not written to the record.
    preview: str | None = None
    preview_step: int | None = None
    warnings: list[str] | None = None  # what the engine skipped (GenerationResult.warnings)
    # When done: seconds per phase after the model load (sampling, decode, encode; upscale jobs:
    # upscale, encode): the done log record and the phase histogram (jobs/observe.py).
    phase_sec: dict[str, float] | None = None
    # The encoded images of a ``done`` status as the runner made them, in memory only (never in
    # the record): a Celery worker hands them to Redis without reading its files back.
    _encoded: list[bytes] = PrivateAttr(default_factory=list)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @classmethod
    def queued(cls) -> "JobStatus":
        return cls(state="queued", current_phase="queued", progress=0.0)

    @classmethod
    def processing(cls, phase: str, progress: float) -> "JobStatus":
        return cls(state="processing", current_phase=phase, progress=round(progress, 2))

    @classmethod
    def failed(cls, state: Literal["error", "cancelled"], message: str,
               generation_time_sec: float | None = None) -> "JobStatus":
        return cls(state=state, current_phase=state, progress=0.0, error=message,
                   generation_time_sec=generation_time_sec)

    def to_record(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


@dataclass
class FinalJob:
    """A finished job as handed out exactly once: its status and the bytes of each image."""
    status: JobStatus
    images: list[bytes | None]  # None where an image file could no longer be read
