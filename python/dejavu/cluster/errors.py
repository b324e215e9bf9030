"""Errors the controller raises to its callers."""


class WorkerError(RuntimeError):
    """A worker failed to start or died; the message names the worker and the reason."""
