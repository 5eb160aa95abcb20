"""Fine-tuning: data formats -> ids and masks (checked by hand), training, checkpoints and resume,
PEFT interop (peft on transformers is the reference), merge, export, and data parallelism."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHATML, build_tokenizer
from ownlm.cli.main import main
from ownlm.errors import BadRequest
from ownlm.formats.tokenizer import from_hf
from ownlm.loading import attach_adapter, load
from ownlm.store.store import Store
from ownlm.text.chat import ChatTemplate
from ownlm.text.tokenizer import TextTokenizer
from ownlm.tune import checkpoints
from ownlm.tune.data import Encoder, collate, load_dataset, pack
from ownlm.tune.trainer import TuneConfig

ROWS = [{"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"} for a in range(8) for b in range(8)]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    spec, template = from_hf({"tokenizer.json": folder / "tokenizer.json",
                              "tokenizer_config.json": folder / "tokenizer_config.json"})
    tok = TextTokenizer(spec)
    return Encoder(tok, ChatTemplate(template, tok.bos_token, tok.eos_token))


def _ids(enc: Encoder, text: str) -> list[int]:
    return enc.tok.tk.encode(text, add_special_tokens=False).ids


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _expect(enc: Encoder, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids and mask built piece by piece by hand: (text, is target)."""
    ids, mask = [], []
    for text, target in pieces:
        p = _ids(enc, text)
        ids += p
        mask += [target] * len(p)
    return ids, mask


def test_each_format_gives_the_hand_built_ids_and_masks(encoder, tmp_path):
    user = lambda t: (f"<|im_start|>user\n{t}<|im_end|>\n", False)  # noqa: E731
    asst_open = ("<|im_start|>assistant\n", False)
    cases = {
        "alpaca": ({"instruction": "Add", "input": "2 and 3", "output": "5"},
                   [user("Add\n\n2 and 3"), asst_open, ("5", True), ("<|im_end|>", True), ("\n", True)]),
        "prompt-completion": ({"prompt": "Hi", "completion": "Hello there"},
                              [user("Hi"), asst_open, ("Hello there", True), ("<|im_end|>", True), ("\n", True)]),
        "messages": ({"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Yo"}]},
                     [("<|im_start|>system\nBe brief<|im_end|>\n", False), user("Hi"), asst_open, ("Yo", True),
                      ("<|im_end|>", True), ("\n", True)]),
        "sharegpt": ({"conversations": [{"from": "human", "value": "A"}, {"from": "gpt", "value": "B"},
                                        {"from": "human", "value": "C"}, {"from": "gpt", "value": "D"}]},
                     [user("A"), asst_open, ("B", True), ("<|im_end|>", True), ("\n", True), user("C"), asst_open,
                      ("D", True), ("<|im_end|>", True), ("\n", True)]),
    }
    for fmt, (row, pieces) in cases.items():
        data = load_dataset(_write(tmp_path / f"{fmt}.jsonl", [row]), encoder)
        assert data.format == fmt
        e = data.examples[0]
        assert (e.ids, e.mask) == _expect(encoder, pieces), fmt
        assert e.where == f"{fmt}.jsonl:1"
    # --train-on last: only the final assistant turn; all: every token
    last = Encoder(encoder.tok, encoder.template, "last").encode(
        [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
         {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}])
    ids, mask = _expect(encoder, [user("A"), asst_open, ("B", False), ("<|im_end|>", False), ("\n", False), user("C"),
                                  asst_open, ("D", True), ("<|im_end|>", True), ("\n", True)])
    assert (last.ids, last.mask) == (ids, mask)
    every = Encoder(encoder.tok, encoder.template, "all").encode([{"role": "user", "content": "A"},
                                                                 {"role": "assistant", "content": "B"}])
    assert all(every.mask) and every.ids == _ids(encoder, "<|im_start|>user\nA<|im_end|>\n"
                                                          "<|im_start|>assistant\nB<|im_end|>\n")


