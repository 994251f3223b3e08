"""The error answers as the OpenAPI document describes them.

Every refusal is JSON ``{"error": ..., "detail": ...}`` (``dicebox.server.errors``), so each
router declares the 4xx statuses its routes really give with this one body model, instead
of FastAPI's default 422 ``HTTPValidationError`` (a shape the service never sends).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """What every refusal answers."""

    error: str = Field(description="what is wrong, naming the field or limit")
    detail: Any = Field(default=None, description="structured detail (field, limit, ...) or null")


# When each status is given; a router lists the ones its routes can answer.
ERROR_STATUSES: dict[int, str] = {
    400: "bad input: a malformed body or parameter, a bad name or image (nothing changed)",
    401: "missing or wrong API key",
    404: "no such dataset, job, model or image",
    408: "the request did not arrive in time (DICEBOX_REQUEST_READ_SECONDS)",
    409: "conflicts with the current state (another shape, a lease held by another processor)",
    413: "over a configured limit (body, image bytes or pixels, images per request)",
    415: "a content type the route does not take",
    422: "the body or a parameter does not match the schema",
    429: "too many pending orders; poll the waiting ones first",
    503: "not ready (the database does not answer or the coordinator is not running)",
}

# Every request may be refused by the body limit and read deadline before any route runs.
TRANSPORT_STATUSES = (400, 408, 413)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router or route: ``statuses`` plus the transport refusals, each
    with the ErrorBody model."""
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]}
            for status in sorted({*statuses, *TRANSPORT_STATUSES})}
