"""Real processes for end-to-end tests: a dicebox server (uvicorn) on a free loopback port and
processors (``python -m dicebox.processor``) pointed at it, each with its output in a log
file that is printed when a test fails."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import dicebox

STARTUP_TIMEOUT = 60.0
SIZE = 24  # side of the dice images upload_dice sends


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of uint8 [C, H, W] or [H, W] pixels."""
    a = pixels[0] if pixels.ndim == 3 and pixels.shape[0] == 1 else pixels
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return out.getvalue()


def b64_png(pixels: np.ndarray) -> str:
    return base64.b64encode(png_bytes(pixels)).decode()


class Process:
    """A child process whose stdout+stderr go to ``log``."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = cmd, log
        self._log_file = open(log, "ab")  # noqa: SIM115 - open for the life of the process
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")


class Server(Process):
    """``dicebox serve`` (through ``python -m dicebox``) with its home in ``home``."""

    def __init__(self, home: Path, api_key: str | None = None, port: int | None = None,
                 workers: int = 0, extra_env: dict[str, str] | None = None) -> None:
        self.home, self.api_key = home, api_key
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = base_env(home, api_key)
        env.update(extra_env or {})
        cmd = [sys.executable, "-m", "dicebox", "serve", "--port", str(self.port),
               "--workers", str(workers), "--log-level", "warning"]
        super().__init__(cmd, env, home / f"server-{self.port}-{time.monotonic_ns()}.log")
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # nobody gets this object to stop it: leave no process behind
            raise

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60, **kwargs)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT} s:\n{self.output()}")


class Processor(Process):
    def __init__(self, server: Server, name: str, threads: int = 1,
                 extra_env: dict[str, str] | None = None) -> None:
        env = base_env(server.home, server.api_key)
        env["DICEBOX_THREADS"] = str(threads)
        env.update(extra_env or {})
        cmd = [sys.executable, "-m", "dicebox.processor", "--server", server.url, "--name", name]
        super().__init__(cmd, env, server.home / f"processor-{name}-{time.monotonic_ns()}.log")


def base_env(home: Path, api_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DICEBOX_", "API_ACCESS_KEY"))}
    env["DICEBOX_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    if api_key:
        env["DICEBOX_API_KEY"] = api_key
    return env


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0,
             statuses=("succeeded", "failed", "canceled")) -> dict:
    def done():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None
    return wait_for(done, timeout, 0.2, f"job {job_id} to reach {statuses}")


def read_sse(client: httpx.Client, path: str, timeout: float = 300.0,
             headers: dict[str, str] | None = None) -> list[dict]:
    """Every event of an SSE stream until it closes: [{id, event, data}]."""
    import json

    events, current = [], {}
    with client.stream("GET", path, timeout=timeout, headers=headers or {}) as response:
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in current or "data" in current:
                    events.append(current)
                current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                current["data"] = json.loads(value)
            elif field in ("id", "event"):
                current[field] = value
    return events


def upload_dice(client, name: str, count: int, seed: int = 0, multipart: bool = True) -> dict:
    """Create dataset ``name`` and upload ``count`` die faces through the REST API."""
    r = client.post("/v1/datasets", json={"name": name, "width": SIZE, "height": SIZE, "channels": 1})
    assert r.status_code in (200, 201), r.text
    dice = dicebox.datasets.make_dice(count=count, size=SIZE, seed=seed)
    images, labels, categories = dice.images, dice.labels, dice.categories
    for c, category in enumerate(categories):
        idx = np.flatnonzero(labels == c)
        for start in range(0, len(idx), 200):
            chunk = idx[start:start + 200]
            if multipart:
                files = [("files", (f"{i}.png", png_bytes(images[i]), "image/png")) for i in chunk]
                r = client.post(f"/v1/datasets/{name}/images", data={"category": category}, files=files)
            else:
                items = [{"category": category, "data": b64_png(images[i])} for i in chunk]
                r = client.post(f"/v1/datasets/{name}/images", json={"items": items})
            assert r.status_code == 200, r.text
    info = client.get(f"/v1/datasets/{name}").json()
    assert info["count"] == count
    return info
