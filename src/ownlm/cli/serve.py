"""ownlm serve: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import add_quant_option
from ..errors import BadRequest, OwnlmError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_keys(args) -> list[str]:
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("OWNLM_API_KEYS", "").split(",") if k.strip()]
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text()
        except OSError as e:
            raise BadRequest(f"cannot read the API key file: {e}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if any(len(k) < 8 for k in keys):
        raise BadRequest("API keys must be at least 8 characters long")
    return keys


def cmd_serve(args) -> int:
    import uvicorn

    from ..engine.scheduler import Driver
    from ..manage import resolve
    from ..server import ModelPool, ServerConfig, create_app

    keys = api_keys(args)
    loopback = _is_loopback(args.host)
    if not loopback and not keys:
        raise BadRequest(f"refusing to listen on {args.host} without API keys: anyone on the network could use it",
                         "pass --api-key KEY (or OWNLM_API_KEYS / --api-key-file), or bind 127.0.0.1")
    if args.max_running < 1 or args.max_queue < 0 or args.max_loaded < 1:
        raise BadRequest("--max-running and --max-loaded must be at least 1, --max-queue at least 0")
    for ref in args.models:  # refuse an unknown model now, not at the first request
        resolve(ref, pull_missing=True)
    driver = Driver()
    pool = ModelPool(args.models, keep_alive=args.keep_alive, max_loaded=args.max_loaded,
                     max_running=args.max_running, max_queue=args.max_queue, device=args.device, dtype=args.dtype,
                     quant=args.quant, driver=driver)
    if args.preload:
        for mid in list(pool.available())[: args.max_loaded]:
            pool.release(asyncio.run(pool.acquire(mid)))
        pool.locks.clear()  # they belonged to that event loop
    config = ServerConfig(api_keys=keys, check_host=loopback, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                          request_timeout=args.request_timeout)
    server = uvicorn.Server(uvicorn.Config(create_app(pool, config), host=args.host, port=args.port,
                                           log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    # HTTP on a secondary thread, the engines on this (the main) thread: see engine.scheduler.Driver
    stop = threading.Event()

    def http() -> None:
        try:
            server.run()
        finally:
            stop.set()
            driver.wake()

    thread = threading.Thread(target=http, name="ownlm-http", daemon=True)
    thread.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise OwnlmError(f"could not listen on {args.host}:{args.port}", "is another server using that port?")
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/v1"
    ready = {"url": url, "models": sorted(pool.available()), "auth": bool(keys), "preloaded": sorted(pool.loaded)}
    if args.json:
        print(json.dumps(ready), flush=True)
    else:
        print(f"ownlm serving {', '.join(ready['models']) or 'no models yet'} at {url}"
              + (" (API key required)" if keys else ""), file=sys.stderr, flush=True)
    driver.run(stop)
    thread.join(timeout=15)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                       description="Serve models over an OpenAI-compatible HTTP API. With no MODEL, every "
                                   "model in the store is offered; each loads on its first request.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models to offer (default: all in the store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need API keys)")
    p.add_argument("--port", type=int, default=11435)
    p.add_argument("--api-key", action="append", help="a key clients must send as a Bearer token (repeatable)")
    p.add_argument("--api-key-file", help="a file with one API key per line")
    p.add_argument("--max-running", type=int, default=8, help="sequences decoded together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--max-loaded", type=int, default=1, help="models kept in memory at once (default 1)")
    p.add_argument("--keep-alive", type=float, default=300.0,
                   help="seconds an idle model stays loaded (default 300; negative: forever)")
    p.add_argument("--preload", action="store_true", help="load the model(s) before accepting requests")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    add_quant_option(p)
    p.add_argument("--json", action="store_true", help="print the ready line as JSON on stdout")
    p.set_defaults(func=cmd_serve)
