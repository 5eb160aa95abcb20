"""Tokenizers from checkpoint metadata: a HF `tokenizers.Tokenizer` plus the special-token facts
the model declares (BOS, EOS / stop tokens, whether BOS is added)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import ModelFormatError
from ..text.tokenizer import TokenizerSpec
from ..model.metadata import GENERATION_CONFIG, TOKENIZER_CONFIG
from .hf import MAX_JSON, read_bytes, read_object

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# Falcon: runs of punctuation and ASCII symbols first, then GPT-2's pieces, then digit runs cut
# into threes (llama.cpp's three regexes for "falcon", applied one after the other)
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
           r"[0-9][0-9][0-9]")


# llama.cpp's default (a GGUF whose tokenizer.ggml.pre is "default" or missing): punctuation runs,
# GPT-2's pieces, digit runs, then digit runs cut into threes
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            r"\p{N}+", r"[0-9][0-9][0-9]")


def _split(*patterns: str) -> list:
    """Each regex splits every piece so far (matches and the text between them kept, as llama.cpp's
    unicode_regex_split does), then the pieces are mapped to GPT-2's byte-level alphabet."""
    return [*(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]


# llama.cpp's `tokenizer.ggml.pre` names -> pre-tokenizer pipeline (as llama.cpp's llama-vocab does)
PRE_TOKENIZERS: dict[str, Any] = {
    "gpt-2": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "default": lambda: _split(*_DEFAULT),
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True),
                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "starcoder": lambda: [pre_tokenizers.Digits(individual_digits=True),
                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "llama-bpe": lambda: _split(_LLAMA3),
    "llama3": lambda: _split(_LLAMA3),
    "qwen2": lambda: _split(_QWEN2),
    "falcon": lambda: _split(*_FALCON),
    # GPT-2's own regex, under the names llama.cpp's converter gives these families' tokenizers
    "mpt": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
    "olmo": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
}
IGNORE_MERGES = {"llama-bpe", "llama3"}


def _array(meta: Mapping[str, Any], key: str, n: int) -> list:
    v = meta.get(key)
    if v is None:
        return []
    v = list(v) if not hasattr(v, "tolist") else v.tolist()
    if len(v) != n:
        raise ModelFormatError(f"GGUF: {key} has {len(v)} entries for {n} tokens")
    return v


def _id(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    v = int(v)
    if not 0 <= v < n:
        raise ModelFormatError(f"GGUF: {key}={v} is outside the vocabulary of {n}")
    return v


def from_gguf(meta: Mapping[str, Any], where: str = "GGUF") -> TokenizerSpec:
    """The tokenizer of a GGUF file's metadata (checked against model/metadata.py's schema as
    formats/gguf.py reads it)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFormatError("GGUF: tokenizer.ggml.tokens is missing", "this file carries no tokenizer")
    n = len(tokens)
    types = _array(meta, "tokenizer.ggml.token_type", n) or [NORMAL] * n
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind not in ("gpt2", "llama"):
        raise ModelFormatError(f"GGUF: tokenizer model {kind!r} is not supported",
                               "supported: gpt2 (BPE), llama (SentencePiece)")
    try:
        tk, add_bos_default = _gguf_tokenizer(meta, kind, tokens, types, vocab)
        specials = [AddedToken(tokens[i], special=True, normalized=False) for i in range(n) if types[i] == CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False) for i in range(n) if types[i] == USER_DEFINED]
        tk.add_special_tokens(specials)
        if user:
            tk.add_tokens(user)
    except ModelFormatError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions: merges naming tokens the vocabulary lacks, ...
        raise ModelFormatError(f"{where}: tokenizer.ggml.tokens / merges do not make a tokenizer ({str(e)[:200]})",
                               "the file is corrupt or its tokenizer is not supported") from None
    bos = _id(meta, "tokenizer.ggml.bos_token_id", n)
    eos = _id(meta, "tokenizer.ggml.eos_token_id", n)
    eot = _id(meta, "tokenizer.ggml.eot_token_id", n)
    eos_ids = [i for i in (eos, eot) if i is not None]
    return TokenizerSpec(tk, bos, list(dict.fromkeys(eos_ids)),
                         bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None,
                         tokens[bos] if bos is not None else "", tokens[eos] if eos is not None else "")


def _gguf_tokenizer(meta: Mapping[str, Any], kind: str, tokens: list[str], types: list[int],
                    vocab: dict[str, int]) -> tuple[Tokenizer, bool]:
    """(tokenizer, whether BOS is added by default) of a gpt2 (BPE) or llama (SentencePiece) vocabulary."""
    n = len(tokens)
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ModelFormatError(f"GGUF: pre-tokenizer {pre!r} is not supported",
                                   f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        merges = []
        for m in meta.get("tokenizer.ggml.merges") or []:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ModelFormatError(f"GGUF: merge {m!r} is not two tokens")
            merges.append((a, b))
        tk = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in IGNORE_MERGES))
        tk.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre]())
        tk.decoder = decoders.ByteLevel()
        return tk, False
    scores = _array(meta, "tokenizer.ggml.scores", n) or [0.0] * n
    tk = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types, vocab),
                              unk_token=tokens[_id(meta, "tokenizer.ggml.unknown_token_id", n) or 0],
                              fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Prepend("▁")] if prefix else []
    tk.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk, True


# the most cuts _spm_merges looks at, and characters its merges hold: real SentencePiece vocabularies
# (256k pieces) stay far below both; a hostile one (pieces "a", "aa", ... of every length) would
# otherwise cost time and memory cubic in its longest piece
MAX_SPM_CUTS = 1 << 24
MAX_SPM_MERGE_CHARS = 1 << 26


def _spm_merges(tokens: list[str], scores: list[float], types: list[int],
                vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE model: every split of a piece into two
    pieces of the vocabulary, ranked by the merged piece's score (higher merges first). Only cuts
    where both halves have the length of some piece are tried: a piece costs the number of
    distinct piece lengths, not the square of its own length (one 250k-character token). A
    vocabulary whose cuts or merges pass MAX_SPM_CUTS / MAX_SPM_MERGE_CHARS is refused."""
    lengths = sorted({len(t) for t in tokens})
    present = set(lengths)
    ranked = []
    cuts = chars = 0
    for i, piece in enumerate(tokens):
        size = len(piece)
        if types[i] not in (NORMAL, USER_DEFINED) or size < 2:
            continue
        for cut in lengths:
            if cut >= size:
                break
            cuts += 1
            if size - cut not in present:
                continue
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], vocab[a], vocab[b], i, cut))
                chars += size
        if cuts > MAX_SPM_CUTS or chars > MAX_SPM_MERGE_CHARS:
            raise ModelFormatError("GGUF: tokenizer.ggml.tokens splits into more SentencePiece merges than any real "
                                   f"vocabulary (over {MAX_SPM_CUTS} cuts or {MAX_SPM_MERGE_CHARS} characters)")
    ranked.sort()
    return [(tokens[i][:cut], tokens[i][cut:]) for *_, i, cut in ranked]


