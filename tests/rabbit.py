"""A private RabbitMQ node for tests (issue 6, item 6): ``rabbitmq-server`` from apt started with
its own node name, AMQP port, distribution port, epmd port, data and log directories and
configuration, so tests can stop, restart and kill it without touching any other broker on the
machine. Also the ``amqp_url`` fixture: a test module imports it (``from rabbit import
amqp_url``) and pytest finds it there.

Isolation: the dicebox topology has fixed queue names, so tests that need a clean broker either
use their own :class:`PrivateBroker` (everything that stops, breaks or reconfigures the broker —
e.g. a one-minute ``consumer_timeout``) or call :func:`purge_dicebox_queues` on the shared node
before they start (``amqp_url`` is session-scoped: one node start, several seconds, per run).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pika
import pika.exceptions
import pytest

STARTUP_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # /usr/sbin's wrapper su's to user rabbitmq
DICEBOX_QUEUES = ("dicebox.jobs", "dicebox.jobs.wait", "dicebox.dead", "dicebox.sensory")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rabbitmq_available() -> bool:
    return os.path.exists(SERVER_SCRIPT) or shutil.which("rabbitmq-server") is not None


class PrivateBroker:
    """One RabbitMQ node living in ``tmp_dir``. ``start()`` returns once it accepts AMQP
    connections; ``stop()`` shuts it down cleanly (durable queues and persistent messages
    survive a later ``start()`` on the same port and data directory); ``kill()`` is SIGKILL;
    ``close()`` stops it and its private epmd for good."""

    def __init__(
        self,
        tmp_dir: Path | str,
        consumer_timeout_ms: int | None = None,
        channel_tick_ms: int | None = None,
    ) -> None:
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.consumer_timeout_ms = consumer_timeout_ms
        # RabbitMQ looks for timed-out deliveries on every channel tick (default 60 s), so a
        # delivery really times out somewhere in [timeout, timeout + tick]: with a consumer
        # timeout the tick defaults to 1 s, so tests see the timeout when it is due.
        if channel_tick_ms is None and consumer_timeout_ms is not None:
            channel_tick_ms = 1000
        self.channel_tick_ms = channel_tick_ms
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"dicebox-{self.port}@localhost"
        self.log = self.dir / "server.log"
        self._proc: subprocess.Popen | None = None
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_files(self) -> None:
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text(
            ""
        )  # instead of /etc/rabbitmq/rabbitmq-env.conf
        lines = ["loopback_users = none"]
        if self.consumer_timeout_ms is not None:
            lines.append(f"consumer_timeout = {self.consumer_timeout_ms}")
        (self.dir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        rabbit_env = ""
        if self.channel_tick_ms is not None:
            rabbit_env = f"{{channel_tick_interval, {int(self.channel_tick_ms)}}}"
        (self.dir / "advanced.config").write_text(f"[{{rabbit, [{rabbit_env}]}}].\n")
        (self.dir / "home").mkdir(exist_ok=True)

    def env(self) -> dict[str, str]:
        """The environment for ``rabbitmq-server`` and ``rabbitmqctl`` on this node (HOME
        holds the node's own Erlang cookie)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.dir / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_LOGS="-",  # to stdout, i.e. server.log
        )
        return env

    def start(self) -> None:
        if self.running:
            return
        script = SERVER_SCRIPT if os.path.exists(SERVER_SCRIPT) else shutil.which("rabbitmq-server")
        log = open(self.log, "ab")  # noqa: SIM115 - the child keeps writing to it
        try:
            # own session: kill() signals the whole group (the script, erl, its helpers)
            self._proc = subprocess.Popen(
                [script],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            if self.accepts_connections():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"rabbitmq-server not ready after {STARTUP_TIMEOUT} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def accepts_connections(self) -> bool:
        try:  # a plain TCP probe first: pika logs every refused attempt as an error
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        params = pika.URLParameters(
            self.url + "?connection_attempts=1&socket_timeout=1&blocked_connection_timeout=1"
        )
        try:
            pika.BlockingConnection(params).close()
            return True
        except pika.exceptions.AMQPError:
            return False

    def stop(self) -> None:
        """Clean shutdown (SIGTERM: the script runs the node's orderly stop); SIGKILL if it
        takes longer than a minute."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        self._proc = None

    def kill(self) -> None:
        if self._proc is None:
            return
        self._kill_group()
        self._proc.wait()
        self._proc = None

    def _kill_group(self) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Stop the node and the epmd it started on its private port."""
        self.stop()
        epmd = shutil.which("epmd") or next(
            iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None
        )
        if epmd:
            subprocess.run(
                [str(epmd), "-port", str(self.epmd_port), "-kill"],
                env=self.env(),
                capture_output=True,
                timeout=30,
                check=False,
            )

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n NODE args...`` -> its stdout (raises on failure)."""
        ctl = "/usr/lib/rabbitmq/bin/rabbitmqctl"
        if not os.path.exists(ctl):
            ctl = shutil.which("rabbitmqctl") or "rabbitmqctl"
        out = subprocess.run(
            [ctl, "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def require_rabbitmq() -> None:
    """Skip locally, fail in CI (CI=true) when rabbitmq-server is not installed."""
    if rabbitmq_available():
        return
    message = (
        "rabbitmq-server is not installed (apt-get install rabbitmq-server; make test installs it)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def purge_dicebox_queues(url: str) -> None:
    """Empty dicebox's queues on a shared node (those that exist), so a test starts clean."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for queue in DICEBOX_QUEUES:
            channel = connection.channel()
            try:
                channel.queue_purge(queue)
            except pika.exceptions.ChannelClosedByBroker:  # 404: not declared yet
                pass
            if channel.is_open:
                channel.close()
    finally:
        connection.close()


@pytest.fixture(scope="session")
def amqp_url(tmp_path_factory) -> Iterator[str]:
    """An AMQP URL for tests that do not stop the broker: ``DICEBOX_TEST_AMQP_URL`` when set,
    else a private node for the whole session, closed at the end (also after failures)."""
    url = os.environ.get("DICEBOX_TEST_AMQP_URL")
    if url:
        yield url
        return
    require_rabbitmq()
    broker = PrivateBroker(tmp_path_factory.mktemp("rabbitmq"))
    try:
        broker.start()
        yield broker.url
    finally:
        broker.close()
