"""The web chat page: `GET /` and its files under `/ui/`, all shipped inside the package (no CDN,
no build step, works air-gapped). The page itself is static; it talks to this server's OpenAI
routes (/v1/models, /v1/chat/completions with stream) from the browser, sending the API key the
user typed as `Authorization: Bearer`. So the Guard serves exactly these GET paths without a key
(PUBLIC), and everything else still needs one."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response

from .http import APIError

STATIC = Path(__file__).resolve().parent / "static"
# name under /ui/ -> media type; nothing else in the folder is served
FILES = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8",
         "icon.svg": "image/svg+xml"}
PUBLIC = frozenset({"/", *(f"/ui/{name}" for name in FILES)})  # GET without an API key

# the page runs only its own files: no inline script or style, no other site, not framed
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

router = APIRouter()


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: the ollama CLI's heartbeat
async def index() -> Response:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/ui/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in FILES:
        raise APIError(404, f"no such file: /ui/{name}")
    return _file(name, FILES[name])
