"""Running a server: HTTP (uvicorn) on a thread of its own and the engines on another, with a
clean stop. `ownlm serve` runs the engines on the main thread (`Server.run`), where PyTorch's
CPU kernels are fastest (see engine.scheduler.Driver); Python code and tests start one in the
background (`Server.start`, or `with Server(...)`)."""

from __future__ import annotations

import dataclasses
import ipaddress
import signal
import threading
import time
from typing import Callable

import uvicorn

from ..errors import BadRequest, OwnlmError
from .app import ServerConfig, cors_origins, create_app
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
        self.pool, self.host, self.port, self.config = pool, host, port, config
        self._http = uvicorn.Server(uvicorn.Config(create_app(pool, config), host=host, port=port, log_level="warning",
                                                   access_log=False, timeout_graceful_shutdown=5))
        self._stopped = threading.Event()  # set once HTTP is down: the engines stop too
        self._threads: list[threading.Thread] = []

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

    def _listen(self) -> None:
        if self._threads:
            raise RuntimeError("this server has been started already")

        def http() -> None:
            try:
                self._http.run()
            finally:
                self._stopped.set()
                self.pool.driver.wake()

        self._spawn("ownlm-http", http)
        while not self._http.started and self._threads[-1].is_alive():
            time.sleep(0.02)
        if not self._http.started:
            raise OwnlmError(f"could not listen on {self.host}:{self.port}", "is another server using that port?")
        self.port = self._http.servers[0].sockets[0].getsockname()[1]

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _shut_down(self) -> None:
        self._http.should_exit = True

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=15)
