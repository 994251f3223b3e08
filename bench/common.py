"""Helpers shared by the service benchmarks (service.py, classify_bench.py, soak.py).

The real-process helpers (a ``dicebox serve`` on a free loopback port, processors, dataset
uploads, polling) live in tests/servers.py, which the end-to-end tests use too; this module
puts that directory on the import path and re-exports them, beside the few helpers only the
benchmarks need.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import (
    SIZE,
    Processor,
    Server,
    b64_png,
    free_port,
    png_bytes,
    upload_dice,
    wait_for,
    wait_job,
)

__all__ = ["SIZE", "Processor", "Server", "all_jobs", "b64_png", "free_port", "multipart_body",
           "percentile", "png_bytes", "upload_dice", "wait_for", "wait_job"]

MULTIPART_BOUNDARY = "dicebox-bench-boundary"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` (0-1) quantile of ``values``: the nearest sample, no interpolation."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def all_jobs(client: httpx.Client, **params) -> list[dict]:
    """Every job of ``GET /v1/jobs`` (following the cursor), filtered by ``params``."""
    out, cursor = [], None
    while True:
        query = {"limit": 1000, **params, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=query).json()
        out += page["items"]
        cursor = page["next"]
        if cursor is None:
            return out


def multipart_body(files: list[bytes], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and ``files`` (each a PNG, as field
    ``files``) and its Content-Type: built once by hand so a load generator can send the same
    bytes many times."""
    parts = [f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
             f"{value}\r\n".encode() for name, value in (fields or {}).items()]
    for index, data in enumerate(files):
        head = (f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
                f'filename="{index}.png"\r\nContent-Type: image/png\r\n\r\n')
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{MULTIPART_BOUNDARY}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"
