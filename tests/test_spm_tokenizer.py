"""A GGUF `llama` (SentencePiece BPE) vocabulary converted to `tokenizers` encodes like
sentencepiece itself, byte fallback included, and decodes back exactly."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm  # the reference (the test extra: pip install '.[test]')

from ownlm.formats.tokenizer import from_gguf
from ownlm.text.tokenizer import TextTokenizer

from .conftest import CORPUS


TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "  two leading spaces", "tabs\tand\nnewlines",
         "naïve café façade", "rare glyphs ✓ ∑ 🙂 你好", "Owning your model means nobody can change its price.",
         "def add(a, b):\n    return a + b", "12345 3.14159"]


@pytest.fixture(scope="module")
def sp_and_meta():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=420,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.98,
                                   add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=False,
                                   normalization_rule_name="identity")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id()}
    return sp, meta


def test_encodes_like_sentencepiece(sp_and_meta):
    sp, meta = sp_and_meta
    tok = TextTokenizer(from_gguf(meta))
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert any(sp.is_byte(i) for i in sp.encode("rare glyphs ✓ ∑ 🙂 你好"))  # byte fallback was exercised


def test_bos_added_as_declared(sp_and_meta):
    sp, meta = sp_and_meta
    tok = TextTokenizer(from_gguf(meta))
    assert tok.add_bos and tok.encode("Hello")[0] == sp.bos_id()
    assert TextTokenizer(from_gguf({**meta, "tokenizer.ggml.add_bos_token": False})).encode("Hello")[0] != sp.bos_id()


def test_token_bytes_join_to_the_text(sp_and_meta):
    """Each token's own bytes (a byte piece is one byte of a character, where decoding it alone
    gives U+FFFD's three): joined, they are the text's UTF-8, after the word marker's space."""
    sp, meta = sp_and_meta
    tok = TextTokenizer(from_gguf(meta))
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert b"".join(tok.token_bytes(i) for i in ids) == (" " + text).encode(), text
    pieces = [tok.token_bytes(i) for i in tok.encode("🙂", add_bos=False) if sp.is_byte(i)]
    assert pieces and all(len(b) == 1 for b in pieces)


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_a_gguf_export_of_a_metaspace_tokenizer_encodes_as_sentencepiece(tmp_path, sp_and_meta, scheme):
    """transformers writes Llama's and Mistral's SentencePiece tokenizers as a Metaspace
    pre-tokenizer that prepends the word marker (prepend_scheme "first", "always" for legacy),
    with no normalizer: the exported GGUF must say add_space_prefix, or every text's first word
    is split otherwise than sentencepiece (and the HF model) split it."""
    import gguf
    from tokenizers import Tokenizer

    import ownlm
    from ownlm.cli.main import main

    from .conftest import build_hf_model

    sp, meta = sp_and_meta
    spec = json.loads(from_gguf(meta).tokenizer.to_str())  # this vocabulary and its merges, as tokenizers holds them
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": False}
    folder = build_hf_model(tmp_path / "m", "llama", vocab_size=sp.get_piece_size(), bos_token_id=sp.bos_id(),
                            eos_token_id=sp.eos_id())
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in TEXTS:  # the file as transformers would write it encodes as sentencepiece does
        if "  " not in text:  # (runs of spaces: tokenizers' Metaspace merges them otherwise than sentencepiece)
            assert hf.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    out = tmp_path / "m.gguf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    field = gguf.GGUFReader(out).fields["tokenizer.ggml.add_space_prefix"]
    assert bool(field.parts[field.data[0]][0])
    got = ownlm.load(str(out)).tokenizer
    for text in TEXTS:
        assert got.encode(text, add_bos=False) == sp.encode(text), text