def test_text_rows_learn_every_token_and_the_eos(encoder, tmp_path):
    eos = encoder.tok.eos_ids[0]
    (tmp_path / "corpus.txt").write_text("The quick brown fox", encoding="utf-8")
    for path in (tmp_path / "corpus.txt", _write(tmp_path / "t.jsonl", [{"text": "The quick brown fox"}])):
        e = load_dataset(path, encoder).examples[0]
        assert e.ids == _ids(encoder, "The quick brown fox") + [eos]
        assert all(e.mask)
    arr = tmp_path / "rows.json"
    arr.write_text('[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c", "completion": "d"}\n]',
                   encoding="utf-8")
    data = load_dataset(arr, encoder)
    assert [e.where for e in data.examples] == ["rows.json:2", "rows.json:4"]


def test_bad_rows_are_reported_by_file_and_line_or_skipped(encoder, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n{"instruction": 3, "output": "b"}\n'
                    '{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    with pytest.raises(BadRequest, match=r"^d\.jsonl:2: invalid JSON"):
        load_dataset(path, encoder)
    data = load_dataset(path, encoder, skip_bad=True)
    assert len(data.examples) == 2
    assert [s.split(":")[1] for s in data.skipped] == ["2", "3"]
    assert "'instruction' must be a string" in data.skipped[1]
    with pytest.raises(BadRequest, match="cannot tell the data format"):
        load_dataset(_write(tmp_path / "x.jsonl", [{"question": "q"}]), encoder)
    rc = main(["tune", "nowhere", "--data", str(tmp_path / "missing.jsonl"), "--name", "x"])
    assert rc == 2


def test_hostile_rows_are_bad_rows_of_their_own(encoder, tmp_path, monkeypatch):
    """A byte order mark is not text; a number of 5,000 digits, nesting 3,000 deep, bytes that
    are not UTF-8, a line past the bound and a conversation of too many messages are each a bad
    row at its own line (skipped with --skip-bad), never an unexpected error; a .json array's
    rows keep their lines."""
    from ownlm.tune import data as data_module

    monkeypatch.setattr(data_module, "MAX_LINE", 32768)
    good = json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n"
    many = json.dumps({"messages": [{"role": r, "content": "x"} for _ in range(300) for r in ("user", "assistant")]})
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n"
                     + b"[" * 3000 + b"]" * 3000 + b"\n" + b'{"instruction": "\xff", "output": "b"}\n'
                     + b'{"instruction": "' + b"a" * 40_000 + b'", "output": "b"}\n' + good)
    with pytest.raises(BadRequest, match=r"^d\.jsonl:2: invalid JSON \(Exceeds the limit"):
        load_dataset(path, encoder)
    data = load_dataset(path, encoder, skip_bad=True)
    assert [e.where for e in data.examples] == ["d.jsonl:1", "d.jsonl:6"]
    why = {s.split(":")[1]: s for s in data.skipped}
    assert list(why) == ["2", "3", "4", "5"]
    assert "nested too deeply" in why["3"] and "not UTF-8 text" in why["4"] and "line longer than" in why["5"]
    path = tmp_path / "m.jsonl"
    path.write_text(many + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(BadRequest, match=r"^m\.jsonl:1: the conversation has 600 messages, more than 512"):
        load_dataset(path, encoder)
    assert [e.where for e in load_dataset(path, encoder, skip_bad=True).examples] == ["m.jsonl:2"]
    rows = [{"prompt": f"p{i}", "completion": "c"} for i in range(3000)]
    arr = tmp_path / "rows.json"
    arr.write_text("\ufeff[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]", encoding="utf-8")
    assert [r[0] for r in data_module.read_rows(arr)] == [f"rows.json:{i + 2}" for i in range(3000)]


def test_packed_rows_keep_examples_apart(hf_models, tmp_path):
    """Logits of each example inside a packed row equal its logits alone: no attention across."""
    lm = load(str(hf_models["llama"]), dtype="float32", quant="none")
    enc = Encoder(lm.tokenizer, lm.template)
    data = load_dataset(_write(tmp_path / "d.jsonl", ROWS[:6]), enc)
    rows = pack(data, seq_len=128)
    assert len(rows) < 6 and max(r.seg[-1] for r in rows) > 0
    tokens, targets, pos, seg = collate(rows)
    with torch.no_grad():
        packed = lm.model(tokens, pos, segments=seg)
        for b, r in enumerate(rows):
            for s in set(r.seg):
                idx = [i for i, x in enumerate(r.seg) if x == s]
                alone = lm.model(torch.tensor([[r.ids[i] for i in idx]]))[0]
                torch.testing.assert_close(packed[b, idx], alone, atol=2e-5, rtol=1e-5)
    # targets: the next token inside the same example, only where it is a training target
    r = rows[0]
    for i in range(len(r.ids) - 1):
        want = r.ids[i + 1] if r.mask[i + 1] and r.seg[i + 1] == r.seg[i] else -100
        assert targets[0, i] == want


def _tune(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "tune", *args, "--json"], capture_output=True,
                       text=True, env=os.environ)
    assert r.returncode == 0, r.stderr[-2000:]  # what went wrong, not just the exit status
    return json.loads(r.stdout)


