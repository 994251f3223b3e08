"""The service's own errors, raised by the stores and mapped to HTTP status in one place
(dicebox.server.errors). Each carries a short message and optional JSON detail."""

from __future__ import annotations

import errno
import os
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


# errno values that mean "no room left" (507) and "not allowed to write here" (503).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
UNWRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class StorageError(ServiceError, OSError):
    """The server could not write its files: the disk is full (507 Insufficient Storage) or
    a directory is not writable (503). Nothing was stored.

    Also an OSError with ``errno`` and ``filename`` set, so Python callers see which file
    (``str(error)`` names it); the HTTP answer (``message``) names the problem but not the
    server's paths.
    """

    def __init__(self, what: str, code: int, path: str | os.PathLike | None = None) -> None:
        full = code in FULL_ERRNOS
        message = (f"{what}: {os.strerror(code)} "
                   + ("(the server's disk is full)" if full
                      else "(the server cannot write to its storage)"))
        super().__init__(message, {"errno": errno.errorcode.get(code, str(code))})
        self.status = 507 if full else 503
        self.errno = code
        self.strerror = message
        self.filename = None if path is None else os.fspath(path)


def storage_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it means the disk is full or not writable, else None.

    OSErrors raised by the compiled core carry no errno, only the system's text for it
    ("cannot write PATH: No space left on device"), so the text is matched too.
    """
    if not isinstance(exc, OSError):
        return None
    if exc.errno is not None:
        return exc.errno if exc.errno in FULL_ERRNOS | UNWRITABLE_ERRNOS else None
    text = str(exc)
    for code in (*sorted(FULL_ERRNOS), *sorted(UNWRITABLE_ERRNOS)):
        if os.strerror(code) in text:
            return code
    return None


def as_storage_error(exc: BaseException, what: str,
                     path: str | os.PathLike | None = None) -> BaseException:
    """``exc`` as a StorageError saying ``what`` failed when it is a full or unwritable disk;
    any other error is returned unchanged (to be re-raised as it was)."""
    if isinstance(exc, StorageError):
        return exc
    code = storage_errno(exc)
    if code is None:
        return exc
    if path is None:
        path = getattr(exc, "filename", None)
    return StorageError(what, code, path)
