"""Job backends: where jobs wait, who runs them, and where their state lives.

``base.JobBackend`` is what the API needs from a queue; ``embedded.EmbeddedBackend``
(files + an in-process queue + one worker thread) is the default.
"""
