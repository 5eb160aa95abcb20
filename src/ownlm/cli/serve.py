"""ownlm serve: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from . import (add_cache_option, add_prompt_cache_option, add_quant_option, add_threads_option, apply_cache_option,
               apply_threads_option, prompt_cache_of)
from .chat import cache_line
from ..engine.generate import DEFAULT_MAX_TOKENS
from ..engine.speculate import NGRAM
from ..errors import BadRequest, ModelNotFound


def api_keys(args) -> list[str]:
    """--api-key, OWNLM_API_KEYS (comma-separated) and --api-key-file (one per line, # comments)."""
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("OWNLM_API_KEYS", "").split(",") if k.strip()]
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text()
        except OSError as e:
            raise BadRequest(f"cannot read the API key file: {e}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return keys


def cmd_serve(args) -> int:
    from ..engine import prefix_cache
    from ..loading import pick_device, resolve_adapter, split_adapter
    from ..manage import resolve
    from ..server import ModelPool, Server, ServerConfig

    if args.max_running < 1 or args.max_queue < 0 or args.max_loaded < 1 or args.max_tokens < 1:
        raise BadRequest("--max-running, --max-loaded and --max-tokens must be at least 1, --max-queue at least 0")
    apply_threads_option(args)
    apply_cache_option(args)
    if args.cache_mb is None:  # the default, fixed now: the same bound for every model served
        prefix_cache.configure(prefix_cache.default_budget(pick_device(args.device)))
    config = ServerConfig(api_keys=api_keys(args), max_body_bytes=int(args.max_body_mb * (1 << 20)),
                          request_timeout=args.request_timeout, cors_origins=list(args.cors or []),
                          access_log=_to_stderr, log_format=args.log_format,
                          allow_pull=args.allow_pull)
    pool = ModelPool(args.models, keep_alive=args.keep_alive, max_loaded=args.max_loaded,
                     max_running=args.max_running, max_queue=args.max_queue, device=args.device, dtype=args.dtype,
                     quant=args.quant, max_tokens=args.max_tokens, prompt_cache=prompt_cache_of(args),
                     speculate=args.speculate)
    server = Server(pool, args.host, args.port, config).bind()  # refuses a public address without keys, a port in use
    for ref in args.models:  # refuse an unknown model now, not at the first request (BASE+ADAPTER: both)
        base, adapter = split_adapter(ref)
        resolve(base, pull_missing=True)
        if adapter:
            resolve_adapter(adapter)
    if args.speculate not in (None, NGRAM):  # a draft the server offers (its vocabulary: checked at load)
        try:
            pool.ref_for(args.speculate)
        except ModelNotFound:
            raise BadRequest(f"--speculate {args.speculate!r} is neither \"ngram\" nor a model this server offers",
                             "name it among the MODELs to serve (or pull it, with no MODEL)") from None
    if args.preload:
        pool.preload()

    budget = prefix_cache.configured() or 0
    print(cache_line(budget, " per model"), file=sys.stderr, flush=True)

    def ready(server: Server) -> None:
        line = {"url": server.base_url, "models": sorted(pool.available()), "auth": bool(config.api_keys),
                "preloaded": sorted(pool.loaded)}
        if args.json:
            print(json.dumps(line), flush=True)
        else:
            print(f"ownlm serving {', '.join(line['models']) or 'no models yet'} at {line['url']}"
                  + (" (API key required)" if config.api_keys else ""), file=sys.stderr, flush=True)

    server.run(ready)
    if not args.json:
        print("ownlm stopped", file=sys.stderr, flush=True)
    return 0


def _seconds(text: str) -> float:
    """--keep-alive as Ollama's keep_alive reads: seconds or a duration (5m), negative for forever"""
    import argparse

    from ..server.http import APIError
    from ..server.ollama import keep_alive_seconds

    try:
        value = keep_alive_seconds(text)
    except APIError:
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or a duration (5m)")
    return value


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                       description="Serve models over an OpenAI-compatible HTTP API. With no MODEL, every "
                                   "model in the store is offered; each loads on its first request.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models to offer (default: all in the store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need API keys)")
    p.add_argument("--port", type=int, default=11435)
    p.add_argument("--api-key", action="append", help="a key clients must send as a Bearer token (repeatable)")
    p.add_argument("--api-key-file", help="a file with one API key per line")
    p.add_argument("--cors", action="append", metavar="ORIGIN",
                   help="a web page origin (scheme://host[:port]) allowed to call the API from a browser, with CORS "
                        "answered for it (repeatable); requests from other sites' pages are refused")
    p.add_argument("--max-running", type=int, default=8, help="sequences decoded together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429 (default 64)")
    p.add_argument("--max-loaded", type=int, default=1, help="models kept in memory at once (default 1)")
    p.add_argument("--keep-alive", type=_seconds, default=300.0,
                   help="how long an idle model stays loaded: seconds, or a duration like 5m (default 300; "
                        "negative: forever)")
    p.add_argument("--preload", action="store_true", help="load the model(s) before accepting requests")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"answer tokens for a chat request that sets no max_tokens (default {DEFAULT_MAX_TOKENS}); "
                        "a request's own max_tokens may ask for up to the context")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body in MiB (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16")
    p.add_argument("--speculate", "--draft", metavar="ngram|MODEL",
                   help="speculative decoding for requests that set no `speculate` of their own: ngram (prompt "
                        "lookup) or a draft MODEL this server offers, with the same tokenizer (a request's "
                        "\"speculate\": \"none\" turns it off)")
    add_cache_option(p)
    add_prompt_cache_option(p)
    add_quant_option(p)
    add_threads_option(p)
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="the access log on stderr, a line per request: text (default) or json (an object a line)")
    p.add_argument("--allow-pull", action="store_true",
                   help="let clients pull models into the store (Ollama's POST /api/pull); off by default")
    p.add_argument("--json", action="store_true", help="print the ready line as JSON on stdout")
    p.set_defaults(func=cmd_serve)
