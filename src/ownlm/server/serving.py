"""Running a server: HTTP (uvicorn) on a thread of its own and the engines on another, with a
clean stop. `ownlm serve` runs the engines on the main thread (`Server.run`), where PyTorch's
CPU kernels are fastest (see engine.scheduler.Driver); Python code and tests start one in the
background (`Server.start`, or `with Server(...)`)."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import signal
import socket
import threading
import time
from typing import Callable

import uvicorn

from ..errors import BadRequest, OwnlmError
from .app import ServerConfig, cors_origins, create_app
from .logs import LOG_FORMATS
from .pool import ModelPool


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Server:
    """The OpenAI-compatible API over a pool of models, on http://HOST:PORT (port 0: any free
    port; `port` holds the real one once started)."""

    def __init__(self, pool: ModelPool, host: str = "127.0.0.1", port: int = 11435,
                 config: ServerConfig | None = None):
        config = config or ServerConfig()
        loopback = is_loopback(host)
        if not loopback and not config.api_keys:
            raise BadRequest(f"refusing to listen on {host} without API keys: anyone on the network could use it",
                             "pass --api-key KEY (or OWNLM_API_KEYS / --api-key-file), or bind 127.0.0.1")
        if any(len(k) < 8 for k in config.api_keys):
            raise BadRequest("API keys must be at least 8 characters long")
        if not loopback:  # clients reach it by other names: the Host check guards loopback servers only
            config = dataclasses.replace(config, check_host=False)
        config = dataclasses.replace(config, cors_origins=cors_origins(config.cors_origins))  # a BadRequest now
        if config.log_format not in LOG_FORMATS:
            raise BadRequest(f"unknown log format {config.log_format!r}", f"use one of {', '.join(LOG_FORMATS)}")
        self.pool, self.host, self.port, self.config = pool, host, port, config
        self._http = uvicorn.Server(uvicorn.Config(create_app(pool, config), host=host, port=port, log_level="warning",
                                                   access_log=False, timeout_graceful_shutdown=5))
        self._stopped = threading.Event()  # set once HTTP is down: the engines stop too
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as `base_url`."""
        return self.url + "/v1"

    def start(self) -> Server:
        """Serve in the background until `stop()`: returns once the port accepts connections."""
        self._listen()
        self._spawn("ownlm-engines", lambda: self.pool.driver.run(self._stopped))
        return self

    def run(self, ready: Callable[[Server], None] | None = None) -> None:
        """Serve until SIGINT or SIGTERM, the engines on this thread (call it from the main
        thread); `ready` is called once the port accepts connections."""
        previous = {sig: signal.signal(sig, lambda *_: self._shut_down()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._listen()
            if ready:
                ready(self)
            self.pool.driver.run(self._stopped)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._join()

    def stop(self) -> None:
        """Stop accepting, finish or cancel what is running (5 s grace), unload the models."""
        self._shut_down()
        self._join()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def bind(self) -> Server:
        """Claim the address now (`start` and `run` do it otherwise), so that a port in use fails
        before models load. The socket is bound here rather than by uvicorn, so that this is one
        clear error (uvicorn would log it and end its thread)."""
        if self._sock is None:
            self._sock = self._bind()
            self.port = self._sock.getsockname()[1]
        return self

    def _bind(self) -> socket.socket:
        host = self.host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart despite TIME_WAIT
            sock.bind((host, self.port))
        except OSError as e:
            sock.close()
            why = e.strerror or str(e)
            if e.errno == errno.EADDRINUSE:  # one line, the advice included: no separate hint
                raise OwnlmError(f"port {self.port} on {self.host} is in use ({why}): stop what is listening "
                                 "there or pick another port with --port") from None
            if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(e, socket.gaierror):
                raise BadRequest(f"cannot listen on {self.host}: it is not an address of this machine ({why})",
                                 "pass --host with one of this machine's addresses, or 127.0.0.1") from None
            raise OwnlmError(f"cannot listen on port {self.port} of {self.host} ({why})",
                             "ports below 1024 need privileges: pick another with --port"
                             if e.errno == errno.EACCES else None) from None
        return sock

    def _listen(self) -> None:
        if self._threads:
            raise RuntimeError("this server has been started already")
        sock = self.bind()._sock
        assert sock is not None

        def http() -> None:
            try:
                self._http.run(sockets=[sock])
            finally:
                sock.close()
                self._stopped.set()
                self.pool.driver.wake()

        self._spawn("ownlm-http", http)
        while not self._http.started and self._threads[-1].is_alive():
            time.sleep(0.02)
        if not self._http.started:
            raise OwnlmError(f"the HTTP server on {self.host}:{self.port} failed to start")
        self.port = sock.getsockname()[1]

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _shut_down(self) -> None:
        self._http.should_exit = True

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=15)
