"""Helpers for server tests: a real `ownlm serve` process on 127.0.0.1, and reading /metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """Sum of a metric's samples (all label sets) on the server at `url`."""
    text = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Server:
    """`ownlm serve ARGS --port P` in a subprocess, up once /health answers; its stdout and stderr
    go to `log`."""

    def __init__(self, home: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"server-{self.port}.log"
        full_env = {**os.environ, "OWNLM_HOME": str(home), "OWNLM_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "ownlm.cli.main", "serve", *args, "--port", str(self.port)],
                                     env=full_env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM, then the exit code (killed after 20 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

