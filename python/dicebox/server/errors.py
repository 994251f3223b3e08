"""Errors to HTTP answers, in one place: every error body is ``{"error": ..., "detail": ...}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dicebox import db
from dicebox.errors import ServiceError, StorageError, as_storage_error

log = logging.getLogger("dicebox.server")


def error_response(status: int, error: str, detail=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
                  for e in exc.errors()]
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        return error_response(422, f"{first['field']}: {first['message']}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_request: Request, _exc: ClientDisconnect) -> JSONResponse:
        # Nobody is listening any more; answer something short instead of logging a 500.
        return error_response(400, "the client disconnected before the request body was read")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")

    @app.exception_handler(OSError)
    @app.exception_handler(DBAPIError)
    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        # A full disk (507) or unwritable storage (503) that no store turned into a
        # StorageError itself (e.g. the database's own files); anything else goes on to the
        # catch-all above (500), as before.
        code = db.storage_errno(exc)
        storage = (StorageError("the database cannot store the change", code) if code
                   else as_storage_error(exc, "cannot write the server's files"))
        if not isinstance(storage, StorageError):
            raise exc
        log.error("%s %s: %s (%s)", request.method, request.url.path, storage.message, exc)
        return error_response(storage.status, storage.message, storage.detail)
