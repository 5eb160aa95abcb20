"""Automatic prefix caching: the keys and values of prompts already seen, reused by every later
sequence that starts with the same tokens, so it prefills only what comes after them.

Keys and values are kept in blocks of BLOCK positions. A block is found by a chained digest:
blake2b(the digest of the block before + its tokens), the first block's "before" being the
cache's root, so a block's digest names the whole prefix up to its end (as in vLLM's automatic
prefix caching). A block also keeps its tokens, compared on every match, so a digest collision
can only cost a miss. Only whole blocks are kept and reused.

The engine's KV cache is contiguous per slot (kv_cache.py): a hit copies the blocks' keys and
values into the slot's first positions, a memory copy far cheaper than the forward it replaces.
Every layer's whole K/V is kept, for sliding-window layers too (the KV cache holds all positions
and the window is a mask), so Mistral's window and Gemma 3's local layers reuse exactly.

Blocks are counted in bytes against a budget. A lookup pins the blocks it returns (reference
counts) until `release`; only unpinned blocks without cached children are evicted, least
recently used first. When nothing can be evicted, a store stops (nothing is held past the budget).
Emptying the cache (`clear`) frees the unpinned blocks at once; a pinned one leaves the tree (no
later lookup finds it) but stays counted until its last hit is released, since its memory is held
until then.

Exactness: a reused position holds the very bits the model wrote for that token prefix, and the
rest of the prompt is prefilled from there. That forward has fewer query rows than one from
position 0. Reuse therefore ends on a block boundary and leaves at least MIN_PREFILL tokens to
compute, so the rows fall into the same prefill chunks as without the cache. On a CPU with ownlm's
kernels each prompt row also attends as a one-token decode step (model/ops.py: rows_attend), and
the kernels' matmuls give a row the same bits in any batch: logits and greedy tokens are then bit
for bit those without the cache, also where the reused blocks were written by decode steps (the
previous turn's answer). Elsewhere (PyTorch's float matmuls, SDPA, another device) a matmul may
group its sums differently for another row count: logits agree within float rounding (tests:
1e-4 in float32), so greedy tokens are the same unless two logits tie within that much. A request
that scores its prompt (prompt logprobs) is computed whole, never from the cache.

One PrefixCache per model, made on first use (`of`); it is emptied when the model's structure
changes (an adapter attached or merged, weights reloaded, the model moved).

With a Disk (`ownlm run/serve --prompt-cache DIR`), every block kept is also written to a file
named by its digest, in a folder of its own per model identity (its store digest, a digest of
samples of its weights as loaded, so dtype, quantization and adapters count, the device kind),
and a block missing in memory is looked for there: a later process starts with the prompts of
earlier ones, and processes sharing the folder find the blocks each other writes. Files are
written beside their place and renamed into it, hold their model identity, parent digest, tokens,
shape and a checksum, and are refused (and removed, with a warning) when any of it is wrong; the
folder is kept under a byte bound by removing the least recently used files (as far as each
process has seen them). Files are written by one background thread (`_Writer`), never by the thread
that stores, nor under the cache's lock: a slow disk delays the files, not the requests. Its queue
is bounded; a block that does not fit is not written (it is only a cache). The queue is emptied
before a folder is opened (a second server in the process finds the first's blocks) and when the
process exits normally; `flush` waits for it."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import warnings
import weakref
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .. import fsutil
from ..errors import BadRequest
from .kv_cache import KVCache, free_memory

BLOCK = 16  # positions per block: small enough that a short shared system prompt is reused
MIN_PREFILL = 2  # prompt tokens always computed (the last gives the logits)
DEFAULT_SHARE = 8  # without a budget set: this fraction of the memory free now ...
DEFAULT_CAP = 2 << 30  # ... and at most this many bytes
WRITE_QUEUE = 1 << 30  # bytes of blocks waiting for their files, at most (mostly blocks the cache holds anyway)


class _Block:
    __slots__ = ("key", "parent", "tokens", "kv", "refs", "children", "nbytes")

    def __init__(self, key: bytes, parent: "_Block | None", tokens: tuple[int, ...], kv: torch.Tensor | None):
        self.key, self.parent, self.tokens, self.kv = key, parent, tokens, kv
        self.refs = 0
        self.children: dict[bytes, _Block] = {}
        self.nbytes = kv.numel() * kv.element_size() if kv is not None else 0


@dataclass
class Hit:
    """The cached start of a token sequence: `length` positions, from `blocks`, pinned until released."""

    length: int = 0
    blocks: list[_Block] = field(default_factory=list)
    owner: "PrefixCache | None" = None
    released: bool = False

    def release(self) -> None:
        if self.owner is not None:
            self.owner.release(self)


def _digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def _versions(params: list[torch.Tensor]) -> int:
    try:
        return sum(p._version for p in params)
    except RuntimeError:  # inference tensors keep no version: they cannot be changed in place either
        return 0


def default_budget(device: torch.device) -> int:
    return min(free_memory(torch.device(device)) // DEFAULT_SHARE, DEFAULT_CAP)


MAGIC = b"ownlm-kv1\n"
_DTYPES = {str(t): t for t in (torch.float32, torch.bfloat16, torch.float16)}


class _Writer:
    """The one thread of the process that writes blocks to their files (`Disk.write`), in the order
    queued. The thread that stores only queues a reference to the block's keys and values (a tensor
    nothing writes to again), so a slow disk never stalls a request nor holds the cache's lock.
    The queue is bounded in bytes (WRITE_QUEUE, and the storing cache's own budget: blocks it has
    evicted may still wait here); a block that does not fit is dropped, the caller never waits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.cond = threading.Condition()
        self.jobs: deque[tuple] = deque()
        self.queued = 0  # bytes of the blocks queued or being written
        self.added = self.done = 0  # jobs ever queued, ever finished: a flush waits for done to reach added
        self.thread: threading.Thread | None = None

    def put(self, disk: "Disk", key: bytes, parent: bytes, tokens: tuple[int, ...], kv: torch.Tensor,
            cap: int | None = None) -> bool:
        """Queue a block's file; False when the queue would hold more than its limit or `cap`
        bytes (the block is not written)."""
        nbytes = kv.numel() * kv.element_size()
        ready = None
        if kv.is_cuda:  # the copy that made kv may still run on the caller's stream: the writer waits for it
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(kv.device))
        with self.cond:
            if self.queued + nbytes > (self.limit if cap is None else min(self.limit, cap)):
                return False
            self.jobs.append((disk, key, parent, tokens, kv, ready, nbytes))
            self.queued += nbytes
            self.added += 1
            if self.thread is None or not self.thread.is_alive():  # started on first use
                self.thread = threading.Thread(target=self._run, name="ownlm-prompt-cache-writer", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        return True

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.jobs)
                disk, key, parent, tokens, kv, ready, nbytes = self.jobs.popleft()
            try:
                if ready is not None:
                    ready.synchronize()
                disk.write(key, parent, tokens, kv)
            except Exception as e:  # the thread must outlive any one block, or flush would wait forever
                warnings.warn(f"prompt cache: cannot write a block to {disk.dir}: {e}", stacklevel=1)
            finally:
                del kv  # not kept alive (device memory, maybe) while waiting for the next block
                with self.cond:
                    self.queued -= nbytes
                    self.done += 1
                    self.cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every block queued so far is written (or dropped); False if `timeout` seconds
        passed first."""
        with self.cond:
            target = self.added
            return self.cond.wait_for(lambda: self.done >= target, timeout)


_writer = _Writer(WRITE_QUEUE)


def flush(timeout: float | None = None) -> bool:
    """Wait until the prompt-cache files queued so far are on disk; False if `timeout` passed first."""
    return _writer.flush(timeout)


atexit.register(flush)  # runs while the writer (a daemon thread) still does: a clean exit leaves its blocks written


class Disk:
    """Blocks kept in files under `folder/<identity digest>/`, at most `limit` bytes of them."""

    def __init__(self, folder: str | os.PathLike, identity: str, limit: int):
        flush()  # the blocks an earlier Disk of this process queued (a model reloaded) are in the folder first
        self.identity, self.limit = identity, limit
        self.dir = Path(folder).expanduser() / hashlib.sha256(identity.encode()).hexdigest()[:32]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fsutil.sweep(self.dir)
            about = self.dir / "model.json"
            if about.exists():
                owner = json.loads(about.read_text()).get("identity")
                if owner != identity:
                    raise BadRequest(f"{self.dir} holds the prompt cache of another model ({owner})",
                                     "give --prompt-cache another folder, or empty this one")
            else:
                with fsutil.atomic_file(about) as tmp:
                    tmp.write_text(json.dumps({"identity": identity}))
        except OSError as e:
            raise BadRequest(f"cannot use {folder} for the prompt cache: {e}") from None
        except ValueError:
            raise BadRequest(f"{self.dir / 'model.json'} is damaged", "empty the folder") from None
        self.lock = threading.Lock()
        self.sizes = {p.name: p.stat().st_size for p in sorted(self.dir.glob("*.kv"), key=lambda p: p.stat().st_mtime)}
        self.held = sum(self.sizes.values())
        self._trim()  # a folder left larger (a smaller bound now, or files copied in) shrinks at once

    def _trim(self, bound: int | None = None) -> None:
        """Remove the least recently used files until the folder holds at most `bound` bytes (its
        limit by default; the caller holds the lock, or is __init__)."""
        bound = self.limit if bound is None else bound
        while self.held > bound and self.sizes:
            old = next(iter(self.sizes))
            self.held -= self.sizes.pop(old)
            (self.dir / old).unlink(missing_ok=True)

    def _path(self, key: bytes):
        return self.dir / f"{key.hex()}.kv"

    def _known(self, name: str) -> bool:
        """Whether the folder holds file `name`: one this Disk has seen, or one another process
        sharing the folder wrote since it opened (counted from now on, as the most recent)."""
        with self.lock:
            if name in self.sizes:
                return True
        try:
            size = (self.dir / name).stat().st_size
        except OSError:
            return False
        if size > self.limit:  # another process's, with a larger bound: left alone (counting it would remove it)
            return False
        with self.lock:
            if name not in self.sizes:
                self.sizes[name] = size
                self.held += size
                self._trim()  # the oldest files go first: this one is the newest
            return name in self.sizes

    def save(self, key: bytes, parent: bytes, tokens: tuple[int, ...], kv: torch.Tensor,
             cap: int | None = None) -> bool:
        """Queue the block's file for the writer thread (kv is kept, not copied: nothing writes to
        a block's keys and values after it is made); False when the queue is full (or would hold
        more than `cap` bytes) and it is dropped."""
        return _writer.put(self, key, parent, tokens, kv, cap)

    def write(self, key: bytes, parent: bytes, tokens: tuple[int, ...], kv: torch.Tensor) -> None:
        """Write the block's file now (the writer thread's work; `save` queues it)."""
        name = self._path(key).name
        if self._known(name):  # written before, by this process or another sharing the folder
            return
        head = json.dumps({"identity": self.identity, "parent": parent.hex(), "tokens": list(tokens),
                           "dtype": str(kv.dtype), "shape": list(kv.shape)}).encode()
        raw = kv.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        body = MAGIC + len(head).to_bytes(4, "little") + head + raw
        data = body + hashlib.blake2b(body, digest_size=16).digest()
        if len(data) > self.limit:
            return
        final = self._path(key)
        tmp = fsutil.tmp_sibling(final)
        with self.lock:  # room first, so that the folder never holds more than its bound
            self._trim(self.limit - len(data))
        try:  # renamed into place whole; no fsync: a file torn by a crash fails its checksum
            tmp.write_bytes(data)
            os.replace(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"prompt cache: cannot write {final}: {e}", stacklevel=2)
            return
        with self.lock:
            self.held += len(data) - self.sizes.pop(name, 0)
            self.sizes[name] = len(data)
            self._trim()

    def read(self, key: bytes, parent: bytes, tokens: tuple[int, ...], device) -> torch.Tensor | None:
        """The block's keys and values, or None: absent, or refused (damaged, another model's or
        another prefix's file: removed, with a warning)."""
        path = self._path(key)
        if not self._known(path.name):
            return None
        with self.lock:
            if path.name not in self.sizes:  # trimmed meanwhile
                return None
            self.sizes[path.name] = self.sizes.pop(path.name)  # most recently used now
        try:
            data = path.read_bytes()
            os.utime(path)  # the least recently used go first, in a later process too
        except OSError:  # gone (another process sharing the folder trimmed it): not counted any more
            with self.lock:
                self.held -= self.sizes.pop(path.name, 0)
            return None
        why = None
        body, check = data[:-16], data[-16:]
        if not body.startswith(MAGIC) or hashlib.blake2b(body, digest_size=16).digest() != check:
            why = "it is damaged (checksum)"
        else:
            n = int.from_bytes(body[len(MAGIC):len(MAGIC) + 4], "little")
            start = len(MAGIC) + 4
            try:
                head = json.loads(body[start:start + n])
                dtype = _DTYPES[head["dtype"]]
                shape = [int(x) for x in head["shape"]]
            except (ValueError, KeyError, TypeError):
                head, why = {}, "its header is damaged"
            if why is None and head.get("identity") != self.identity:
                why = f"it belongs to another model ({head.get('identity')})"
            try:
                if why is None and (head.get("parent") != parent.hex() or tuple(head.get("tokens", ())) != tokens):
                    why = "it holds another prefix"
                if why is None:
                    raw = bytearray(body[start + n:])
                    if len(raw) != dtype.itemsize * int(torch.Size(shape).numel()) or not raw:
                        why = "its size is wrong"
                    else:
                        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape).to(device)
            except (ValueError, TypeError, RuntimeError) as e:  # fields of the wrong kind, shapes that do not fit
                why = f"its header is damaged ({type(e).__name__})"
        warnings.warn(f"prompt cache: refused {path}: {why}; removed", stacklevel=2)
        with self.lock:
            self.held -= self.sizes.pop(path.name, 0)
        path.unlink(missing_ok=True)
        return None


