"""ownlm run: one-shot from an argument or stdin, or an interactive chat."""

from __future__ import annotations

import json
import sys

import torch

from . import (add_cache_option, add_prompt_cache_option, add_quant_option, add_threads_option, apply_cache_option,
               apply_threads_option, chat, prompt_cache_of)
from ..engine.generate import DEFAULT_MAX_TOKENS
from ..errors import BadRequest
from ..loading import load


def _sampling(args) -> dict:
    kw = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
          "repetition_penalty": args.repeat_penalty, "seed": args.seed, "max_tokens": args.max_tokens}
    if args.stop:
        kw["stop"] = args.stop
    return {k: v for k, v in kw.items() if v is not None}


def _capped(lm, ids: list[int], sampling: dict) -> dict:
    """`sampling` with max_tokens: the one asked for, else DEFAULT_MAX_TOKENS (fewer where the
    context or the memory free has less room left after the prompt)."""
    return chat.capped(lm, ids, sampling, DEFAULT_MAX_TOKENS)


def _messages(args, prompt: str) -> list[dict]:
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": prompt}]


def cmd_run(args) -> int:
    # the words after MODEL, quoted or not, are the prompt; none: stdin when piped, else the chat
    prompt = " ".join(args.prompt) if args.prompt else None
    if args.max_tokens is not None and args.max_tokens < 1:
        raise BadRequest(f"--max-tokens must be at least 1 (got {args.max_tokens})",
                         f"leave it out for the default, {DEFAULT_MAX_TOKENS}")
    from_stdin = prompt is None and not sys.stdin.isatty()
    if from_stdin:
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise BadRequest("the prompt on stdin is empty" if from_stdin else "the prompt is empty",
                         "write the prompt after the model name (ownlm run MODEL why is the sky blue), "
                         "or leave it out for a chat")
    if args.raw and args.system:
        raise BadRequest("--system has no effect with --raw", "drop one of them")
    if prompt is None and (args.json or args.raw):
        raise BadRequest("--json and --raw need a prompt (an argument or stdin)")
    apply_threads_option(args)
    apply_cache_option(args)
    disk = prompt_cache_of(args)
    lm = load(args.model, device=args.device, dtype=args.dtype, quant=args.quant)
    if disk:
        from ..engine import prefix_cache

        prefix_cache.persist(lm.model, disk[0], lm.manifest.get("digest") or lm.name, disk[1])
    sampling = _sampling(args)
    lm.params(**sampling)  # validate before any output
    if args.speculate is not None:
        lm.speculator(args.speculate)  # a draft loaded and checked before any output
    if prompt is None:
        return _repl(lm, args, sampling)
    ids = lm.encode(prompt if args.raw else lm.chat_prompt(_messages(args, prompt)))
    stream = lm.stream_ids(ids, speculate=args.speculate, **_capped(lm, ids, sampling))
    if args.json:
        c = stream.run()
        out = c.to_dict()
        out["model"] = lm.name
        out["timings"]["load_s"] = round(lm.load_seconds, 3)
        out["threads"] = torch.get_num_threads()
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _repl(lm, args, sampling) -> int:
    """The chat (cli/chat.py), with this module's answer cap."""
    spec = getattr(args, "speculate", None)
    if spec is None:
        return chat.repl(lm, args, sampling, capper=_capped)
    return chat.repl(lm, args, sampling, capper=lambda lm, ids, s: {**_capped(lm, ids, s), "speculate": spec})


def register(sub) -> None:
    p = sub.add_parser("run", help="talk to a model (one-shot or interactive)",
                       description="Generate from a model. With PROMPT (or stdin) answers once; "
                                   "without, starts a chat.",
                       epilog="The words after MODEL are the prompt, quoted or not, with options before or after "
                              "them: ownlm run smollm2 why is the sky blue --max-tokens 100. After `--` every word "
                              "is prompt, even one starting with a dash: ownlm run smollm2 -- -5 degrees is cold")
    p.intermixed = True  # positionals between and after the options (main._Parser)
    p.add_argument("model", help="store name, catalog alias (smollm2), path to .gguf / HF folder, pypi: or hf: ref")
    p.add_argument("prompt", nargs="*", metavar="PROMPT",
                   help="the prompt: every word after MODEL, joined with spaces (none: stdin if piped, else a chat)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repeat-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help=f"most tokens per answer (default {DEFAULT_MAX_TOKENS}, or what the context has room for "
                        "if less; the chat too)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, finish_reason, usage, timings")
    p.add_argument("--speculate", "--draft", metavar="ngram|MODEL",
                   help="speculative decoding: ngram (guesses looked up in the prompt and answer: fast where "
                        "the answer copies the prompt, as in editing) or a small draft MODEL with the same "
                        "tokenizer; greedy text is the same as without, sampled text has the same distribution")
    add_cache_option(p)
    add_prompt_cache_option(p)
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    add_quant_option(p)
    add_threads_option(p)
    p.set_defaults(func=cmd_run)
