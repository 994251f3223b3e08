"""docker/: what can be checked without a Docker engine (none runs on this machine or in CI).

The compose file parses, names only files that exist, and wires its services together
consistently (one dicebox image for server and processors, processors pointed at the
server service and the broker service, commands the real CLI accepts, settings the real
Settings accept); the Dockerfile installs what the Makefile installs for a build, pins torch
like requirements-dev.txt and pyproject.toml, builds the wheel without isolation from the
build requirements, and runs as an unprivileged user; the RabbitMQ configuration leaves
dicebox's delivery hand-off comfortably inside the consumer timeout.

Then the services themselves, without containers: a private RabbitMQ node reading
docker/rabbitmq.conf, and the server and both processors started as local processes with
exactly the commands and environment compose.yml gives them (only the compose network's
host names and the /data volumes are replaced by loopback ports and directories), run two
training jobs through the broker.
"""

from __future__ import annotations

import base64
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml
from PIL import Image
from rabbit import PrivateBroker, free_port, require_rabbitmq

from dicebox import datasets
from dicebox.cli import parser as cli_parser
from dicebox.client import Client, ServerUnavailable
from dicebox.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yml"

# Makefile APT_PACKAGES that the image's builder does not install, and why. A package added
# to the Makefile must be added to the Dockerfile or here: the test below fails until then.
NOT_FOR_THE_IMAGE = {
    "ccache": "compiler cache for a developer's repeated rebuilds; an image is built once",
    "libgtest-dev": "the C++ test suite, not built into the wheel",
    "python3-venv": "the image's Python (/usr/local) has venv; Debian's python3 is another Python",
    "python3-dev": "the image's Python ships its own headers",
    "wrk": "the HTTP benchmark tool",
    "rabbitmq-server": "the broker runs in its own container (compose.yml: rabbitmq)",
    "chromium": "the browser for the dashboard test",
}


# -- parsing helpers ------------------------------------------------------------------------


def makefile_apt_packages() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^APT_PACKAGES\s*:?=\s*(.+)$", text, re.MULTILINE)
    assert match, "Makefile: no APT_PACKAGES line"
    return set(match.group(1).split())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, by stage name."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"Dockerfile: every stage is named (FROM image AS name), got FROM {rest}"
            current = result.setdefault(match.group(2), [("FROM", match.group(1))])
        elif current is not None:
            current.append((keyword, rest))
    return result


def args_defaults() -> dict[str, str]:
    defaults = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value)
    return defaults


def resolve_args(text: str) -> str:
    defaults = args_defaults()
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def apt_installs(run: str) -> list[str]:
    """Packages of every `apt-get install` in a RUN line."""
    packages = []
    for command in re.split(r"&&|;", run):
        words = shlex.split(command)
        if "apt-get" in words and "install" in words:
            after = words[words.index("install") + 1:]
            packages += [w for w in after if not w.startswith("-")]
    return packages


def pip_installs(stage: list[tuple[str, str]]) -> list[list[str]]:
    """The words of every `pip install|wheel` command in a stage's RUN lines."""
    commands = []
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if "pip" in words:
                commands.append(words[words.index("pip"):])
    return commands


