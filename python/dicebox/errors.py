"""The service's own errors, raised by the stores and mapped to HTTP status in one place
(dicebox.server.errors). Each carries a short message and optional JSON detail."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of the errors a client can be told about."""

    status = 400

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidInput(ServiceError, ValueError):
    """The request is malformed or names something invalid (400)."""

    status = 400


class NotFound(ServiceError, LookupError):
    """The named dataset, job or model does not exist (404)."""

    status = 404


class Conflict(ServiceError):
    """The request contradicts the current state, e.g. a dataset that exists already (409)."""

    status = 409


class TooLarge(ServiceError):
    """A body, file or image exceeds a configured limit (413)."""

    status = 413


class UnsupportedMedia(ServiceError):
    """A content type the route does not take (415)."""

    status = 415


class Unauthorized(ServiceError):
    """Missing or wrong API key (401)."""

    status = 401
