"""Bounds on receiving a request: a deadline, so a slow client cannot hold a connection
forever, and a size limit on the request line and headers.

uvicorn bounds only the idle time between requests (``timeout_keep_alive``): a connection
that never completes its request line and headers, or a body that trickles in a byte at a
time, is kept open indefinitely (every byte received cancels that timer). This protocol
(uvicorn's httptools protocol plus a timer) gives each request ``read_seconds`` from its
first byte (from the connection's opening, for the first request) to arrive in full, plus
one second for every ``MIN_BODY_RATE`` bytes of body received, so a large upload over a
slow but honest link still gets through. Past the deadline the client gets 408 and the
connection is closed (or just closed, if the answer has begun). Time during which the server
itself has paused reading (the application has not consumed the body yet) never counts
against the client.

httptools, unlike h11, puts no bound on the headers it collects: a request whose line and
headers pass MAX_HEADER_BYTES is answered 431 and its connection closed.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("dicebox.server")

# Body bytes per second of extra allowance: a client sending at least this fast is never cut.
MIN_BODY_RATE = 64 << 10
# While reading is paused on the server's side, the deadline is looked at again this often.
PAUSED_RECHECK_SECONDS = 1.0
# Request line and headers together (h11 stops at 16 KiB; browsers send a few KiB at most).
MAX_HEADER_BYTES = 64 << 10
HEADER_END = b"\r\n\r\n"


def _closing_answer(status: str, error: str) -> bytes:
    body = json.dumps({"error": error, "detail": None}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n".encode()
            + b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class BoundedRequestProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 (httptools) protocol with the read deadline and the header limit;
    ``read_seconds`` is set by :func:`bounded_request_protocol`."""

    read_seconds: float = 60.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._began = 0.0
        self._body_bytes = 0
        self._received = False
        self._in_headers = True  # until the current request's headers are complete
        self._header_bytes = 0
        self._refused = False

    # -- the timer -----------------------------------------------------------------------------

    def _start_deadline(self) -> None:
        if self._deadline is None:  # the first request's clock started with the connection
            self._began = self.loop.time()
            self._body_bytes = 0
            self._deadline = self.loop.call_later(self.read_seconds, self._check_deadline)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        allowed = self._began + self.read_seconds + self._body_bytes / MIN_BODY_RATE
        remaining = allowed - self.loop.time()
        if remaining > 0 or self.flow.read_paused:
            self._deadline = self.loop.call_later(max(remaining, PAUSED_RECHECK_SECONDS),
                                                  self._check_deadline)
            return
        log.info("closing a connection from %s: its request did not arrive within %g s",
                 self.client[0] if self.client else "?", self.read_seconds)
        cycle = self.cycle
        # A connection that never sent a byte (a browser's speculative one) is just closed.
        if self._received and (cycle is None or not cycle.response_started):
            self.transport.write(_closing_answer("408 Request Timeout",
                                                 f"the request did not arrive within "
                                                 f"{self.read_seconds:g} s (DICEBOX_REQUEST_READ_SECONDS)"))
        if cycle is not None:
            # The application's reads now end (http.disconnect) and its writes go nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # -- uvicorn's protocol hooks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._refused:
            return
        if self._in_headers:
            # Counted before parsing, up to the end of the headers when this chunk holds it.
            end = data.find(HEADER_END)
            self._header_bytes += len(data) if end < 0 else end
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse_headers()
                return
        super().data_received(data)

    def _refuse_headers(self) -> None:
        self._refused = True
        self._stop_deadline()
        log.info("closing a connection from %s: request headers over %d bytes",
                 self.client[0] if self.client else "?", MAX_HEADER_BYTES)
        if self.cycle is None or self.cycle.response_complete:  # not inside a pipelined answer
            self.transport.write(_closing_answer("431 Request Header Fields Too Large",
                                                 f"the request line and headers exceed "
                                                 f"{MAX_HEADER_BYTES} bytes"))
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        super().on_headers_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_deadline()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._stop_deadline()
        self._in_headers, self._header_bytes = True, 0
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)


def bounded_request_protocol(read_seconds: float) -> type[BoundedRequestProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this deadline."""
    return type(BoundedRequestProtocol.__name__, (BoundedRequestProtocol,), {"read_seconds": read_seconds})
