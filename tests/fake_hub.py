"""A fake Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub 2.x calls to download a file
(HEAD and GET /{repo}/resolve/{revision}/{file}, with the ETag / X-Linked-Etag / X-Linked-Size /
X-Repo-Commit headers and Range support, and X-Error-Code on errors) and to list a repository
(/api/models/{repo}[/revision/{rev}]). No Xet headers, so the client never tries Xet.

Per test: `files` (repo -> {path: bytes}), `gated` repos (served only with `token`), `corrupt`
(serve other bytes than the advertised sha256), `drop_after` (close the connection after that many
body bytes of the next GET, once), `extra` (bytes sent after a file's own, beyond its announced
size), `hide_size` (a HEAD tells no size: neither X-Linked-Size nor Content-Length), `cdn`
(another FakeHub whose base URL the HEAD of a file redirects to, as the Hub redirects LFS files to
its CDN: /cdn/{repo}/{file} there serves the same files, without a token), and `log`, every request
as (method, path, headers)."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.gated: set[str] = set()
        self.token = "hf_good_token"
        self.corrupt = False
        self.drop_after: int | None = None  # the next body sent is cut after this many bytes
        self.drop_file: str | None = None  # ... the next body of this file, where set
        self.extra = b""
        self.hide_size = False
        self.cdn: FakeHub | None = None
        self.log: list[tuple[str, str, dict[str, str]]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo: str, path: str, data: bytes) -> str:
        """Serve `data` as repo/path; returns its sha256 (what the Hub announces for an LFS file)."""
        self.files.setdefault(repo, {})[path] = data
        return hashlib.sha256(data).hexdigest()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests(self, method: str = "GET") -> list[tuple[str, str, dict[str, str]]]:
        return [r for r in self.log if r[0] == method]

    # -- the server ---------------------------------------------------------------------------
    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, body: bool) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _json(self, h: BaseHTTPRequestHandler, obj: dict, body: bool) -> None:
        data = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _allowed(self, h: BaseHTTPRequestHandler, repo: str) -> bool:
        return repo not in self.gated or h.headers.get("Authorization") == f"Bearer {self.token}"

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.log.append((h.command, path, dict(h.headers.items())))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            if repo not in self.files:
                return self._error(h, 404, "RepoNotFound", f"Repository not found: {repo}", body)
            if not self._allowed(h, repo):
                return self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted.", body)
            siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(self.files[repo].items())]
            return self._json(h, {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings, "private": False,
                                  "gated": repo in self.gated}, body)
        cdn = parts[0] == "cdn" and len(parts) >= 4  # a CDN's signed URL: no token asked
        if not cdn and (len(parts) < 5 or parts[2] != "resolve"):
            return self._error(h, 404, "", "not found", body)
        repo, file = ("/".join(parts[1:3]), "/".join(parts[3:])) if cdn else ("/".join(parts[:2]), "/".join(parts[4:]))
        if repo not in self.files:
            return self._error(h, 401, "RepoNotFound", "Repository not found", body)
        if not cdn and not self._allowed(h, repo):
            return self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted. You must have access "
                                                    "to it and be authenticated to access it. Please log in.", body)
        if file not in self.files[repo]:
            return self._error(h, 404, "EntryNotFound", f"{file} does not exist on \"main\"", body)
        data = self.files[repo][file]
        sha = hashlib.sha256(data).hexdigest()
        if self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        if start >= len(data) and start:
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.cdn is not None and not cdn:
            h.send_response(302)
            h.send_header("Location", f"{self.cdn.url}/cdn/{repo}/{file}")
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        piece = data[start:] + self.extra
        h.send_response(206 if start else 200)
        h.send_header("ETag", f'"{sha}"')
        h.send_header("X-Linked-Etag", f'"{sha}"')
        hidden = self.hide_size and not body
        if not hidden:
            h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        if not hidden:
            h.send_header("Content-Length", str(len(piece)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        if self.drop_after is not None and self.drop_file in (None, file):
            cut, self.drop_after = self.drop_after, None
            h.wfile.write(piece[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(piece)
