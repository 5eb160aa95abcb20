"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/, committed): a tiny Llama as an HF folder and
as a GGUF, chat templates in the shapes real models use, JSON schemas and request bodies. Run it
again only to change the corpus: `python -m tests.fuzz.make_corpus`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf

CORPUS = Path(__file__).with_name("corpus")

TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
               " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
              "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
              "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
              "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"),
    "tools": ("{%- set ns = namespace(sys='') -%}{%- for m in messages -%}{%- if m.role == 'system' -%}"
              "{%- set ns.sys = m.content -%}{%- endif -%}{%- endfor -%}{{ ns.sys }}{%- if tools is defined and tools "
              "-%}{{ tools | tojson(indent=2) }}{%- endif -%}{%- for m in messages if m.role != 'system' -%}"
              "{{ m.role | upper }}: {{ m.content }}\\n{%- endfor -%}{%- if add_generation_prompt -%}ASSISTANT:"
              "{%- endif -%}"),
}

SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ref": {"$defs": {"leaf": {"type": "integer"}}, "type": "object",
            "properties": {"x": {"$ref": "#/$defs/leaf"}}, "required": ["x"]},
    "anyof": {"anyOf": [{"type": "boolean"}, {"type": "string", "pattern": "^[a-z]{1,3}$"}]},
}

USER = [{"role": "user", "content": "hi"}]
BODIES = {
    "chat": ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 4, "temperature": 0.5,
                                      "seed": 1, "stop": ["\n"], "logprobs": True, "top_logprobs": 2}),
    "chat_stream": ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 3, "stream": True}),
    "chat_schema": ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 8, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS["object"]}}}),
    "chat_tools": ("/v1/chat/completions", {"model": "tiny", "messages": USER, "max_tokens": 8, "tools": [
        {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}], "tool_choice": "auto"}),
    "completion": ("/v1/completions", {"model": "tiny", "prompt": "The quick", "max_tokens": 3, "echo": True,
                                       "logprobs": 1}),
    "embeddings": ("/v1/embeddings", {"model": "tiny", "input": ["one", "two"], "dimensions": 8}),
}


def main() -> None:
    from tests.conftest import build_hf_model
    from tests.ggufs import hf_folder_to_gguf

    shutil.rmtree(CORPUS, ignore_errors=True)
    hf = build_hf_model(CORPUS / "hf", "llama", seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf_folder_to_gguf(hf, CORPUS / "tiny.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    for kind, items in (("templates", TEMPLATES), ("schemas", SCHEMAS), ("bodies", BODIES)):
        (CORPUS / kind).mkdir(parents=True)
        for name, value in items.items():
            suffix = ".jinja" if kind == "templates" else ".json"
            (CORPUS / kind / f"{name}{suffix}").write_text(value if kind == "templates" else json.dumps(value))


if __name__ == "__main__":
    main()
