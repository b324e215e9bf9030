"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, which every route answers
with, and the exceptions that carry an HTTP status."""
from __future__ import annotations

from aiohttp import web

from .protocol import BadRequest

SHUTTING_DOWN = "the server is shutting down"


def error(status: int, message: str, etype: str = "invalid_request_error", param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": etype, "param": param, "code": status}},
                             status=status)


def bad_request(e: BadRequest) -> web.Response:
    """A refused request: 400 naming its field, or 404 for a model this server does not serve."""
    return error(e.status, str(e), "NotFoundError" if e.status == 404 else "invalid_request_error", e.param)


class HttpError(RuntimeError):
    """A request that ends with this HTTP status (a body too slow or too large, a failed stream)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
