"""The README's runnable examples run, and the documentation matches the code it describes.

A fenced block whose info string is ``python runnable`` is an example a reader can paste:
all such blocks run in order, in one fresh interpreter, in a temporary directory, as a
reader following the README would run them. The other checks keep the docs honest without
a person reading them: every setting is in docs/operations.md, every variable the docs name
exists, every REST route is in docs/api.md (and every route it names exists), the JSON
bodies of its curl examples parse, and relative links lead to files and headings that exist.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicebox.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS, ROOT / "docker" / "README.md"]
RUNNABLE = "python runnable"
# A hang guard for the README's examples, not a speed assertion (they take seconds).
RUN_TIMEOUT = 900

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number of the opening fence) of every fenced block."""
    return [(m.group("info").strip(), m.group("code"), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def runnable_blocks() -> list[tuple[str, int]]:
    return [(code, line) for info, code, line in fenced_blocks(README.read_text()) if info == RUNNABLE]


# -- the README's examples ------------------------------------------------------------------


def test_fence_parser_reads_info_strings_and_lines():
    text = "intro\n```python runnable\nx = 1\n```\n\n```\nplain\n```\n"
    assert fenced_blocks(text) == [("python runnable", "x = 1\n", 2), ("", "plain\n", 6)]


def test_readme_marks_its_runnable_examples():
    blocks = runnable_blocks()
    assert blocks, f"README.md has no ```{RUNNABLE} block"
    for code, line in blocks:
        compile(code, f"README.md:{line}", "exec")  # a syntax error names the block


def _script(blocks: list[tuple[str, int]]) -> str:
    """One program running the blocks in order in one namespace, each compiled under its
    README line so a traceback points at the example that failed."""
    parts = ["import sys", "namespace = {'__name__': '__main__'}"]
    for code, line in blocks:
        parts.append(f"print('--- README.md line {line}', flush=True)")
        parts.append(f"exec(compile({code!r}, 'README.md:{line}', 'exec'), namespace)")
    return "\n".join(parts) + "\n"


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICEBOX_")}
    env["DICEBOX_HOME"] = str(cwd / "home")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)


def test_runnable_blocks_run_in_a_fresh_interpreter(tmp_path: Path):
    done = _run(_script(runnable_blocks()), tmp_path)
    assert done.returncode == 0, f"README examples failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    for _code, line in runnable_blocks():
        assert f"--- README.md line {line}" in done.stdout


def test_a_failing_block_fails_and_is_named(tmp_path: Path):
    """The harness itself: an error stops the run with the block's README line in the
    traceback, and the blocks after it do not run."""
    script = _script([("x = 1\n", 10), ("raise ValueError('broken example')\n", 20),
                      ("open('after', 'w').write('ran')\n", 30)])
    done = _run(script, tmp_path)
    assert done.returncode != 0
    assert 'File "README.md:20"' in done.stderr and "broken example" in done.stderr
    assert not (tmp_path / "after").exists()


# -- settings and variables ------------------------------------------------------------------


def _env_names(field) -> list[str]:
    choices = getattr(field.validation_alias, "choices", None) or []
    return [c for c in choices if isinstance(c, str) and c.isupper()]


def test_every_setting_is_in_operations_md():
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = []
    for name, field in Settings.model_fields.items():
        names = _env_names(field) or [f"--{name.replace('_', '-')}"]  # flag-only settings
        missing += [f"{name}: {n}" for n in names if f"`{n}`" not in text and f"{n}`" not in text]
    assert missing == [], f"settings not documented in docs/operations.md: {missing}"


def _compose_variables() -> set[str]:
    text = (ROOT / "docker" / "compose.yml").read_text()
    return set(re.findall(r"\$\{(\w+)", text))


def _read_by_the_package() -> str:
    sources = [*(ROOT / "python" / "dicebox").rglob("*.py"), ROOT / ".ci" / "run",
               *(ROOT / "scripts").glob("*")]
    return "\n".join(p.read_text(errors="replace") for p in sources if p.is_file())


def test_every_variable_the_docs_name_exists():
    known = {n for f in Settings.model_fields.values() for n in _env_names(f)}
    known |= _compose_variables()  # docker/.env values, read by compose itself
    code = _read_by_the_package()
    unknown = []
    for path in [*MARKDOWN, *(ROOT / "docker").glob("*")]:
        if path.is_file():
            for name in set(re.findall(r"\bDICEBOX_[A-Z][A-Z0-9_]*", path.read_text())):
                if name not in known and f'"{name}"' not in code and f"'{name}'" not in code:
                    unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert unknown == [], f"variables that nothing reads: {unknown}"


# -- the REST API reference ------------------------------------------------------------------

ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE)\s+(/[^\s`?,|)*\"']*)")


def _normalise(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.rstrip("/") or "/")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from dicebox.server import create_app

    return create_app(Settings(home=tmp_path_factory.mktemp("home")))


def test_every_route_is_in_api_md(app):
    text = (ROOT / "docs" / "api.md").read_text()
    documented = {(m, _normalise(p)) for m, p in ROUTE.findall(text)}
    missing = sorted(f"{method.upper()} {path}" for path, ops in app.openapi()["paths"].items()
                     for method in ops if (method.upper(), _normalise(path)) not in documented)
    assert missing == [], f"routes missing from docs/api.md: {missing}"


def test_every_route_api_md_names_exists(app):
    """Each route docs/api.md names is in the OpenAPI description, or (the dashboard, the
    documentation pages) answers something other than "no such route" when requested."""
    from fastapi.testclient import TestClient

    described = {(method.upper(), _normalise(path)) for path, ops in app.openapi()["paths"].items()
                 for method in ops}
    text = (ROOT / "docs" / "api.md").read_text()
    others = sorted({(m, p) for m, p in ROUTE.findall(text) if (m, _normalise(p)) not in described})
    client = TestClient(app)
    unknown = []
    for method, path in others:
        answer = client.request(method, re.sub(r"\{[^}]*\}", "x", path))
        if answer.status_code == 405 or (answer.status_code == 404 and answer.json().get("error") == "Not Found"):
            unknown.append(f"{method} {path}")
    assert unknown == [], f"docs/api.md names routes the server does not have: {unknown}"


def test_api_md_curl_bodies_are_json():
    text = (ROOT / "docs" / "api.md").read_text()
    bodies = re.findall(r"-d '([^']*)'", text)
    assert len(bodies) >= 10
    for body in bodies:
        try:
            json.loads(body)
        except ValueError as exc:
            pytest.fail(f"docs/api.md: a curl body is not JSON ({exc}): {body[:200]}")


# -- links -----------------------------------------------------------------------------------


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", path.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # not inside code
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)}: broken links {broken}"

