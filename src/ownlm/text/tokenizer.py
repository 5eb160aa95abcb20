"""The tokenizer wrapper the engine and the API use, and an incremental detokenizer."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Iterable

from tokenizers import Tokenizer


@dataclass
class TokenizerSpec:
    tokenizer: Tokenizer
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)  # stop tokens, the primary EOS first
    add_bos: bool = False
    bos_token: str = ""
    eos_token: str = ""


class TextTokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self.tk = spec.tokenizer
        self.bos_id = spec.bos_id
        self.eos_ids = list(spec.eos_ids)
        self.add_bos = spec.add_bos
        self.bos_token, self.eos_token = spec.bos_token, spec.eos_token

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids. BOS is
        prepended when the model asks for it (unless the text already starts with it)."""
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a piece of a character included, where decoding it alone
        would give U+FFFD): GPT-2's byte alphabet read back for a byte-level tokenizer,
        SentencePiece's <0xXX> pieces and its word marker as a space; added tokens as their text."""
        piece = self.tk.id_to_token(i)
        if piece is None:
            return b""
        if i in self._added:
            return piece.encode("utf-8")
        if self._byte_level:
            table = _gpt2_bytes()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        else:
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.decode([i]).encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        return "ByteLevel" in json.dumps(json.loads(self.tk.to_str()).get("decoder"))

    @functools.cached_property
    def _added(self) -> frozenset[int]:
        return frozenset(self.tk.get_added_tokens_decoder())


@functools.lru_cache(maxsize=1)
def _gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as, read back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    Decodes a short window of recent tokens and emits only the new, complete suffix: a byte-level
    token that ends mid-character decodes to U+FFFD, which is held back until the next token
    completes it."""

    def __init__(self, tokenizer: TextTokenizer, skip_special: bool = True):
        self.tok, self.skip = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been emitted

    def _text(self, a: int, b: int) -> str:
        return self.tok.decode(self.ids[a:b], skip_special=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._text(self.prefix, self.read)
        now = self._text(self.prefix, len(self.ids))
        if len(now) > len(before) and not now.endswith("\ufffd"):
            piece = now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end (a genuinely broken tail decodes as U+FFFD)."""
        before = self._text(self.prefix, self.read)
        now = self._text(self.prefix, len(self.ids))
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
