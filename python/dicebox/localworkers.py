"""Processors started beside a server (``dicebox serve --workers N``).

Each is a separate ``python -m dicebox.processor`` process talking to the server over HTTP,
exactly like a processor on another machine; this module only starts them, restarts one
that dies (after a short back-off, so a crash loop does not spin), and stops them all with
SIGTERM (a processor then hands its current job back, which resumes from its checkpoint).
The API key reaches them through the environment, never the command line (visible in ps).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

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