def test_lora_training_lowers_the_loss_and_peft_reads_our_adapter(hf_models, tmp_path):
    import transformers
    from peft import PeftModel

    data = _write(tmp_path / "d.jsonl", ROWS)
    res = _tune([str(hf_models["llama"]), "--data", str(data), "--name", "adder", "--epochs", "2",
                 "--val-split", "0.1", "--batch-size", "2", "--seq-len", "128", "--targets", "q,v,down", "--rslora"])
    log = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == res["steps"] > 10
    assert np.mean([r["loss"] for r in log[-3:]]) < 0.8 * np.mean([r["loss"] for r in log[:3]])
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0]
    out = tmp_path / "adapter"
    assert main(["export", "adder", "--format", "peft", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and cfg["use_rslora"] is True
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref, out).eval()
    ours = load("adder", dtype="float32", quant="none")
    ids = torch.tensor([ours.encode(ours.chat_prompt([{"role": "user", "content": "What is 3 plus 4?"}]))])
    with torch.no_grad():
        want = ref(ids).logits
        got = ours.model(ids)
        base = load(str(hf_models["llama"]), dtype="float32", quant="none").model(ids)
    assert (want - base).abs().max() > 1e-2  # the adapter changed something
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_merge_equals_base_plus_adapter_and_gguf_export_reloads(hf_models, tmp_path):
    from gguf import GGUFReader

    data = _write(tmp_path / "d.jsonl", ROWS)
    _tune([str(hf_models["qwen2"]), "--data", str(data), "--name", "q", "--max-steps", "8", "--seq-len", "128",
           "--lr", "5e-3"])
    base = load(str(hf_models["qwen2"]), dtype="float32", quant="none")
    unmerged = load(str(hf_models["qwen2"]), dtype="float32", quant="none")
    attach_adapter(unmerged.model, {n: p for n, p in _adapter_files("q").items()}, merge=False)
    assert main(["merge", str(hf_models["qwen2"]), "q", "--name", "q-merged", "--dtype", "float32"]) == 0
    merged = load("q-merged", dtype="float32", quant="none")
    ids = torch.tensor([base.encode("What is 5 plus 2? It is 7.")])
    with torch.no_grad():
        a, b = unmerged.model(ids), merged.model(ids)
        assert (a - base.model(ids)).abs().max() > 1e-2
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    out = tmp_path / "q.gguf"
    assert main(["export", "q", "--format", "gguf", "--out", str(out), "--quant", "f32"]) == 0
    again = load(str(out), dtype="float32", quant="none")
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids), a, atol=2e-5, rtol=1e-4)
    prompt = [{"role": "user", "content": "What is 1 plus 1?"}]
    assert (again.chat(prompt, max_tokens=8, temperature=0).token_ids
            == merged.chat(prompt, max_tokens=8, temperature=0).token_ids)
    r = GGUFReader(out)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "qwen2"
    assert field("qwen2.block_count") == 2 and field("qwen2.embedding_length") == 64
    assert field("tokenizer.chat_template") == CHATML
    assert field("tokenizer.ggml.tokens") == [merged.tokenizer.token(i) for i in range(merged.tokenizer.vocab_size)]
    assert field("tokenizer.ggml.eos_token_id") == merged.tokenizer.eos_ids[0]
    assert main(["export", "q", "--format", "gguf", "--out", str(out)]) == 2  # exists: refused, kept
    assert not list(tmp_path.glob(".*tmp*"))