class PrefixCache:
    def __init__(self, budget: int, block: int = BLOCK, disk: Disk | None = None):
        if budget < 0 or block < 1:
            raise ValueError("the budget must be >= 0 bytes and the block >= 1 position")
        self.budget, self.block, self.disk = budget, block, disk
        self.lock = threading.RLock()
        self.identity: tuple | None = None
        self._params: tuple | None = None  # (model.structure, its parameters)
        seed = b"ownlm-prefix" + (disk.identity.encode() if disk is not None else b"")
        self.root = _Block(_digest(seed, ()), None, (), None)
        self.lru: OrderedDict[bytes, _Block] = OrderedDict()  # every block, least recently used first
        self.detached: set[_Block] = set()  # blocks out of the tree by `clear`, pinned by a hit still
        self.held = 0  # bytes of keys and values held: of the blocks in lru and in detached
        self.hits = self.misses = self.cached_tokens = self.evictions = 0

    # --- lookups ---------------------------------------------------------------------------------

    def lookup(self, model, tokens: Sequence[int], cache: KVCache, limit: int | None = None) -> Hit:
        """The longest cached prefix of tokens[:limit] in whole blocks, its blocks pinned; by
        default the limit leaves MIN_PREFILL tokens to compute (so the forward that follows has a
        position to give logits for)."""
        limit = len(tokens) - MIN_PREFILL if limit is None else min(limit, len(tokens))
        hit = Hit(owner=self)
        with self.lock:
            self._check(model, cache)
            node, pos, bs = self.root, 0, self.block
            try:
                while pos + bs <= limit:
                    part = tuple(tokens[pos:pos + bs])
                    key = _digest(node.key, part)
                    child = node.children.get(key)
                    if (child is None or child.tokens != part) and self.disk is not None:
                        child = self._from_disk(node, key, part, cache)
                    if child is None or child.tokens != part:
                        break
                    hit.blocks.append(child)
                    child.refs += 1  # pinned at once: a block read from disk may need room
                    node, pos = child, pos + bs
            except BaseException:  # (out of memory reading a block): nothing stays pinned
                hit.release()
                raise
            hit.length = pos
            for b in reversed(hit.blocks):  # the deepest first: ancestors stay the more recent
                self.lru.move_to_end(b.key)
            if hit.length:
                self.hits += 1
                self.cached_tokens += hit.length
            else:
                self.misses += 1
        return hit

    def load(self, hit: Hit, cache: KVCache, slot: int) -> None:
        """Copy a hit's keys and values into positions 0..hit.length of a slot (which must have room)."""
        if not hit.length:
            return
        kv = torch.cat([b.kv for b in hit.blocks], dim=2)  # (2L, Hkv, length, D)
        n = len(cache.k)
        for layer in range(n):
            cache.k[layer][slot, :, :hit.length] = kv[layer]
            cache.v[layer][slot, :, :hit.length] = kv[n + layer]

    def release(self, hit: Hit) -> None:
        with self.lock:
            if hit.released:
                return
            hit.released = True
            for b in hit.blocks:
                b.refs -= 1
                if not b.refs and b in self.detached:  # cleared while pinned: its memory is free only now
                    self.detached.remove(b)
                    self.held -= b.nbytes
                    b.kv = None

    # --- stores ----------------------------------------------------------------------------------

    def store(self, model, tokens: Sequence[int], cache: KVCache, slot: int, length: int) -> int:
        """Keep the keys and values of the whole blocks in positions 0..length of a slot, which
        hold `tokens[:length]`; blocks already cached are not copied again. Returns the positions
        now cached."""
        length = min(length, len(tokens))
        bs = self.block
        if length < bs or self.budget <= 0:
            return 0
        with self.lock:
            self._check(model, cache)
            node, pos = self.root, 0
            path: list[_Block] = []
            try:
                while pos + bs <= length:
                    part = tuple(tokens[pos:pos + bs])
                    key = _digest(node.key, part)
                    child = node.children.get(key)
                    if child is None or child.tokens != part:
                        child = self._add(node, key, part, cache, slot, pos)
                        if child is None:
                            break  # no room
                    child.refs += 1  # pinned while its children are made
                    path.append(child)
                    node, pos = child, pos + bs
            finally:
                for b in reversed(path):
                    b.refs -= 1
                    self.lru.move_to_end(b.key)
            return pos

    def _add(self, parent: _Block, key: bytes, part: tuple[int, ...], cache: KVCache, slot: int,
             pos: int) -> _Block | None:
        n = len(cache.k)
        need = 2 * n * cache.n_kv * len(part) * cache.head_dim * cache.dtype.itemsize
        if not self._make_room(need):
            return None
        old = parent.children.get(key)
        if old is not None:  # a digest collision: the newer prefix wins, where the older is free
            if old.refs or old.children:
                return None
            self._drop(old)
        a, b = pos, pos + len(part)
        kv = torch.stack([cache.k[i][slot, :, a:b] for i in range(n)]
                         + [cache.v[i][slot, :, a:b] for i in range(n)])  # (2L, Hkv, T, D), a copy
        child = _Block(key, parent, part, kv)
        parent.children[key] = child
        self.lru[key] = child
        self.held += child.nbytes
        if self.disk is not None:
            # written by the writer thread, after this returns; what waits for it is bounded by the
            # budget too (an evicted block's memory is held until its file is written: in all, at
            # most twice the budget, not the budget and WRITE_QUEUE)
            self.disk.save(key, parent.key, part, kv, cap=self.budget)
        return child

    def _from_disk(self, parent: _Block, key: bytes, part: tuple[int, ...], cache: KVCache) -> _Block | None:
        assert self.disk is not None
        kv = self.disk.read(key, parent.key, part, cache.device)
        n = len(cache.k)
        if kv is None or tuple(kv.shape) != (2 * n, cache.n_kv, len(part), cache.head_dim) or kv.dtype != cache.dtype:
            return None
        if parent.children.get(key) is not None or not self._make_room(kv.numel() * kv.element_size()):
            return None
        child = _Block(key, parent, part, kv)
        parent.children[key] = child
        self.lru[key] = child
        self.held += child.nbytes
        return child

    def _make_room(self, need: int) -> bool:
        if need > self.budget:
            return False
        while self.held + need > self.budget:
            victim = next((b for b in self.lru.values() if not b.refs and not b.children), None)
            if victim is None:
                return False
            self._drop(victim)
            self.evictions += 1
        return True

    def _drop(self, b: _Block) -> None:
        del b.parent.children[b.key]
        del self.lru[b.key]
        self.held -= b.nbytes
        b.kv = None

    # --- upkeep ----------------------------------------------------------------------------------

    def _check(self, model, cache: KVCache) -> None:
        """Empty the cache when the model, its weights or the cache layout it was filled under
        changed: a module swapped or weights loaded (model.structure), weights changed in place
        (their version counters: an optimizer step, as GRPO takes between its generations)."""
        if self._params is None or self._params[0] != model.structure:
            self._params = (model.structure, list(model.parameters()))
        identity = (model.structure, _versions(self._params[1]), cache.dtype, str(cache.device), len(cache.k),
                    cache.n_kv, cache.head_dim)
        if identity != self.identity:
            if self.identity is not None and self.disk is not None:
                # the files were made by the model as it was loaded; not for this one
                warnings.warn("prompt cache: the model changed since it was loaded; the folder is no longer used",
                              stacklevel=3)
                self.disk = None
            self.clear()
            self.identity = identity

    def clear(self) -> None:
        """Empty the tree: no later lookup finds a block kept before. Unpinned blocks are freed now;
        a block pinned by a hit stays alive (its sequence copies it), out of the tree, and counted
        in `held` until its last hit is released, so the budget bounds the memory really held."""
        with self.lock:
            for b in self.lru.values():
                b.children.clear()
                if b.refs:
                    self.detached.add(b)
                else:
                    self.held -= b.nbytes
                    b.kv = None
            self.root = _Block(self.root.key, None, (), None)
            self.lru.clear()

    def resize(self, budget: int) -> None:
        with self.lock:
            self.budget = budget
            while self.held > budget:
                victim = next((b for b in self.lru.values() if not b.refs and not b.children), None)
                if victim is None:
                    break
                self._drop(victim)
                self.evictions += 1

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"hits": self.hits, "misses": self.misses, "cached_tokens": self.cached_tokens,
                    "bytes": self.held, "budget": self.budget, "blocks": len(self.lru) + len(self.detached),
                    "evictions": self.evictions}


