"""The models a server offers: loaded on first use, unloaded after an idle keep-alive, at most
`max_loaded` at once. Each loaded model has its own engine loop (a Scheduler); the pool's one
Driver steps them all, on whichever thread runs `pool.driver.run` (see server.serving)."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..engine.constraints import grammar_tokenizer
from ..engine import prefix_cache
from ..engine.embed import embed
from ..engine.generate import DEFAULT_MAX_TOKENS
from ..engine.scheduler import Driver, Scheduler
from ..engine.speculate import NGRAM
from ..errors import BadRequest, ModelNotFound, OwnlmError
from ..loading import LoadedModel, load, split_adapter
from ..manage import list_models
from ..store.refs import parse_ref
from ..store.store import Store


class PoolFull(OwnlmError):
    """Every loaded model is busy and no more may be loaded."""


class Embedder:
    """A model's embedding jobs: one at a time, in arrival order, on a thread of their own (the
    scheduler batches generation; an embedding is one forward per text, chunked). A job's `stop`
    event, set by its caller on a time limit or a client gone, ends it between chunks."""

    def __init__(self, model: Any):
        self.model = model
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ownlm-embed")
        self.lock = threading.Lock()
        self.running = self.waiting = 0

    def submit(self, batch: Sequence[Sequence[int]], dimensions: int | None, stop: threading.Event) -> Future:
        with self.lock:
            self.waiting += 1

        def job() -> list[list[float]]:
            with self.lock:
                self.waiting -= 1
                self.running += 1
            try:
                return embed(self.model, batch, dimensions, stop=stop.is_set)
            finally:
                with self.lock:
                    self.running -= 1

        return self.executor.submit(job)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"running": self.running, "waiting": self.waiting}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Served:
    id: str
    lm: LoadedModel
    scheduler: Scheduler
    created: int
    embedder: Embedder
    max_tokens: int = DEFAULT_MAX_TOKENS  # answer tokens for a chat request that names none
    active: int = 0
    keep_alive: float | None = None  # seconds idle before unloading, set by a request (Ollama's); None: the pool's
    # a draft model for speculative decoding by API name (a model this server offers), loaded on this model's device
    load_draft: Callable[[str], LoadedModel] | None = None
    speculate: str | None = None  # for a request that sets no `speculate`: `ownlm serve --speculate`
    last_used: float = field(default_factory=time.monotonic)
    _grammar_tok: Any = None
    _grammar_lock: threading.Lock = field(default_factory=threading.Lock)

    def grammar_tokenizer(self):
        with self._grammar_lock:
            if self._grammar_tok is None:
                self._grammar_tok = grammar_tokenizer(self.lm.tokenizer, self.lm.config.vocab_size)
            return self._grammar_tok

    def draft(self, name: str, who: str = "speculate") -> LoadedModel:
        """The draft model `name` (a model this server offers), loaded once and kept in lm.drafts,
        its vocabulary checked against this model's; else a 400 naming `who` (the request's field,
        or the server's --speculate)."""
        draft = self.lm.drafts.get(name)
        if draft is not None:
            return draft
        if self.load_draft is None:
            raise BadRequest("speculate: this server has no draft models; use \"ngram\"", param="speculate")
        try:
            draft = self.load_draft(name)
        except OwnlmError as e:  # not offered, or not loadable
            raise BadRequest(f"{who}={name!r} is neither \"ngram\" nor a model this server offers: {e}",
                             "a draft is a smaller model with the same tokenizer, among GET /v1/models",
                             param="speculate") from None
        try:
            self.lm.speculator(draft)  # the vocabulary check
        except BadRequest as e:
            hint = e.hint if who == "speculate" else 'send "speculate": "none" to decode without it'
            raise BadRequest(f"{who}: {e.message}", hint, param="speculate") from None
        self.lm.drafts[name] = draft
        return draft


SERVER_DEFAULT = "the server's --speculate"  # who asked for a draft that the request did not name


def model_id(name: str) -> str:
    """The API's name for a store entry: `name` for the latest tag, else `name:tag`."""
    return name.removesuffix(":latest")


def api_id(ref: str) -> str:
    """The API's name for a model given at start: store names as `model_id`, BASE+ADAPTER part by part."""
    base, adapter = split_adapter(ref)
    parts = [base] if adapter is None else [base, adapter]
    return "+".join(model_id(p) if parse_ref(p).kind == "name" else p for p in parts)


def _store_adapter(name: str) -> str | None:
    """The store's full name of an adapter a client named (`ownlm tune` output), else None."""
    with contextlib.suppress(OwnlmError, OSError, ValueError):
        ref = parse_ref(name)
        store = Store()
        if ref.kind == "name" and store.has(ref.full_name) and store.read(ref.full_name).get("format") == "peft":
            return ref.full_name
    return None


