"""Does an exported GGUF answer in llama.cpp as it does in ownlm? Exports MODEL (a model or a tuned
adapter on its base) with `ownlm export --format gguf`, then answers the same chat prompts
greedily with llama.cpp (llama-cpp-python, from bench/.llama-env or --llama-python, see
bench/compare.py) and with ownlm on that same file in float32 (llama.cpp's CPU activations are
float32), and with `ownlm run MODEL` as it is stored.

    python bench/export_llama_cpp.py bullets --prompts examples/preference/test.jsonl [--n 6]

Prompts: a JSONL file of {"prompt", optional "pattern"} rows (an `ownlm eval` generation task).
Prints one JSON object: per prompt the three answers' first characters, whether llama.cpp's
answer equals ownlm's on the same file token for token, and with a pattern whether each answer
matches it; and the counts."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import llama_python

LLAMA_CHILD = """
import json, sys
from llama_cpp import Llama
path, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=2048, verbose=False)
out = [llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0,
                                  max_tokens=max_tokens)["choices"][0]["message"]["content"] for p in prompts]
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--n", type=int, default=6, help="prompts to answer (default 6)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quant", default="f16", help="the GGUF's weights (ownlm export --quant; default f16)")
    ap.add_argument("--llama-python", help="a Python with llama-cpp-python (default: bench/.llama-env)")
    a = ap.parse_args()

    import ownlm

    rows = [json.loads(line) for line in a.prompts.read_text(encoding="utf-8").splitlines() if line.strip()][:a.n]
    prompts = [r["prompt"] for r in rows]
    folder = Path(tempfile.mkdtemp(prefix="ownlm-export-check-"))
    gguf = folder / "model.gguf"
    subprocess.run([sys.executable, "-m", "ownlm.cli.main", "export", a.model, "--format", "gguf", "--quant", a.quant,
                    "--out", str(gguf)], check=True, stdout=subprocess.DEVNULL)
    child = subprocess.run([llama_python(a.llama_python), "-c", LLAMA_CHILD, str(gguf), json.dumps(prompts),
                            str(a.max_tokens)], check=True, capture_output=True, text=True)
    theirs = json.loads(child.stdout)

    def answers(lm) -> list[str]:
        return [lm.chat([{"role": "user", "content": p}], temperature=0, max_tokens=a.max_tokens).text
                for p in prompts]

    same_file = answers(ownlm.load(str(gguf), dtype="float32"))
    stored = answers(ownlm.load(a.model, pull_missing=False))
    result: dict = {"model": a.model, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "quant": a.quant,
                    "max_tokens": a.max_tokens, "rows": []}
    for r, t, s, o in zip(rows, theirs, same_file, stored):
        row = {"prompt": r["prompt"], "llama_cpp": t[:80], "ownlm_same_file": s[:80], "ownlm_run": o[:80],
               "identical": t.strip() == s.strip()}
        if "pattern" in r:
            row["pattern_match"] = {k: bool(re.search(r["pattern"], v.strip()))
                                    for k, v in (("llama_cpp", t), ("ownlm_same_file", s), ("ownlm_run", o))}
        result["rows"].append(row)
    result["identical"] = f"{sum(x['identical'] for x in result['rows'])} of {len(rows)}"
    if all("pattern_match" in x for x in result["rows"]):
        result["pattern_match"] = {k: sum(x["pattern_match"][k] for x in result["rows"]) / len(rows)
                                   for k in ("llama_cpp", "ownlm_same_file", "ownlm_run")}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
