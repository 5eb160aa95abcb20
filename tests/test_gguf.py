"""GGUF reading: parity after llama.cpp-style conversion, every dequantization type, hostile files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer

import ownlm
from ownlm.errors import ModelFormatError
from ownlm.formats.gguf import GGUFFile

from .ggufs import hf_folder_to_gguf, kv_str, kv_u32, raw_gguf

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_converted_gguf_matches_transformers(hf_models, tmp_path, family):
    """A GGUF written as llama.cpp writes it (Q/K rows permuted for llama) gives transformers' logits."""
    folder = hf_models[family]
    path = hf_folder_to_gguf(folder, tmp_path / "tiny.gguf", arch=family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lm = ownlm.load(str(path), dtype="float32")
    ids = torch.randint(3, lm.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), ref(ids).logits, atol=2e-5, rtol=1e-4)
    ref_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "The quick brown fox, 123 café 🙂 <|im_end|>"
    assert lm.tokenizer.encode(text) == ref_tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_gguf_values(hf_models, tmp_path, qtype):
    """Each type reads back to the values gguf's own reader decodes, and close to the source."""
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / f"{qtype.name}.gguf", qtype=qtype)
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(path)
    checked = 0
    for t in ref.tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[t.name].shape)
        got = ours.dequantize(t.name)
        np.testing.assert_array_equal(got, want)
        checked += t.tensor_type == qtype
    assert checked >= 14
    # the reference: transformers' model with each matrix replaced by gguf's own round trip of it
    lm = ownlm.load(str(path), dtype="float32", quant="none")  # dequantized (held blocks: test_quant.py)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        for _name, p in ref_model.named_parameters():
            if p.dim() == 2:
                w = p.numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
                p.copy_(torch.from_numpy(back.reshape(w.shape)))
        ids = torch.arange(3, 40)[None]
        torch.testing.assert_close(lm.model(ids), ref_model(ids).logits, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quant_blocks_decode_like_gguf(tmp_path, qtype):
    """K-quant tensors (random blocks with sane f16 scales) decode exactly as gguf's reader does."""
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 4, 2 * block
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, tsize), dtype=np.uint8)
    # the f16 super-block scales sit at the end (d, and dmin for Q2_K/Q4_K/Q5_K): keep them finite
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    tail = 4 if qtype in (Q.Q2_K,) else 2
    if qtype in (Q.Q4_K, Q.Q5_K):
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    else:
        for off in range(tsize - tail, tsize, 2):
            raw[..., off:off + 2] = scale
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw.reshape(rows, -1), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ours = GGUFFile(tmp_path / "k.gguf").dequantize("blk.0.ffn_up.weight")
    t = gguf.GGUFReader(tmp_path / "k.gguf").tensors[0]
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, cols)
    assert ours.shape == (rows, cols) and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, want)


# -- hostile files ------------------------------------------------------------------------------
ARCH = kv_str("general.architecture", "llama")
F32 = 0


def write(tmp_path, data: bytes):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    return p


def expect_error(tmp_path, data: bytes, words: str):
    with pytest.raises(ModelFormatError) as e:
        GGUFFile(write(tmp_path, data))
    assert words in str(e.value), str(e.value)


def test_valid_minimal_file_parses(tmp_path):
    g = GGUFFile(write(tmp_path, raw_gguf([ARCH], [("t", [4], F32, 0)], np.arange(4, dtype=np.float32).tobytes())))
    assert g.architecture == "llama" and g.dequantize("t").tolist() == [0, 1, 2, 3]


def test_truncated_header(tmp_path):
    good = raw_gguf([ARCH, kv_str("general.name", "x" * 100)], [("t", [4], F32, 0)], b"\0" * 16)
    expect_error(tmp_path, good[:60], "file ends")


def test_truncated_tensor_data(tmp_path):
    good = raw_gguf([ARCH], [("t", [1024], F32, 0)], b"\0" * 4096)
    expect_error(tmp_path, good[:-100], "outside the file")


def test_absurd_tensor_count(tmp_path):
    expect_error(tmp_path, raw_gguf([ARCH], [], b"", n_tensors=1 << 60), "tensor count")


def test_absurd_kv_count(tmp_path):
    expect_error(tmp_path, raw_gguf([ARCH], [], b"", n_kv=1 << 40), "metadata count")


def test_absurd_string_length(tmp_path):
    data = raw_gguf([("general.architecture", 8, struct.pack("<Q", 1 << 62) + b"llama")], [], b"")
    expect_error(tmp_path, data, "string length")


def test_absurd_array_length(tmp_path):
    arr = ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 50))
    expect_error(tmp_path, raw_gguf([ARCH, arr], [], b""), "array")