def _adapter_files(name: str) -> dict[str, Path]:
    store = Store()
    m = store.read(name)
    return {rel: store.open_blob(f["sha256"]) for rel, f in m["files"].items()}


def test_hf_export_loads_in_transformers(hf_models, tmp_path):
    import transformers

    out = tmp_path / "hf"
    assert main(["export", str(hf_models["mistral"]), "--format", "safetensors", "--out", str(out),
                 "--dtype", "float32"]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load(str(hf_models["mistral"]), dtype="float32", quant="none")
    ids = torch.tensor([ours.encode("The quick brown fox jumps over the lazy dog. The quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours.model(ids), atol=2e-5, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(out)("fox 123").input_ids == ours.encode("fox 123")


def test_bos_is_added_as_transformers_adds_it_and_survives_export(hf_models, tmp_path):
    """A tokenizer.json whose post-processor puts BOS first and a tokenizer_config.json that does
    not say add_bos_token (Llama 3's files): ownlm encodes with BOS, as transformers does; the
    GGUF export says add_bos, and an HF export of that GGUF makes transformers add it too. A
    Mistral without a window is exported with sliding_window null (MistralConfig's default is 4096)."""
    import shutil

    import transformers
    from tokenizers import Tokenizer, processors

    from conftest import build_hf_model

    folder = shutil.copytree(hf_models["llama"], tmp_path / "bos")
    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = "<|im_start|>"
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    tk.save(str(folder / "tokenizer.json"))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg.pop("add_bos_token")
    tcfg["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    want = transformers.AutoTokenizer.from_pretrained(folder)("fox 123").input_ids
    assert want[0] == tk.token_to_id(bos) and load(str(folder)).encode("fox 123") == want
    gguf_out, hf_out = tmp_path / "bos.gguf", tmp_path / "bos-hf"
    assert main(["export", str(folder), "--format", "gguf", "--out", str(gguf_out), "--quant", "f32"]) == 0
    assert load(str(gguf_out)).encode("fox 123") == want
    assert main(["export", str(gguf_out), "--format", "safetensors", "--out", str(hf_out)]) == 0
    assert transformers.AutoTokenizer.from_pretrained(hf_out)("fox 123").input_ids == want
    assert load(str(hf_out)).encode("fox 123") == want  # and ownlm reads its own export back the same
    plain = build_hf_model(tmp_path / "mistral", "mistral", sliding_window=None)
    out = tmp_path / "mistral-hf"
    assert main(["export", str(plain), "--format", "safetensors", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "sliding_window" in cfg and cfg["sliding_window"] is None
    assert transformers.AutoConfig.from_pretrained(out).sliding_window is None


def test_killed_run_resumes_to_the_same_weights(hf_models, tmp_path):
    """SIGKILL at a random moment after the first checkpoint; --resume ends where the
    uninterrupted run (same seed, dropout on) ends, to the last bit."""
    data = _write(tmp_path / "d.jsonl", ROWS)
    common = [str(hf_models["llama"]), "--data", str(data), "--max-steps", "60", "--save-every", "3",
              "--batch-size", "2", "--seq-len", "96", "--dropout", "0.1"]
    _tune(common + ["--name", "straight"])
    cmd = [sys.executable, "-m", "ownlm.cli.main", "tune", *common, "--name", "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    run = Store().root / "runs" / "killed-latest"
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoints.complete(run) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0, 0.15))  # the run takes seconds more
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoints.complete(run)
    assert done, "no checkpoint before the kill"
    assert not Store().has("killed")  # it never finished
    res = _tune(common + ["--name", "killed", "--resume"])
    assert res["name"] == "killed:latest" and res["resumed_from"] % 3 == 0 and res["resumed_from"] < 60
    a = {n: t for n, t in _read(_adapter_files("straight")["adapter_model.safetensors"]).items()}
    b = _read(_adapter_files("killed")["adapter_model.safetensors"])
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    straight = [json.loads(x)["loss"]
                for x in (Store().root / "runs/straight-latest/metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert resumed == straight


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_damaged_checkpoints_are_refused(hf_models, tmp_path):
    data = _write(tmp_path / "d.jsonl", ROWS[:16])
    common = [str(hf_models["llama"]), "--data", str(data), "--max-steps", "4", "--save-every", "2",
              "--seq-len", "96", "--name", "dmg"]
    res = _tune(common)
    latest = checkpoints.complete(Path(res["run_dir"]))[-1]
    blob = latest / checkpoints.TRAINABLE
    raw = bytearray(blob.read_bytes())
    raw[-3] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(checkpoints.CheckpointError, match="does not match its sha256"):
        checkpoints.load(latest)
    rc = main(["tune", *common, "--resume", "--max-steps", "6"])
    assert rc == 2
    (latest / "manifest.json").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="incomplete"):
        checkpoints.load(latest)


def test_qlora_keeps_int4_weights_and_trains(smollm2_gguf, tmp_path):
    """QLoRA on the real Q4_1 GGUF: int4 base frozen, adapter learns; the tuned model answers."""
    from ownlm.model.linear import LoRALinear, QuantLinear
    from ownlm.tune.run import prepare

    lm = prepare(str(smollm2_gguf), TuneConfig(method="qlora", targets="q,v"), torch.device("cpu"))
    qkv = lm.model.layers[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and isinstance(qkv.base, QuantLinear) and qkv.base.bits == 4
    # int4 matmul with autograd (dequantized on the fly) equals the dequantized dense layer
    x = torch.randn(3, qkv.in_features, requires_grad=True)
    w = qkv.base.dequantize()
    y = qkv.base(x)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-3, rtol=1e-4)


def test_two_gloo_processes_follow_the_single_process_loss_curve(hf_models, tmp_path):
    data = _write(tmp_path / "d.jsonl", ROWS)
    common = [str(hf_models["llama"]), "--data", str(data), "--max-steps", "5", "--dropout", "0", "--seq-len", "96"]
    one = _tune(common + ["--name", "one"])
    two = _tune(common + ["--name", "two", "--nproc", "2"])
    curve = lambda r: [json.loads(x)["loss"] for x in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    np.testing.assert_allclose(curve(two), curve(one), rtol=1e-5)
    a, b = (_read(_adapter_files("one")["adapter_model.safetensors"]),
            _read(_adapter_files("two")["adapter_model.safetensors"]))
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4)


def test_processes_pick_their_backend_from_the_device_and_never_share_a_gpu(hf_models, tmp_path, monkeypatch):
    """gloo between CPU processes, also where GPUs are (--device cpu); NCCL between GPU processes,
    one GPU each: --nproc beyond the GPUs is refused before anything starts (a GPU machine is played
    here by the device choice and the GPU count)."""
    from ownlm.tune import run

    assert run._backend("cpu") == "gloo"
    monkeypatch.setattr(run, "pick_device", lambda device=None: torch.device(device or "cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run._backend(None) == "nccl" and run._backend("cpu") == "gloo"
    data = _write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(BadRequest, match="--nproc 2 needs a GPU per process and this machine has 1") as e:
        run.tune(str(hf_models["llama"]), data, "two", TuneConfig(), nproc=2)
    assert "--device cpu" in e.value.hint
    assert not (Store().root / "runs").exists()


def test_two_processes_resume_each_with_its_own_rng_state(hf_models, tmp_path):
    """--nproc 2 with dropout: each process's dropout draws as many numbers as its share of the rows has
    tokens, so their generators part; a checkpoint keeps each one's, and a resume from it ends on the
    uninterrupted run's adapter, to the last bit."""
    import shutil

    data = _write(tmp_path / "d.jsonl", ROWS)
    common = [str(hf_models["llama"]), "--data", str(data), "--max-steps", "4", "--save-every", "2",
              "--dropout", "0.1", "--seq-len", "48", "--no-pack", "--nproc", "2"]
    straight = Path(_tune(common + ["--name", "straight"])["run_dir"])
    _, rng, _ = checkpoints.load(checkpoints.complete(straight)[0])
    assert not torch.equal(rng["rng/torch"], rng["rng/torch.1"])
    again = Store().root / "runs" / "again-latest"
    shutil.copytree(straight, again)
    shutil.rmtree(checkpoints.complete(again)[-1])  # as if killed between steps 2 and 4
    assert _tune(common + ["--name", "again", "--resume"])["resumed_from"] == 2
    a, b = (_read(_adapter_files(n)["adapter_model.safetensors"]) for n in ("straight", "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_an_error_in_a_process_of_several_is_the_error_itself(hf_models, tmp_path):
    """--nproc 2 and a bad row: the same one-line `file:line` error and exit status as with one
    process, not torch's wrapper of the worker's traceback."""
    data = _write(tmp_path / "d.jsonl", [ROWS[0], {"instruction": 3, "output": "b"}])
    r = subprocess.run([sys.executable, "-m", "ownlm.cli.main", "tune", str(hf_models["llama"]), "--data", str(data),
                        "--name", "two", "--nproc", "2", "--max-steps", "1"], capture_output=True, text=True,
                       env=os.environ, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "error: d.jsonl:2: 'instruction' must be a string" in r.stderr
    assert "Traceback" not in r.stderr and "ProcessRaisedException" not in r.stderr


def test_the_result_never_takes_the_base_models_name(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", ROWS[:2])
    assert main(["tune", "tiny", "--data", str(data), "--name", "tiny:latest"]) == 2
    assert main(["merge", "tiny:v1", "adapter", "--name", "tiny:v1"]) == 2
    err = capsys.readouterr().err
    assert err.count("is the base model itself") == 2 and "Traceback" not in err


def test_example_task_generator_is_deterministic_and_split(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "dates" / "make_data.py"
    for out in ("a", "b"):
        subprocess.run([sys.executable, str(script), "--out", str(tmp_path / out)], check=True, capture_output=True)
    for f in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    train = [json.loads(x) for x in (tmp_path / "a/train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "a/test.jsonl").read_text().splitlines()]
    assert (len(train), len(test)) == (400, 100)
    assert not {r["completion"] for r in train} & {r["answer"] for r in test}
    import datetime
    for r in test:
        datetime.date.fromisoformat(r["answer"])


def test_a_loss_that_is_not_a_number_stops_the_run_before_a_checkpoint_holds_it(hf_models, tmp_path, monkeypatch):
    """Step 2's loss made NaN (as an overflow would make it): the run stops there with one error,
    and no checkpoint of step 2 or later is written; step 1's stays for --resume, which continues
    from it past a metrics line cut short."""
    from ownlm.tune import run
    from ownlm.tune.trainer import Trainer, TrainingError

    real = Trainer.train_step

    def step(self):
        rec = real(self)
        if self.step == 2:
            rec["loss"] = float("nan")
        return rec

    monkeypatch.setattr(Trainer, "train_step", step)
    data = _write(tmp_path / "d.jsonl", ROWS[:16])
    with pytest.raises(TrainingError, match="step 2: the loss is not a number; the run stopped"):
        run.tune(str(hf_models["llama"]), data, "nan", TuneConfig(max_steps=4, save_every=1, seq_len=96), quiet=True)
    folder = Store().root / "runs" / "nan-latest"
    (kept,) = checkpoints.complete(folder)
    assert checkpoints.load(kept)[2]["step"] == 1
    # a record cut short (as a kill in mid-write leaves it) does not stand in the way of --resume
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "lo')
    monkeypatch.setattr(Trainer, "train_step", real)
    cfg = TuneConfig(max_steps=4, save_every=1, seq_len=96)
    assert run.tune(str(hf_models["llama"]), data, "nan", cfg, resume=True, quiet=True)["resumed_from"] == 1
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # a resume with settings that shape the steps otherwise is refused, saying which
    for change, said in ((dict(batch_size=2), "batch_size 4 (now 2)"), (dict(rank=8), "rank 16 (now 8)")):
        with pytest.raises(checkpoints.CheckpointError, match=rf"made with other settings: {re.escape(said)}"):
            run.tune(str(hf_models["llama"]), data, "nan", TuneConfig(max_steps=4, save_every=1, seq_len=96, **change),
                     resume=True, quiet=True)
