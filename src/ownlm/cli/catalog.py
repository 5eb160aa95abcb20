"""catalog: the models ownlm can pull by name, their tags, and which fit this machine."""

from __future__ import annotations

import json
import sys

from ..progress import human_bytes
from ..store.catalog import RAM_CONTEXT, CatalogEntry, machine_memory, search


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _tag_row(e: CatalogEntry, tag: str, memory: int) -> dict:
    t = e.tags[tag]
    ram = e.ram_needed(tag)
    return {"tag": tag, "ref": t.ref, "repository": t.repo, "file": t.file, "size": t.size, "sha256": t.sha256,
            "ram": ram, "fits": bool(memory) and ram <= memory}


def entry_json(e: CatalogEntry, memory: int) -> dict:
    tags = {tag: _tag_row(e, tag, memory) for tag in e.tag_names()}
    default = tags[e.default_tag]
    return {"name": e.alias, "family": e.family, "description": e.description, "license": e.license,
            "parameters": e.parameters, "context_length": e.context, "default_tag": e.default_tag,
            "size": default["size"], "ram": default["ram"], "fits": default["fits"], "tags": tags}


def cmd_catalog(args) -> int:
    memory = machine_memory()
    query = args.query or ""
    entries = search(query)
    if args.json:
        print(json.dumps({"memory_bytes": memory, "ram_context_tokens": RAM_CONTEXT, "query": query,
                          "models": [entry_json(e, memory) for e in entries]}, indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print(f"no catalog model matches {query!r}; `ownlm catalog` lists them all", file=sys.stderr)
        return 0
    name = query.partition(":")[0].strip().lower()
    exact = [e for e in entries if e.alias == name]
    rows: list[tuple[str, dict, CatalogEntry]] = []
    if exact:  # one model asked for by name: every tag of it
        rows = [(f"{exact[0].alias}:{tag}", _tag_row(exact[0], tag, memory), exact[0])
                for tag in exact[0].tag_names()]
    else:
        rows = [(e.alias, _tag_row(e, e.default_tag, memory), e) for e in entries]
    print(f"{'NAME':<24} {'PARAMS':>7} {'TAG':<8} {'SIZE':>9} {'RAM':>9} {'FITS':<4}  {'LICENSE':<18} "
          f"{'TAGS' if not exact else 'FILE'}")
    for label, r, e in rows:
        last = r["repository"] + "/" + r["file"] if exact else ", ".join(e.tag_names())
        print(f"{label:<24} {_count(e.parameters):>7} {r['tag']:<8} {human_bytes(r['size']):>9} "
              f"{human_bytes(r['ram']):>9} {'yes' if r['fits'] else 'no':<4}  {e.license:<18} {last}")
    print(f"RAM: the file + a {RAM_CONTEXT:,}-token KV cache + overhead; this machine has "
          f"{human_bytes(memory) if memory else 'unknown memory'} (OWNLM_MEMORY_BYTES overrides). "
          f"Pull with `ownlm pull NAME[:TAG]`.", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("catalog", help="models ownlm can pull by name, their tags, and which fit this machine",
                       description="List the catalog: NAME[:TAG] for `ownlm pull`, the default tag's size and the "
                                   "memory it needs, and whether that fits this machine. QUERY filters by words "
                                   "(name, family, description, repository); an exact name lists all its tags.")
    p.add_argument("query", nargs="?", default="", help="words to filter by, or a model name")
    p.add_argument("--json", action="store_true", help="print the catalog as JSON")
    p.set_defaults(func=cmd_catalog)