class ModelPool:
    def __init__(self, refs: list[str] | None = None, keep_alive: float = 300.0, max_loaded: int = 1,
                 max_running: int = 8, max_queue: int = 64, device: str | None = None, dtype: str | None = None,
                 quant: str = "auto", loader: Callable[..., LoadedModel] = load,
                 max_tokens: int = DEFAULT_MAX_TOKENS, prompt_cache: tuple[str, int] | None = None,
                 speculate: str | None = None):
        """`loader(ref, device=, dtype=, quant=, pull_missing=False)` makes a LoadedModel of a
        reference: `ownlm.load`, or in tests a function handing out models built in memory.
        `max_tokens` caps the answer of a chat request that sets no max_tokens (one that does may
        ask for up to what the context holds). `prompt_cache`: (folder, byte bound) where each
        model's prefix cache also keeps its blocks (`ownlm serve --prompt-cache`). `speculate`:
        "ngram" or a draft model this pool offers, for requests that set no `speculate` of their own
        (`ownlm serve --speculate`)."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer (got {max_tokens!r})")
        self.fixed = {api_id(r): r for r in (refs or [])}
        self.keep_alive, self.max_loaded = keep_alive, max_loaded
        self.max_running, self.max_queue = max_running, max_queue
        self.device, self.dtype, self.quant, self.loader = device, dtype, quant, loader
        self.max_tokens = max_tokens
        self.prompt_cache, self.speculate = prompt_cache, speculate
        self.driver = Driver()
        self.loaded: dict[str, Served] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    def available(self) -> dict[str, str]:
        """{API id: reference to load}: the models named at start, or else everything in the store."""
        if self.fixed:
            return dict(self.fixed)
        return {model_id(row["name"]): row["name"] for row in list_models() if "error" not in row}

    def created(self, ref: str) -> int:
        """When a model was made, in unix seconds: its store manifest's `created` (for BASE+ADAPTER,
        the adapter's), a path's modification time; 0 when unknown (a catalog alias not pulled)."""
        with contextlib.suppress(OwnlmError, OSError, ValueError, TypeError):
            base, adapter = split_adapter(ref)
            ref = adapter or base
            parsed = parse_ref(ref)
            if parsed.kind == "path":
                return int(parsed.path.stat().st_mtime)
            store = Store()
            if parsed.kind == "name" and store.has(parsed.full_name):
                stamp = store.read(parsed.full_name).get("created")
                return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
        return 0

    def ref_for(self, model: str) -> tuple[str, str]:
        """(API id, reference to load) for a requested model name."""
        models = self.available()
        for mid in (model, model_id(model)):
            if mid in models:
                return mid, models[mid]
        base, _, adapter = model.rpartition("+")  # BASE+ADAPTER: an offered base with an adapter from the store
        for mid in (base, model_id(base)):
            ref = models.get(mid)
            full = _store_adapter(adapter.strip()) if ref and "+" not in mid else None
            if full:
                return f"{mid}+{model_id(full)}", f"{ref}+{full}"
        raise ModelNotFound(f"the model {model!r} does not exist",
                            f"this server offers: {', '.join(sorted(models)) or 'nothing yet (ownlm pull)'}")

    def _load(self, mid: str, ref: str) -> Served:
        lm = self.loader(ref, device=self.device, dtype=self.dtype, quant=self.quant, pull_missing=False)
        if self.prompt_cache is not None:
            prefix_cache.persist(lm.model, self.prompt_cache[0], lm.manifest.get("digest") or lm.name,
                                 self.prompt_cache[1])
        sched = Scheduler(lm.model, max_running=self.max_running, max_queue=self.max_queue, driver=self.driver)
        return Served(mid, lm, sched, int(time.time()), Embedder(lm.model), max_tokens=self.max_tokens,
                      load_draft=lambda name: self._draft(name, lm),
                      # a draft model itself decodes plainly: drafting for itself would only double the work
                      speculate=None if self.speculate and model_id(self.speculate) == mid else self.speculate)

    def _draft(self, name: str, lm: LoadedModel) -> LoadedModel:
        """A model this server offers, loaded as a draft for `lm` (on its device; not counted in
        max_loaded: it lives as long as `lm`, in lm.drafts)."""
        _, ref = self.ref_for(name)
        return self.loader(ref, device=str(lm.model.device), dtype=self.dtype, quant=self.quant, pull_missing=False)

    async def acquire(self, model: str) -> Served:
        """The loaded model for an API name, loading it (in a worker thread) on first use. The
        caller must `release` it."""
        mid, ref = self.ref_for(model)
        lock = self.locks.setdefault(mid, asyncio.Lock())
        async with lock:
            served = self.loaded.get(mid)
            if served is None:
                self._make_room()
                served = await asyncio.to_thread(self._load, mid, ref)
                self.loaded[mid] = served
            served.active += 1
            served.last_used = time.monotonic()
            return served

    def preload(self) -> None:
        """Load the first `max_loaded` models now, before any request (`ownlm serve --preload`)."""
        for mid, ref in list(self.available().items())[: self.max_loaded]:
            if mid not in self.loaded:
                served = self._load(mid, ref)
                if served.speculate not in (None, NGRAM):  # the default draft too, its vocabulary checked now
                    served.draft(served.speculate, SERVER_DEFAULT)
                self.loaded[mid] = served

    def release(self, served: Served) -> None:
        served.active -= 1
        served.last_used = time.monotonic()

    def _make_room(self) -> None:
        while len(self.loaded) >= self.max_loaded:
            idle = [s for s in self.loaded.values() if s.active == 0]
            if not idle:
                raise PoolFull(f"{len(self.loaded)} model(s) are loaded and busy (--max-loaded {self.max_loaded})",
                               "retry later, or start the server with a larger --max-loaded")
            self.unload(min(idle, key=lambda s: s.last_used).id)

    def unload(self, mid: str) -> None:
        served = self.loaded.pop(mid, None)
        if served is not None:
            served.scheduler.close()
            served.embedder.close()

    def reap(self) -> None:
        """Unload models idle for longer than the keep-alive (keep_alive < 0: never)."""
        now = time.monotonic()
        for s in list(self.loaded.values()):
            keep = self.keep_alive if s.keep_alive is None else s.keep_alive
            if keep < 0:
                continue
            if (s.active == 0 and now - s.last_used > keep and s.scheduler.stats()["running"] == 0
                    and s.embedder.stats()["running"] == 0):
                self.unload(s.id)

    def close(self) -> None:
        for mid in list(self.loaded):
            self.unload(mid)
