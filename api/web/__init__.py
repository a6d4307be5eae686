"""The web page ``envctl serve`` shows at ``/``: static files, no build step.

``static/`` holds plain JavaScript modules, one stylesheet and ``index.html``. The page signs in
with an API token (kept in the browser's local storage, sent only as a bearer header) and then
uses the public REST API and its event streams, nothing more. Only the files found in
``static/`` when the app is built are served, each with a content security policy that allows
nothing from another origin: scripts come from this server only (no inline script, no eval),
styles from here or inline (the HTML outputs of cells carry theirs), pictures from here or
``data:`` URLs (PNG outputs), frames only as sandboxed ``srcdoc`` documents (HTML outputs),
connections only to this server.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

STATIC = Path(__file__).parent / "static"
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",  # HTML outputs (pandas tables...) bring their own styles
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated with the ETag: a new envctl shows its new page
}


@dataclass(frozen=True)
class PageFile:
    path: Path
    media_type: str

    def answer(self, request: Request) -> Response:
        body = self.path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {**HEADERS, "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=self.media_type, headers=headers)


def page_files(folder: Path = STATIC) -> dict[str, PageFile]:
    """The files the page may be served from, by name (nothing outside ``folder``, no dot files)."""
    return {
        p.name: PageFile(p, TYPES[p.suffix])
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in TYPES and not p.name.startswith(".")
    }


def router() -> APIRouter:
    """``GET /`` (the page) and ``GET /web/{name}`` (its files); neither is in the API schema."""
    files = page_files()
    pages = APIRouter(include_in_schema=False)

    @pages.get("/")
    def index(request: Request) -> Response:
        return files["index.html"].answer(request)

    @pages.get("/web/{name}")
    def asset(name: str, request: Request) -> Response:
        found = files.get(name)
        if found is None:
            error = {"error": {"code": "not_found", "message": f"the page has no file {name[:100]!r}", "details": {}}}
            return JSONResponse(error, status_code=404, headers=HEADERS)
        return found.answer(request)

    return pages