def _post_adds(tk: Tokenizer, token: str | None) -> bool:
    """Whether the tokenizer's post-processor (TemplateProcessing, alone or in a Sequence) puts
    `token` before a single text."""
    if not token:
        return False
    post = json.loads(tk.to_str()).get("post_processor") or {}
    steps = post.get("processors") or [] if post.get("type") == "Sequence" else [post]
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            first = (step.get("single") or [{}])[0]
            return isinstance(first, dict) and (first.get("SpecialToken") or {}).get("id") == token
    return False


def _token_text(v: Any) -> str:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def from_hf(files: Mapping[str, Path]) -> tuple[TokenizerSpec, Any]:
    """(tokenizer, chat_template) from tokenizer.json + tokenizer_config.json (+ generation_config),
    each read within hf.MAX_JSON bytes (tokenizers' own parser bounds the nesting of tokenizer.json)."""
    try:
        tk = Tokenizer.from_str(read_bytes(files["tokenizer.json"], MAX_JSON).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"tokenizer.json is not UTF-8 ({e})") from None
    except Exception as e:  # tokenizers raises plain Exceptions for bad files
        if isinstance(e, ModelFormatError):
            raise
        raise ModelFormatError(f"tokenizer.json cannot be read: {str(e)[:200]}") from None
    tcfg = read_object(files["tokenizer_config.json"], TOKENIZER_CONFIG) if "tokenizer_config.json" in files else {}
    gcfg = read_object(files["generation_config.json"], GENERATION_CONFIG) if "generation_config.json" in files else {}
    bos_tok, eos_tok = _token_text(tcfg.get("bos_token")), _token_text(tcfg.get("eos_token"))
    bos = tk.token_to_id(bos_tok) if bos_tok else None
    eos_ids: list[int] = []
    if eos_tok and tk.token_to_id(eos_tok) is not None:
        eos_ids.append(tk.token_to_id(eos_tok))
    extra = gcfg.get("eos_token_id")
    for i in extra if isinstance(extra, list) else [extra] if extra is not None else []:
        if 0 <= i < tk.get_vocab_size(with_added_tokens=True):
            eos_ids.append(i)
    # BOS as tokenizer_config.json says, or (Llama 3, which does not say) as tokenizer.json's own
    # post-processor adds it to a text, as transformers encodes
    add_bos = tcfg["add_bos_token"] if "add_bos_token" in tcfg else _post_adds(tk, bos_tok)
    spec = TokenizerSpec(tk, bos, list(dict.fromkeys(eos_ids)), bool(add_bos) and bos is not None, bos_tok, eos_tok)
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return spec, template if isinstance(template, str) else None
