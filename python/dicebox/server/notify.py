"""In-process wake-ups: "something changed, look again".

The database is the truth; waiters (a processor's long-poll for a job, an events stream)
re-read it when woken, and also every poll interval, which covers changes made by other
processes. ``notify`` may be called from any thread; ``wait`` is awaited on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class Notifier:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Also call ``callback`` (from the notifying thread; it must be quick and must not
        block) on every ``notify``: how threads such as the coordinator's are woken."""
        with self._lock:
            self._listeners.append(callback)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the server's event loop (called at start-up)."""
        with self._lock:
            self._loop = loop
            self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every current waiter (thread-safe; a no-op before ``bind``)."""
        with self._lock:
            loop, event, listeners = self._loop, self._event, list(self._listeners)
        for callback in listeners:
            callback()
        if loop is None or event is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._fire)
        except RuntimeError:  # the loop is shutting down
            pass

    def _fire(self) -> None:
        # Set the current event (waking its waiters) and give future waiters a fresh one.
        with self._lock:
            event, self._event = self._event, asyncio.Event()
        if event is not None:
            event.set()

    async def wait(self, timeout: float) -> bool:
        """Until the next ``notify`` or ``timeout`` seconds; True if notified."""
        with self._lock:
            event = self._event
        if event is None:
            await asyncio.sleep(timeout)
            return False
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
