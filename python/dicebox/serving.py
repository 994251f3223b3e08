"""Running the server: uvicorn serving the app, with processors started beside it
(``dicebox serve --workers N``).

Each processor is a separate ``python -m dicebox.processor`` process talking to the server over HTTP,
exactly like a processor on another machine; this module only starts them, restarts one
that dies (after a short back-off, so a crash loop does not spin), and stops them all with
SIGTERM (a processor then hands its current job back, which resumes from its checkpoint).
The API key reaches them through the environment, never the command line (visible in ps).
With a broker (``dicebox serve --broker URL`` / ``DICEBOX_BROKER_URL``) the processors are
started in RabbitMQ mode, as with their ``--broker``, and take their jobs from the broker;
the URL, which may hold a password, also goes through the environment
(``DICEBOX_BROKER_URL``), not the command line.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import uvicorn

from dicebox.allocator import pin_mmap_threshold, start_releasing_free_memory
from dicebox.server import create_app
from dicebox.server.protocol import bounded_request_protocol
from dicebox.settings import Settings

log = logging.getLogger("dicebox.serve")

RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_TIMEOUT = 30.0


class LocalWorkers:
    def __init__(self, settings: Settings, count: int, server_url: str) -> None:
        if count < 0:
            raise ValueError(f"workers must be >= 0, got {count}")
        self.settings = settings
        self.count = count
        self.server_url = server_url
        self._procs: list[subprocess.Popen | None] = [None] * count
        self._failures = [0] * count
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="dicebox-workers", daemon=True)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DICEBOX_HOME"] = str(self.settings.home)
        env["DICEBOX_SERVER_URL"] = self.server_url
        if self.settings.api_key is not None:
            env["DICEBOX_API_KEY"] = self.settings.api_key.get_secret_value()
        if self.settings.broker_url:
            env["DICEBOX_BROKER_URL"] = self.settings.broker_url
        if "DICEBOX_THREADS" not in env:
            # Share the cores: N processors training at once each get their part.
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = self.settings.threads or max(1, cpus // max(1, self.count))
            env["DICEBOX_THREADS"] = str(threads)
        return env

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "dicebox.processor", "--server", self.server_url,
               "--name", f"{os.uname().nodename}:local{index}"]
        return subprocess.Popen(cmd, env=self._env())

    def start(self) -> None:
        for i in range(self.count):
            self._procs[i] = self._spawn(i)
        self._thread.start()

    def _supervise(self) -> None:
        restart_at = [0.0] * self.count
        while not self._stopping.wait(0.5):
            for i, proc in enumerate(self._procs):
                if proc is None or proc.poll() is None:
                    continue
                if restart_at[i] == 0.0:
                    delay = RESTART_BACKOFF[min(self._failures[i], len(RESTART_BACKOFF) - 1)]
                    log.warning("processor %d exited with %s; restarting in %.0f s", i, proc.returncode, delay)
                    self._failures[i] += 1
                    restart_at[i] = time.monotonic() + delay
                elif time.monotonic() >= restart_at[i]:
                    restart_at[i] = 0.0
                    self._procs[i] = self._spawn(i)

    def stop(self) -> None:
        """SIGTERM to every processor, then wait (kill after STOP_TIMEOUT). Safe to call
        whether or not ``start`` ran."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        alive = [p for p in self._procs if p is not None and p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in alive:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class ServerWithWorkers(uvicorn.Server):
    """uvicorn's server that, on SIGINT/SIGTERM, stops the local processors *before* it stops
    serving: each hands its job back over HTTP (to resume from its checkpoint), which needs
    the server still listening. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, workers: LocalWorkers) -> None:
        super().__init__(config)
        self.workers = workers
        self._stopping = False

    def handle_exit(self, sig, frame) -> None:
        if self._stopping:
            super().handle_exit(sig, frame)
            return
        self._stopping = True

        def stop_then_exit() -> None:
            self.workers.stop()
            super(ServerWithWorkers, self).handle_exit(sig, frame)

        threading.Thread(target=stop_then_exit, name="dicebox-stop", daemon=True).start()


def serve(settings: Settings, workers: int = 0, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, with ``workers`` local processors once it listens."""
    # Both keep a busy server's resident size flat (see dicebox.allocator).
    pin_mmap_threshold()
    start_releasing_free_memory()
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=5, server_header=False,
                            http=bounded_request_protocol(settings.request_read_seconds))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    local = LocalWorkers(settings, workers, f"http://{host}:{settings.port}")
    server = ServerWithWorkers(config, local)

    def start_workers_when_listening() -> None:
        # Processors start once the server accepts connections (before, they would only retry).
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started and not server.should_exit:
            local.start()

    threading.Thread(target=start_workers_when_listening, daemon=True).start()
    try:
        server.run()
    finally:
        local.stop()  # when the server ended without a signal (a start-up failure)
