"""Memory that scales with the file: a synthetic 1B-parameter Llama GGUF (random Q4_0 weights)
loaded and generating, peak RSS against the target of 1.3 x the file size + 400 MB.

    python bench/memory.py [--out /tmp/ownlm-1b.gguf] [--gen 32] [--keep]

The file is written with the `gguf` package (random Q4_0 blocks: random nibbles, a fixed scale),
Llama-3.2-1B-shaped: dim 2048, 16 layers, 32 heads / 8 KV heads, ffn 8192, vocabulary 32000.
The model is loaded and generates in a child process, so its peak RSS is its own."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHAPE = dict(dim=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=32000, ctx=4096)


def q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 blocks: per 32 weights an fp16 scale (0.02) and 16 bytes of nibbles."""
    blocks = np.empty((rows, cols // 32, 18), dtype=np.uint8)
    blocks[..., :2] = np.frombuffer(np.float16(0.02).tobytes(), dtype=np.uint8)
    blocks[..., 2:] = rng.integers(0, 256, size=(rows, cols // 32, 16), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write(path: str) -> None:
    import gguf

    s, rng = SHAPE, np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("synthetic-1b")
    w.add_context_length(s["ctx"])
    w.add_embedding_length(s["dim"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(s["dim"] // s["heads"])
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    byte_chars = ([chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)]
                  + [chr(c) for c in range(174, 256)])
    byte_chars += [chr(256 + i) for i in range(256 - len(byte_chars))]  # GPT-2's byte-level alphabet, in some order
    tokens = byte_chars + [f"tok{i}" for i in range(s["vocab"] - len(byte_chars) - 1)] + ["<|eot|>"]
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(len(tokens) - 1)
    Q = gguf.GGMLQuantizationType.Q4_0
    hd = s["dim"] // s["heads"]
    w.add_tensor("token_embd.weight", q4_0(s["vocab"], s["dim"], rng), raw_dtype=Q)
    for i in range(s["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(s["dim"], dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(s["dim"], dtype=np.float32))
        for name, rows, cols in (("attn_q", s["dim"], s["dim"]), ("attn_k", s["kv_heads"] * hd, s["dim"]),
                                 ("attn_v", s["kv_heads"] * hd, s["dim"]), ("attn_output", s["dim"], s["dim"]),
                                 ("ffn_gate", s["ffn"], s["dim"]), ("ffn_up", s["ffn"], s["dim"]),
                                 ("ffn_down", s["dim"], s["ffn"])):
            w.add_tensor(f"blk.{i}.{name}.weight", q4_0(rows, cols, rng), raw_dtype=Q)
    w.add_tensor("output_norm.weight", np.ones(s["dim"], dtype=np.float32))
    w.add_tensor("output.weight", q4_0(s["vocab"], s["dim"], rng), raw_dtype=Q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def child(path: str, gen: int) -> None:
    import ownlm
    from ownlm.evaluate.bench import peak_rss_bytes

    t = time.perf_counter()
    lm = ownlm.load(path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    c = lm.generate("tok1 tok2 tok3 tok4", max_tokens=gen, temperature=0, stop_token_ids=[])
    from ownlm.model.linear import QuantEmbedding, QuantLinear

    params = sum(p.numel() for p in lm.model.parameters()) + sum(
        m.in_features * m.out_features for m in lm.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))
    print(json.dumps({"load_s": load_s, "decode_tokens_per_s": len(c.token_ids) / (time.perf_counter() - t),
                      "generated": len(c.token_ids),
                      "peak_rss_mb": peak_rss_bytes() / 2**20, "parameters": params}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ownlm-synthetic-1b.gguf")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the GGUF afterwards")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.out, a.gen)
    if not os.path.exists(a.out):
        t = time.perf_counter()
        write(a.out)
        print(f"wrote {a.out} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", "--out", a.out, "--gen", str(a.gen)],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        file_mb = os.path.getsize(a.out) / (1 << 20)
        r.update(file_mb=round(file_mb, 1), target_mb=round(1.3 * file_mb + 400, 1))
        r["within_target"] = r["peak_rss_mb"] <= r["target_mb"]
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, indent=2))
    finally:
        if not a.keep:
            os.unlink(a.out)


if __name__ == "__main__":
    main()
