"""Security checks against real servers on loopback ports (``dicebox serve`` processes).

- no secret (the API key, a broker password) in the server's or processors' logs or in any
  answer, whatever the requests: wrong keys, bad input, a server error;
- CORS closed: no Access-Control-Allow-Origin for any origin;
- the dashboard and every one of its files carry a restrictive Content-Security-Policy;
- body limits hold while the body streams in: a too-large Content-Length is refused from the
  headers alone, a chunked body is cut at the limit; oversized headers are refused (raw
  sockets);
- a slow client (headers or body sent a byte at a time, or nothing at all) is cut off after
  DICEBOX_REQUEST_READ_SECONDS, and meanwhile the server answers others.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest
from rabbit import PrivateBroker, require_rabbitmq
from servers import Process, Processor, Server, base_env, free_port, upload_dice, wait_for, wait_job

from dicebox.server import protocol
from dicebox.server.routes import dashboard
from dicebox.settings import Settings

API_KEY = "security-test-key-4c1d7e0f9a2b8c3d5e6f"
BROKER_PASSWORD = "broker-pw-8e2f4a6c0b1d3e5f"
# Raw-socket answers are waited for this long at most: generous, the machine may be busy.
ANSWER_WAIT = 60.0
SMALL_BODY_LIMIT = 4096
GENOME = {"optimizer": {"name": "adam", "learning_rate": 0.01},
          "layers": [{"type": "dense", "size": 8, "activation": "relu"}]}


# -- raw HTTP over a socket ------------------------------------------------------------------


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=ANSWER_WAIT)
    sock.settimeout(ANSWER_WAIT)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer's body"
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset), within ANSWER_WAIT."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def trickle(sock: socket.socket, data: bytes, interval: float = 0.2) -> int:
    """Send ``data`` a byte every ``interval`` seconds until the server answers or closes;
    returns how many bytes were sent."""
    for sent in range(len(data)):
        if select.select([sock], [], [], interval)[0]:
            return sent
        try:
            sock.sendall(data[sent:sent + 1])
        except (BrokenPipeError, ConnectionResetError):
            return sent
    return len(data)


def auth_header() -> bytes:
    return f"Authorization: Bearer {API_KEY}\r\n".encode()


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("security"), api_key=API_KEY,
                    extra_env={"DICEBOX_MAX_BODY_BYTES": str(SMALL_BODY_LIMIT)})
    yield server
    server.stop()


class VerboseServer(Server):
    """``dicebox serve`` logging at debug level, so the log holds all the server can say."""

    def __init__(self, home: Path, api_key: str, extra_env: dict[str, str]) -> None:
        self.home, self.api_key = home, api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**base_env(home, api_key), **extra_env}
        cmd = [sys.executable, "-m", "dicebox", "serve", "--port", str(self.port),
               "--log-level", "debug"]
        Process.__init__(self, cmd, env, home / f"server-{self.port}.log")
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise


# -- secrets ---------------------------------------------------------------------------------


class PasswordBroker(PrivateBroker):
    """A private RabbitMQ node whose only user is ``dicebox`` with BROKER_PASSWORD: the user a
    new node creates at its first start (all rights on "/"), so no rabbitmqctl is needed."""

    def _write_files(self) -> None:
        super()._write_files()
        with open(self.dir / "rabbitmq.conf", "a") as conf:
            conf.write(f"default_user = dicebox\ndefault_pass = {BROKER_PASSWORD}\n")

    @property
    def url(self) -> str:
        return f"amqp://dicebox:{BROKER_PASSWORD}@127.0.0.1:{self.port}/%2F"


@pytest.fixture
def broker_url(tmp_path_factory):
    require_rabbitmq()
    with PasswordBroker(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker.url


def test_no_secret_in_logs_or_answers(tmp_path, broker_url):
    # RabbitMQ mode, logging at debug level: the server and a processor connect to the broker
    # with a password in the URL and run a job through it; a second processor (without the
    # broker) is refused its claims. Meanwhile: wrong keys, bad input and a server error.
    env = {"DICEBOX_BROKER_URL": broker_url}
    server = VerboseServer(tmp_path, API_KEY, env)
    processors = [Processor(server, "broker-processor", extra_env=env),
                  Processor(server, "http-processor", extra_env={"DICEBOX_BROKER_URL": ""})]
    answers: list[httpx.Response] = []
    try:
        with server.client() as client:
            upload_dice(client, "dice", 12)
            job = client.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": GENOME,
                                                "params": {"epochs": 1}})
            answers.append(job)
            model_id = wait_job(client, job.json()["id"])["result"]["model_id"]
            for headers in ({"Authorization": "Bearer wrong"}, {"API-ACCESS-KEY": "wrong"},
                            {"Authorization": f"Bearer {API_KEY}x"},
                            {"API-ACCESS-KEY": API_KEY[:-1]}, {"Authorization": API_KEY},
                            {"Authorization": f"Basic {API_KEY}"}):
                answers.append(httpx.get(f"{server.url}/v1/datasets", headers=headers))
            answers.append(httpx.get(f"{server.url}/v1/datasets"))
            answers.append(client.post("/v1/datasets", content=b"{not json",
                                       headers={"Content-Type": "application/json"}))
            answers.append(client.post("/v1/datasets", json={"name": "../etc", "width": 8, "height": 8}))
            answers.append(client.post("/v1/datasets/dice/images", json={"items": [{"category": "1",
                                                                                    "data": "!!"}]}))
            answers.append(client.post("/v1/models/best/classify?dataset=dice",
                                       json={"items": [{"data": "AAAA"}]}))
            answers.append(client.get("/v1/jobs/nope"))
            answers.append(client.post("/v1/worker/claim", json={"worker": "w", "wait": 0}))
            answers.append(client.post("/api/sensory/store", json={"name": "x"}))
            # A server error: the model's weights are gone from under the server.
            (tmp_path / "models" / model_id / "weights.safetensors").unlink()
            broken = client.get(f"/v1/models/{model_id}/weights")
            assert broken.status_code >= 500, broken.text
            answers.append(broken)
        for processor in processors:  # started, and said where it takes jobs from
            wait_for(lambda p=processor: "taking jobs from" in p.output(), what=f"{processor.cmd} to start")
    finally:
        for processor in processors:
            processor.stop()
        server.stop()
    assert all(a.status_code >= 400 for a in answers[1:]), [a.status_code for a in answers]
    for answer in answers:
        text = answer.text + json.dumps(dict(answer.headers))
        assert API_KEY not in text and BROKER_PASSWORD not in text, answer.text
    for process in (server, *processors):
        log = process.log.read_text(errors="replace")
        assert log, f"{process.cmd}: empty log"
        assert API_KEY not in log, f"API key in {process.log}"
        assert BROKER_PASSWORD not in log, f"broker password in {process.log}"
    assert "dicebox:***@" in server.log.read_text()  # the URL is logged, redacted


def test_settings_never_show_a_secret(tmp_path):
    # Settings reach tracebacks and debug output; the values themselves stay usable.
    settings = Settings(home=tmp_path, api_key=API_KEY, rabbitmq_server="broker.example",
                        rabbitmq_password=BROKER_PASSWORD,
                        database_url=f"postgresql+psycopg://dicebox:{BROKER_PASSWORD}@db/dicebox")
    for shown in (repr(settings), str(settings)):
        assert API_KEY not in shown and BROKER_PASSWORD not in shown
        assert "amqp://guest:***@broker.example:5672/%2F" in shown
        assert "postgresql+psycopg://dicebox:***@db/dicebox" in shown
    assert BROKER_PASSWORD in settings.broker_url and BROKER_PASSWORD in settings.database_url


# -- CORS and the dashboard's policy ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/datasets", "/healthz", "/", "/openapi.json"])
def test_cors_is_closed(server, path):
    origin = {"Origin": "https://evil.example"}
    preflight = httpx.options(server.url + path, headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    simple = httpx.get(server.url + path, headers={**origin, **server.headers()})
    for answer in (preflight, simple):
        assert not any(h.lower().startswith("access-control-") for h in answer.headers), answer.headers
    assert preflight.status_code >= 400


def dashboard_paths() -> list[str]:
    return ["/", *(f"/static/{name}" for name in dashboard.FILES)]


def test_the_dashboard_names_only_files_it_serves():
    index = dashboard.FILES[dashboard.INDEX].content.decode()
    referenced = re.findall(r'(?:src|href)="(/static/[^"]+)"', index)
    assert referenced and set(referenced) <= set(dashboard_paths())


@pytest.mark.parametrize("path", dashboard_paths())
def test_every_dashboard_file_has_a_restrictive_content_security_policy(server, path):
    first = httpx.get(server.url + path)
    again = httpx.get(server.url + path, headers={"If-None-Match": first.headers["etag"]})
    assert (first.status_code, again.status_code) == (200, 304)
    for answer in (first, again):
        policy = dict(d.strip().split(" ", 1) for d in answer.headers["content-security-policy"].split(";"))
        assert policy["default-src"] == "'self'"
        for directive in ("script-src", "style-src", "img-src", "connect-src", "font-src"):
            assert policy[directive] == "'self'", directive  # no inline, eval, data: or hosts
        assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
        assert policy["frame-ancestors"] == "'none'"
        assert answer.headers["x-content-type-options"] == "nosniff"


# -- body limits -----------------------------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_from_the_headers(server):
    with server.client() as client:
        assert client.post("/v1/datasets", json={"name": "limits", "width": 8, "height": 8}).status_code == 201
    with connect(server) as sock:
        # Headers only: an answer proves the server did not wait for the body.
        sock.sendall(b"POST /v1/datasets/limits/images HTTP/1.1\r\nHost: x\r\n" + auth_header()
                     + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        status, headers, body = read_answer(sock)
        assert status == 413 and headers["connection"] == "close"
        assert f"limit of {SMALL_BODY_LIMIT} bytes (DICEBOX_MAX_BODY_BYTES)" in json.loads(body)["error"]
        assert closed_by_server(sock)


def test_a_chunked_body_is_cut_at_the_limit(server):
    with server.client() as client:
        client.post("/v1/datasets", json={"name": "chunked", "width": 8, "height": 8})
    with connect(server) as sock:
        sock.sendall(b"POST /v1/datasets/chunked/images HTTP/1.1\r\nHost: x\r\n" + auth_header()
                     + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 1024
        for _ in range(SMALL_BODY_LIMIT // len(chunk) + 1):  # one past the limit, no final chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, body = read_answer(sock)
        assert status == 413 and headers["connection"] == "close"
        assert "DICEBOX_MAX_BODY_BYTES" in json.loads(body)["error"]
        assert closed_by_server(sock)
    with server.client() as client:
        assert client.get("/v1/datasets/chunked").json()["count"] == 0


def test_a_bad_content_length_is_refused(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n")
        status, _, _ = read_answer(sock)
        assert status == 400


@pytest.mark.parametrize("shape", ["one long header", "many headers"])
def test_headers_over_the_limit_are_refused_before_they_are_all_read(server, shape):
    limit = protocol.MAX_HEADER_BYTES
    if shape == "one long header":
        headers = b"X-Long: " + b"a" * (4 * limit) + b"\r\n"
    else:
        headers = b"".join(b"X-%d: v\r\n" % i for i in range(limit // 4))
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:  # never the end of the headers: the answer must come from the limit
            sock.sendall(headers)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers_back, body = read_answer(sock)
        assert status == 431 and headers_back["connection"] == "close"
        assert f"exceed {limit} bytes" in json.loads(body)["error"]
    assert httpx.get(server.url + "/healthz").status_code == 200


# -- slow clients ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("slow"), api_key=API_KEY,
                    extra_env={"DICEBOX_REQUEST_READ_SECONDS": "1"})
    yield server
    server.stop()


def test_headers_sent_byte_by_byte_are_cut_off(impatient_server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"p" * 500 + b"\r\n\r\n"
    with connect(impatient_server) as sock:
        sent = trickle(sock, request)
        assert sent < len(request)  # answered before the request was complete
        status, headers, body = read_answer(sock)
        assert status == 408 and headers["connection"] == "close"
        assert "DICEBOX_REQUEST_READ_SECONDS" in json.loads(body)["error"]
        assert closed_by_server(sock)


def test_a_trickling_body_is_cut_off_and_nothing_is_stored(impatient_server):
    with impatient_server.client() as client:
        client.post("/v1/datasets", json={"name": "slow", "width": 8, "height": 8})
    body = b'{"items": [' + b" " * 500 + b"]}"
    with connect(impatient_server) as sock:
        sock.sendall(b"POST /v1/datasets/slow/images HTTP/1.1\r\nHost: x\r\n" + auth_header()
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        sent = trickle(sock, body)
        assert sent < len(body)
        status, _, answer = read_answer(sock)
        assert status == 408, answer
        assert closed_by_server(sock)
    with impatient_server.client() as client:
        assert client.get("/v1/datasets/slow").json()["count"] == 0


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(impatient_server):
    with connect(impatient_server) as sock:
        assert closed_by_server(sock)


def test_slow_clients_do_not_hold_up_the_others(impatient_server):
    slow = [connect(impatient_server) for _ in range(20)]
    try:
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        answer = httpx.get(impatient_server.url + "/healthz", timeout=ANSWER_WAIT)
        assert answer.status_code == 200
        for sock in slow:
            status, _, _ = read_answer(sock)
            assert status == 408 and closed_by_server(sock)
    finally:
        for sock in slow:
            sock.close()


def test_a_body_sent_steadily_above_the_minimum_rate_is_not_cut(impatient_server):
    # 64 KiB every quarter second is four times the allowance's rate (dicebox.server.protocol):
    # the whole body takes longer than DICEBOX_REQUEST_READ_SECONDS and still gets an answer.
    piece, pieces = b" " * (64 << 10), 8
    with connect(impatient_server) as sock:
        sock.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\n" + auth_header()
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % (len(piece) * pieces))
        for _ in range(pieces):
            sock.sendall(piece)
            time.sleep(0.25)
        status, _, _ = read_answer(sock)
        assert status == 422  # read whole, then refused as an empty JSON document


# -- dependencies ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_every_dependency_is_pinned_in_the_constraints_file():
    import tomllib

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names((ROOT / "requirements-dev.txt").read_text().splitlines())
    wanted |= _requirement_names(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= _requirement_names(extra)
    assert not wanted - pins.keys(), "regenerate constraints.txt as its header says"
    assert pins["torch"] == "2.13.0"
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements-dev.txt -c constraints.txt" in makefile