def exec_form(text: str) -> list[str]:
    value = yaml.safe_load(text)  # a JSON array is valid YAML
    assert isinstance(value, list), f"expected the exec (JSON array) form, got {text}"
    return value


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}."""

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if operator in (":?", "?") and (value is None or (operator == ":?" and value == "")):
            raise ValueError(f"{name}: {argument}")
        if operator in (":-", "-") and (value is None or (operator == ":-" and value == "")):
            return argument
        return value or ""

    return INTERPOLATION.sub(substitute, text)


def resolved_environment(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {name: interpolate(str(value), env) for name, value in service.get("environment", {}).items()}


def dicebox_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s.get("build")}


def processors() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in dicebox_services().items() if s["command"][0] == "worker"}


def filled_env() -> dict[str, str]:
    """env.example with the blanks a user must fill in filled."""
    env = env_example()
    env.update(DICEBOX_API_KEY="k" * 43, RABBITMQ_PASSWORD="p" * 32)
    return env


# -- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_has_a_builder_and_a_runtime_stage_on_pinned_debian_12_python():
    names = list(stages())
    assert names == ["builder", "runtime"]
    for name, stage in stages().items():
        image = resolve_args(stage[0][1])
        repository, _, tag = image.partition(":")
        assert repository == "python", f"{name}: {image}"
        # Debian 12 like the Makefile's target machines, a fixed Python, never "latest".
        assert re.fullmatch(r"3\.1[1-9]-slim-bookworm", tag), f"{name}: {image}"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.10"


def test_builder_installs_the_makefiles_build_packages():
    builder = stages()["builder"]
    installed = [p for keyword, rest in builder if keyword == "RUN" for p in apt_installs(rest)]
    makefile = makefile_apt_packages()
    assert set(installed) <= makefile, f"not in the Makefile: {set(installed) - makefile}"
    assert set(installed) | set(NOT_FOR_THE_IMAGE) >= makefile, (
        f"Makefile packages neither in the Dockerfile nor excused: {makefile - set(installed) - set(NOT_FOR_THE_IMAGE)}")
    assert not set(installed) & set(NOT_FOR_THE_IMAGE)
    assert len(installed) == len(set(installed))


def test_apt_runs_are_lean_and_clean_up():
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN" and "apt-get install" in rest:
            assert "apt-get update" in rest, "update and install in one layer (a cached update goes stale)"
            assert "--no-install-recommends" in rest
            assert "-y" in shlex.split(rest)
            assert "rm -rf /var/lib/apt/lists/*" in rest


def test_torch_is_pinned_like_requirements_and_pyproject_and_comes_from_the_cpu_index():
    pins = {line.strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
            if line.startswith("torch")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pins == {"torch==2.13.0"}
    assert "torch==2.13.0" in pyproject["build-system"]["requires"]
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]
    for name, stage in stages().items():
        torch_installs = [words for words in pip_installs(stage) if any(w.startswith("torch") for w in words)]
        assert torch_installs, f"{name}: torch is installed explicitly (from the CPU index)"
        for words in torch_installs:
            assert [w for w in words if w.startswith("torch")] == ["torch==2.13.0"]
            index = resolve_args(words[words.index("--index-url") + 1])
            assert index == "https://download.pytorch.org/whl/cpu"


def test_builder_builds_the_wheel_from_pyprojects_build_requirements_without_isolation():
    builder = stages()["builder"]
    installed = {w for words in pip_installs(builder) if words[1] == "install" for w in words[2:]
                 if not w.startswith("-") and not w.startswith("http")}
    installed = {resolve_args(w) for w in installed} - {"https://download.pytorch.org/whl/cpu"}
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert installed == set(requires)
    wheel = [words for words in pip_installs(builder) if words[1] == "wheel"]
    assert len(wheel) == 1
    assert {"--no-build-isolation", "--no-deps"} <= set(wheel[0])
    assert wheel[0][-1] == "."


def test_every_copied_source_exists_and_is_all_the_build_context_keeps():
    copied: list[str] = []
    for keyword, rest in stages()["builder"]:
        if keyword == "COPY":
            *sources, _target = shlex.split(rest)
            copied += sources
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "CMakeLists.txt", pyproject["project"]["readme"], "cpp",
              pyproject["tool"]["scikit-build"]["wheel"]["packages"][0].split("/")[0]}
    assert set(copied) == needed
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split("\n")
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the context starts empty: build/ and .venv/ never reach the builder"
    assert {p[1:] for p in patterns if p.startswith("!")} == needed


def test_runtime_installs_the_wheel_runs_unprivileged_and_enters_through_the_cli():
    runtime = stages()["runtime"]
    keywords = [keyword for keyword, _ in runtime]
    assert "ADD" not in keywords and "COPY" not in keywords  # the wheel comes through a bind mount
    mounts = [rest for keyword, rest in runtime if keyword == "RUN" and "--mount=type=bind,from=builder" in rest]
    assert len(mounts) == 1 and "/wheels/dicebox-" in mounts[0]
    for words in pip_installs(runtime):
        assert "--no-cache-dir" in words
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    assert re.search(r"\bDICEBOX_HOME=/data\b", env)
    assert [exec_form(rest) for keyword, rest in runtime if keyword == "VOLUME"] == [["/data"]]
    entrypoint = [exec_form(rest) for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == [["dicebox"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["dicebox"] == "dicebox.cli:main"
    (cmd,) = [exec_form(rest) for keyword, rest in runtime if keyword == "CMD"]
    args = cli_parser().parse_args(cmd)
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert "8000" in [rest for keyword, rest in runtime if keyword == "EXPOSE"]


def test_dockerfile_avoids_common_mistakes():
    for keyword, rest in dockerfile_instructions():
        assert keyword != "ADD", "COPY, not ADD (hadolint DL3020)"
        assert ":latest" not in rest
        assert "sudo " not in rest
        if keyword == "WORKDIR":
            assert rest.startswith("/"), "absolute WORKDIR (hadolint DL3000)"
        if keyword == "RUN":
            assert not re.search(r"(^|&&|;)\s*cd\s", rest), "WORKDIR, not cd (hadolint DL3003)"
            for words in [shlex.split(c) for c in re.split(r"&&|;", rest)]:
                if "pip" in words and "install" in words:
                    assert "--no-cache-dir" in words, f"pip install without --no-cache-dir: {rest}"


# -- compose.yml -----------------------------------------------------------------------------


def test_compose_parses_and_names_only_files_that_exist():
    spec = compose()
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, f"{name}: the build context is the repository root"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).is_file(), f"{name}: mounts {source}, which does not exist"
            else:
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"
        for env_file in service.get("env_file", []):
            assert (DOCKER / env_file).is_file(), f"{name}: env_file {env_file} does not exist"


def test_one_image_serves_and_processes():
    services = dicebox_services()
    assert {s["image"] for s in services.values()} == {"dicebox:0.1.0"}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert services["server"]["image"] == f"dicebox:{version}"
    assert sorted(s["command"][0] for s in services.values()) == ["serve", "worker", "worker"]
    for service in services.values():
        cli_parser().parse_args(service["command"])  # the real CLI accepts it (SystemExit if not)
    names = [cli_parser().parse_args(s["command"]).name for s in processors().values()]
    assert len(set(names)) == len(names) == 2, "two processors, told apart in job records"


def test_processors_point_at_the_server_service_and_the_broker_service():
    spec = compose()
    server = spec["services"]["server"]
    served = cli_parser().parse_args(server["command"])
    assert served.host == "0.0.0.0"
    for name, service in processors().items():
        url = urlsplit(cli_parser().parse_args(service["command"]).server)
        assert url.scheme == "http"
        assert url.hostname == "server" and url.port == served.port, f"{name}: {url.geturl()}"
        assert service["depends_on"]["server"]["condition"] == "service_healthy"
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        broker = urlsplit(resolved_environment(service, filled_env())["DICEBOX_BROKER_URL"])
        assert (broker.scheme, broker.hostname, broker.port) == ("amqp", "rabbitmq", 5672)
        assert "home" not in " ".join(service.get("volumes", [])), \
            f"{name}: processors reach the server's data over HTTP only, as on another machine"
    assert resolved_environment(server, filled_env())["DICEBOX_BROKER_URL"] == \
        resolved_environment(spec["services"]["processor-1"], filled_env())["DICEBOX_BROKER_URL"]


def test_the_server_keeps_its_home_on_a_volume_and_is_healthchecked_on_readyz():
    spec = compose()
    server = spec["services"]["server"]
    assert "dicebox-home:/data" in server["volumes"]
    assert "dicebox-home" in spec["volumes"]
    check = " ".join(server["healthcheck"]["test"])
    port = cli_parser().parse_args(server["command"]).port
    assert f"http://127.0.0.1:{port}/readyz" in check
    published = [p for s in spec["services"].values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), \
        "published on the host's loopback only; opening them is the operator's choice"
    assert f"127.0.0.1:{port}:{port}" in server["ports"]


def test_rabbitmq_runs_version_3_with_management_and_dicebox_config():
    rabbit = compose()["services"]["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:3\.\d+-management", rabbit["image"])
    assert "./rabbitmq.conf:/etc/rabbitmq/conf.d/30-dicebox.conf:ro" in rabbit["volumes"]
    assert "rabbitmq-diagnostics" in rabbit["healthcheck"]["test"]
    assert "127.0.0.1:15672:15672" in rabbit["ports"]


def _handoff_default_seconds() -> float:
    """The processor's default hand-off time (DICEBOX_BROKER_HANDOFF_SECONDS unset), wherever
    the code keeps it: a setting, the processor's constant, or the consumer's default."""
    for field in Settings.model_fields.values():
        aliases = getattr(field.validation_alias, "choices", [])
        if "DICEBOX_BROKER_HANDOFF_SECONDS" in aliases:
            return float(field.default)
    from dicebox import processor

    if hasattr(processor, "DEFAULT_HANDOFF_SECONDS"):
        return float(processor.DEFAULT_HANDOFF_SECONDS)
    from dicebox.rabbitmq.jobs import JobConsumer

    return float(inspect.signature(JobConsumer).parameters["handoff_seconds"].default)


def test_consumer_timeout_leaves_room_for_the_handoff():
    settings = {}
    for line in (DOCKER / "rabbitmq.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    timeout_ms = int(settings["consumer_timeout"])
    handoff = _handoff_default_seconds()
    # Hand-off well before the broker would give up on the delivery: a slow epoch or a
    # reconnect must not push the hand-off past the timeout.
    assert timeout_ms / 1000 >= handoff * 1.25, (timeout_ms, handoff)


def test_every_variable_is_in_env_example_and_secrets_must_be_set():
    text = COMPOSE.read_text()
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    example = env_example()
    assert used == set(example), f"compose uses {sorted(used)}, env.example lists {sorted(example)}"
    # As shipped, the secrets are blank, and compose refuses to start without them.
    assert example["DICEBOX_API_KEY"] == "" and example["RABBITMQ_PASSWORD"] == ""
    for blank in ("DICEBOX_API_KEY", "RABBITMQ_PASSWORD"):
        env = filled_env()
        env[blank] = ""
        with pytest.raises(ValueError, match=blank):
            interpolate(text, env)
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


@pytest.mark.parametrize("service", ["server", "processor-1", "processor-2"])
def test_settings_accept_each_services_environment(service: str, monkeypatch: pytest.MonkeyPatch):
    """The resolved environment and command flags build a valid Settings (the server listens
    beyond loopback, which needs the key it is given)."""
    spec = compose()["services"][service]
    for name in list(os.environ):
        if name.startswith("DICEBOX_") or name in ("API_ACCESS_KEY", "SENSORY_SERVER"):
            monkeypatch.delenv(name)
    for name, value in resolved_environment(spec, filled_env()).items():
        monkeypatch.setenv(name, value)
    args = cli_parser().parse_args(spec["command"])
    flags = {"host": getattr(args, "host", None), "port": getattr(args, "port", None),
             "server_url": getattr(args, "server", None)}
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k" * 43
    assert settings.broker_url.startswith("amqp://dicebox:")
    assert not settings.embedded


# -- the compose services, run as local processes ----------------------------------------------


class ComposeConfiguredBroker(PrivateBroker):
    """A private RabbitMQ node that also reads docker/rabbitmq.conf, as the compose service
    does (there it is a conf.d file after the image's defaults; here it follows the node's
    own settings in the one configuration file)."""

    def _write_files(self) -> None:
        super()._write_files()
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(conf.read_text() + (DOCKER / "rabbitmq.conf").read_text())


def _localised(service: str, env: dict[str, str], broker_port: int, server_port: int,
               home: Path) -> tuple[list[str], dict[str, str]]:
    """The service's command and environment from compose.yml, with the compose network's
    names (rabbitmq:5672, server:8000, 0.0.0.0) replaced by this machine's loopback ports,
    and its /data volume by a directory of its own."""
    spec = compose()["services"][service]
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("DICEBOX_") and k not in ("API_ACCESS_KEY", "SENSORY_SERVER")}
    for name, value in resolved_environment(spec, env).items():
        environment[name] = value.replace("@rabbitmq:5672/", f"@127.0.0.1:{broker_port}/")
    environment["DICEBOX_HOME"] = str(home)
    command = [word.replace("http://server:8000", f"http://127.0.0.1:{server_port}")
               for word in spec["command"]]
    if command[0] == "serve":
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(server_port)
    return command, environment


def test_the_compose_services_work_together(tmp_path: Path):
    """RabbitMQ with docker/rabbitmq.conf, then the server and both processors with exactly
    the commands and environment compose.yml gives them: two train jobs go through the broker
    to the named processors and succeed, one model each."""
    require_rabbitmq()
    env = filled_env()
    broker = ComposeConfiguredBroker(tmp_path / "rabbitmq")
    processes: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}
    client = None
    try:
        broker.start()
        configured = re.search(r"^consumer_timeout\s*=\s*(\d+)", (DOCKER / "rabbitmq.conf").read_text(),
                               re.MULTILINE).group(1)
        assert broker.ctl("eval", "application:get_env(rabbit, consumer_timeout).").strip() == \
            f"{{ok,{configured}}}"
        broker.ctl("add_user", "dicebox", env["RABBITMQ_PASSWORD"])
        broker.ctl("set_permissions", "-p", "/", "dicebox", ".*", ".*", ".*")
        server_port = free_port()
        for service in ("server", "processor-1", "processor-2"):
            command, environment = _localised(service, env, broker.port, server_port, tmp_path / service)
            logs[service] = tmp_path / f"{service}.log"
            with open(logs[service], "wb") as log:
                processes[service] = subprocess.Popen([sys.executable, "-m", "dicebox", *command],
                                                      env=environment, stdout=log, stderr=subprocess.STDOUT)
            if service == "server":
                client = Client(f"http://127.0.0.1:{server_port}", api_key=env["DICEBOX_API_KEY"])
                _wait_ready(client, processes["server"], logs["server"])

        dice = datasets.make_dice(count=120, size=16, seed=0)
        client.datasets.create("dice", 16, 16, 1)
        client.datasets.add_items("dice", [
            {"category": dice.categories[label], "data": base64.b64encode(_png(pixels)).decode()}
            for pixels, label in zip(dice.images, dice.labels)])
        genome = {"optimizer": {"name": "adam", "learning_rate": 0.003},
                  "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}
        jobs = [client.jobs.submit("train", "dice", genome=genome, params={"epochs": 2, "seed": seed})
                for seed in (0, 1)]
        for submitted in jobs:
            job = _wait_ended(client, submitted["id"], logs)
            assert job["status"] == "succeeded", (job["error"], _tails(logs))
            # The events of an ended job: the whole story, then the stream ends.
            owners = {event["data"]["owner"].rsplit(":", 1)[0] for event in client.jobs.events(job["id"])
                      if event.get("event") == "status" and "owner" in event["data"]}
            assert job["attempts"] == 1
            assert owners and owners <= {"processor-1", "processor-2"}, owners
            assert client.models.get(job["result"]["model_id"])["job_id"] == job["id"]
    finally:
        if client is not None:
            client.close()
        for service in ("processor-1", "processor-2", "server"):  # processors hand back first
            if service in processes:
                processes[service].terminate()
        for process in processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        broker.close()


def _wait_ready(client: Client, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120  # a hang guard, not a speed check
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.send("GET", "/readyz").status_code == 200:
                return
        except ServerUnavailable:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not get ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _wait_ended(client: Client, job_id: str, logs: dict[str, Path]) -> dict:
    deadline = time.monotonic() + 300  # a hang guard, not a speed check: the jobs take seconds
    while True:
        job = client.jobs.get(job_id)
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after 300 s:\n{_tails(logs)}")
        time.sleep(0.2)


def _png(pixels) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels[0]).save(out, format="PNG")
    return out.getvalue()


def _tails(logs: dict[str, Path]) -> str:
    return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-2000:]}" for name, path in logs.items())
