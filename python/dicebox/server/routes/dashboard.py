"""The web dashboard: ``GET /`` and its files under ``/static/``, shipped in the package.

The dashboard is plain HTML, CSS and JavaScript modules in ``dicebox/server/static/`` (no
build step). The pages themselves are open, like ``/docs``: they hold no data, and every
call they make to ``/v1`` sends the API key the user typed (kept in the browser's
sessionStorage), so nothing is shown without it.

Only the files found in the static folder when the module is imported are served, looked up
by their relative path in a table: a request can name nothing else (no path is built from
the URL). Every answer carries a Content-Security-Policy that allows scripts, styles,
images and connections from this origin only, with no inline code, so an injected string can
never run as script.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dicebox.errors import NotFound

router = APIRouter(tags=["dashboard"], include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
INDEX = "index.html"

# Everything from this origin only; no inline script or style, no plugins, no framing, no
# <base> rewriting. Images are drawn from fetched blobs onto canvases, so img-src needs no
# blob: or data: either.
CSP_DIRECTIVES = (
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)
CONTENT_SECURITY_POLICY = "; ".join(CSP_DIRECTIVES)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (a 304 costs nothing), so an upgraded server's dashboard is
    # picked up at once.
    "Cache-Control": "no-cache",
}
# Explicit types for what the dashboard ships: the platform's mimetypes table varies (some
# systems map .js to text/plain, which browsers refuse for modules under nosniff).
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class StaticFile:
    path: Path
    content: bytes
    media_type: str
    etag: str


def _scan(folder: Path) -> dict[str, StaticFile]:
    """Every regular file under ``folder``, by its path relative to it (``/`` separated), read
    once: the files are small (tens of kilobytes in all) and the ETag must name what is sent."""
    files: dict[str, StaticFile] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        media_type = MEDIA_TYPES.get(path.suffix.lower()) or (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        content = path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()[:32]
        files[path.relative_to(folder).as_posix()] = StaticFile(path, content, media_type,
                                                                f'"{digest}"')
    return files


FILES = _scan(STATIC_DIR)


def _serve(request: Request, name: str) -> Response:
    entry = FILES.get(name)
    if entry is None:
        raise NotFound(f"no dashboard file {name[:200]!r}")
    headers = {**SECURITY_HEADERS, "ETag": entry.etag}
    if_none_match = request.headers.get("if-none-match", "")
    if entry.etag in (tag.strip().removeprefix("W/") for tag in if_none_match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(entry.content, media_type=entry.media_type, headers=headers)


@router.get("/")
async def index(request: Request) -> Response:
    """The dashboard's single page (its views are chosen by the URL's #fragment)."""
    return _serve(request, INDEX)


@router.get("/static/{name:path}")
async def static(request: Request, name: str) -> Response:
    """A file of the dashboard (scripts, styles, icon)."""
    return _serve(request, name)