def test_string_arrays_replace_bad_utf8_and_refuse_hostile_lengths(tmp_path):
    def strings(*items: bytes, count: int | None = None) -> bytes:
        body = b"".join(struct.pack("<Q", len(s)) + s for s in items)
        return struct.pack("<IQ", 8, len(items) if count is None else count) + body

    g = GGUFFile(write(tmp_path, raw_gguf([ARCH, ("tokenizer.ggml.tokens", 9, strings(b"a", b"\xff\xfe", b"ok"))],
                                          [], b"")))
    assert g.metadata["tokenizer.ggml.tokens"] == ["a", "\ufffd\ufffd", "ok"]
    hostile = strings(b"a") + struct.pack("<Q", 1 << 40) + b"x"
    hostile = struct.pack("<IQ", 8, 2) + hostile[12:]
    expect_error(tmp_path, raw_gguf([ARCH, ("tokenizer.ggml.tokens", 9, hostile)], [], b"\0" * 64), "string length")


def test_tensor_outside_file(tmp_path):
    expect_error(tmp_path, raw_gguf([ARCH], [("t", [4], F32, 1 << 40)], b"\0" * 16), "outside the file")


def test_unknown_quant_type(tmp_path):
    expect_error(tmp_path, raw_gguf([ARCH], [("t", [32], 250, 0)], b"\0" * 256), "unknown type id 250")


def test_bad_magic_and_version(tmp_path):
    expect_error(tmp_path, b"GGML" + b"\0" * 40, "bad magic")
    expect_error(tmp_path, raw_gguf([ARCH], [], b"", version=99), "version 99")


def test_overlapping_tensors(tmp_path):
    expect_error(tmp_path, raw_gguf([ARCH], [("a", [8], F32, 0), ("b", [8], F32, 0)], b"\0" * 64), "overlap")


def test_unknown_architecture_is_clear(tmp_path, hf_models):
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "x.gguf")
    data = path.read_bytes().replace(b"llama", b"zorba")
    bad = tmp_path / "zorba.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelFormatError) as e:
        ownlm.load(str(bad))
    assert "'zorba' is not supported" in str(e.value) and "llama" in str(e.value)


def test_wrong_shape_for_config(tmp_path, hf_models):
    path = hf_folder_to_gguf(hf_models["llama"], tmp_path / "x.gguf")
    data = bytearray(path.read_bytes())
    key = b"llama.embedding_length"
    i = data.index(key) + len(key) + 4
    data[i:i + 4] = struct.pack("<I", 128)
    bad = tmp_path / "shape.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as e:
        ownlm.load(str(bad))
    assert "shape" in str(e.value)


def test_u32_kv_helper_roundtrip(tmp_path):
    g = GGUFFile(write(tmp_path, raw_gguf([ARCH, kv_u32("llama.block_count", 7)], [], b"")))
    assert g.get("llama.block_count") == 7


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the others for
    the code points from 256 up, in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _regex_pieces(text: str, patterns: list[str]) -> list[str]:
    """llama.cpp's pre-tokenization: each regex in turn splits every piece into its matches and
    the text between them."""
    import regex

    pieces = [text]
    for p in patterns:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(p, piece):
                if m.start() > at:
                    out.append(piece[at:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                at = m.end()
            if at < len(piece):
                out.append(piece[at:])
        pieces = out
    return pieces


@pytest.mark.parametrize("pre,patterns", [
    ("falcon", [r"[\p{P}\$\+<=>\^~\|`]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"[0-9][0-9][0-9]"]),
    ("mpt", [r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"]),
])
def test_falcon_and_mpt_pre_tokenizers_cut_text_as_llama_cpp(hf_models, tmp_path, pre, patterns):
    """Pieces equal llama.cpp's regexes applied in turn (written here with the `regex` module), and
    a GGUF naming that pre-tokenizer loads and round-trips text."""
    from tokenizers import pre_tokenizers

    from ownlm.formats.tokenizer import PRE_TOKENIZERS

    text = "He's paid $1234567 (or 12,5€) -- isn't it <x>=y^2|z~`q`? \u00e9t\u00e9 9 99 999 9999  \n\n  end"
    byte = _bytes_to_unicode()
    want = ["".join(byte[b] for b in piece.encode()) for piece in _regex_pieces(text, patterns)]
    got = [p for p, _ in pre_tokenizers.Sequence(PRE_TOKENIZERS[pre]()).pre_tokenize_str(text)]
    assert got == want
    lm = ownlm.load(str(hf_folder_to_gguf(hf_models["llama"], tmp_path / "t.gguf", pre=pre)), dtype="float32")
    ids = lm.encode("print(add(2, 3)) # 1234")
    assert lm.tokenizer.decode(ids) == "print(add(2, 3)) # 1234"
