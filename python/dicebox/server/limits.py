"""Request body limit, enforced while the body streams in (not after it has been read).

A declared Content-Length over the limit is refused before any of the body is read; a body
without one (chunked) is counted as it arrives and cut off at the limit; either way the
connection is closed after the 413, so the rest of the body is never read. Written as plain
ASGI middleware because Starlette reads bodies lazily and has no such limit of its own.
"""

from __future__ import annotations

import json

from dicebox.errors import TooLarge


class BodyLimitMiddleware:
    """``max_bytes`` for every request, except paths starting with a prefix in ``overrides``
    (prefix -> limit), such as the processors' checkpoint and model uploads."""

    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = dict(overrides or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = next((v for prefix, v in self.overrides.items() if scope["path"].startswith(prefix)),
                     self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._refuse(send, 400, "invalid Content-Length header")
                    return
                if declared > limit:
                    await self._refuse(send, 413, self._message(limit))
                    return
        received = 0
        started = over_limit = False

        async def limited_receive():
            nonlocal received, over_limit
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over_limit = True
                    # A ServiceError: the app's handler answers 413 if the route was reading.
                    raise TooLarge(self._message(limit))
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if over_limit:
                    # The rest of the body is never read: close the connection after the
                    # answer instead of draining whatever the client still sends.
                    message = {**message, "headers": [
                        *[(k, v) for k, v in message.get("headers", ()) if k.lower() != b"connection"],
                        (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge:
            if not started:
                await self._refuse(send, 413, self._message(limit))

    def _message(self, limit: int) -> str:
        setting = "DICEBOX_MAX_BODY_BYTES" if limit == self.max_bytes else "DICEBOX_MAX_ARTIFACT_BYTES"
        return f"request body exceeds the limit of {limit} bytes ({setting})"

    @staticmethod
    async def _refuse(send, status: int, error: str) -> None:
        body = json.dumps({"error": error, "detail": None}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
