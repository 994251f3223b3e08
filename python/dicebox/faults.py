"""Crash points: named places in the stores where a test can make the process die.

``DICEBOX_CRASH_AT`` lists points, comma-separated, each optionally with ``@N`` (die the Nth
time the point is reached, the first by default), e.g.
``DICEBOX_CRASH_AT=sensory.files_written@3``. A process reaching an armed point kills itself
with SIGKILL, exactly like ``kill -9`` at that instant, so tests/test_crash_safety.py can
prove that a crash there loses or tears nothing. Without the variable (always, outside those
tests) ``crash_point`` is a check of one empty dict.

The points: ``sensory.files_written`` (images fsynced past the committed count, the count
not yet committed), ``sensory.committed`` (count committed, answer not yet sent),
``registry.files_written`` (model files fsynced in their temporary directory),
``registry.renamed`` (directory in place, no row yet), ``registry.committed`` (row committed,
answer not yet sent), ``processor.checkpoint_written`` (the trainer wrote the epoch's
checkpoint, not yet uploaded), ``processor.checkpoint_uploaded`` (uploaded, the epoch not yet
reported).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["crash_point"]

ENV = "DICEBOX_CRASH_AT"


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, nth = item.partition("@")
        armed[name] = int(nth) if nth else 1
    return armed


_armed = _parse(os.environ.get(ENV, ""))
_reached: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Die here (SIGKILL) if ``name`` is armed and reached for the armed time."""
    if _armed and name in _armed:
        with _lock:
            _reached[name] = count = _reached.get(name, 0) + 1
        if count == _armed[name]:
            os.kill(os.getpid(), signal.SIGKILL)