# --- one cache per model ------------------------------------------------------------------------

_caches: "weakref.WeakKeyDictionary[torch.nn.Module, PrefixCache]" = weakref.WeakKeyDictionary()
_budget: int | None = None  # bytes per model's cache; None: default_budget
_lock = threading.Lock()


def configure(budget: int | None) -> None:
    """The budget in bytes of every model's prefix cache, those made already included (0: off;
    None: the default, min(1/8 of the memory free, 2 GiB), reckoned when a model's cache is made)."""
    global _budget
    if budget is not None and budget < 0:
        raise ValueError("a prefix cache budget is >= 0 bytes")
    with _lock:
        _budget = budget
        caches = list(_caches.values())
    if budget is not None:
        for pc in caches:
            pc.resize(budget)


def configured() -> int | None:
    """The budget set by `configure` (None: the default)."""
    return _budget


def attach(model: torch.nn.Module, cache: PrefixCache | None) -> None:
    """Give a model a cache of one's own (None: back to the default on next use)."""
    with _lock:
        if cache is None:
            _caches.pop(model, None)
        else:
            _caches[model] = cache


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of the model's weights as loaded: samples of every tensor (an adapter merged into
    the weights, another quantization, another dtype each change it)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        for part in (flat[:64], flat[flat.numel() // 2:flat.numel() // 2 + 64], flat[-64:]):
            h.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def persist(model: torch.nn.Module, folder: str | os.PathLike, name: str, limit: int) -> PrefixCache:
    """Give a model a prefix cache that also keeps its blocks in `folder` (at most `limit` bytes),
    for the model named `name` (its store digest, say) as it is now; its memory budget is the
    configured one."""
    if limit <= 0:
        raise BadRequest("the prompt cache folder needs a bound above 0 bytes")
    budget = default_budget(model.device) if _budget is None else _budget
    identity = f"{name}|{fingerprint(model)}|{model.device.type}"
    pc = PrefixCache(budget, disk=Disk(folder, identity, limit))
    attach(model, pc)
    return pc


def of(model: torch.nn.Module) -> PrefixCache | None:
    """The model's prefix cache, made on first use; None when caching is off (a budget of 0)."""
    with _lock:
        pc = _caches.get(model)
        if pc is None:
            pc = _caches[model] = PrefixCache(default_budget(model.device) if _budget is None else _budget)
    return pc if pc.budget > 0 else None
