"""The embedded backend: one process holds the queue, its files and the worker thread."""
from .backend import EmbeddedBackend

__all__ = ["EmbeddedBackend"]
