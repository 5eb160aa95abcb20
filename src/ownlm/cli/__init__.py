"""The command line: one module per group of verbs, each registering its subparsers."""

from __future__ import annotations

import argparse


def add_quant_option(p: argparse.ArgumentParser) -> None:
    """--quant, shared by every verb that loads a model for inference."""
    from ..loading import QUANT_MODES

    p.add_argument("--quant", choices=QUANT_MODES, default="auto",
                   help="weights in memory: auto (a GGUF's int4 / int8 blocks kept as they are on a CPU, its int4 on "
                        "CUDA), none (everything dense in --dtype), bf16 (everything dense in bfloat16), int4 or int8 "
                        "(every layer's linears quantized at load; int8 on CPUs only)")


def add_cache_option(p: argparse.ArgumentParser) -> None:
    """--cache-mb, the prefix cache's bound (engine/prefix_cache.py), for `run` and `serve`."""
    p.add_argument("--cache-mb", type=float, metavar="MB",
                   help="memory for the prefix cache of each model, in MiB: prompts that start like an earlier one "
                        "(a system prompt, the conversation so far) prefill only what is new (default: 1/8 of the "
                        "memory free, at most 2048; 0 turns it off)")


def add_prompt_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-cache", metavar="DIR",
                   help="keep the prefix cache's blocks in DIR too, so later runs start with the prompts of earlier "
                        "ones (a folder per model; another model's or a damaged file is refused)")
    p.add_argument("--prompt-cache-mb", type=float, default=4096.0, metavar="MB",
                   help="most MiB the --prompt-cache folder holds per model (default 4096; the least recently used "
                        "blocks go first)")


def prompt_cache_of(args: argparse.Namespace) -> tuple[str, int] | None:
    """(folder, byte bound) of --prompt-cache, or None."""
    from ..errors import BadRequest

    if not getattr(args, "prompt_cache", None):
        return None
    if not args.prompt_cache_mb > 0:
        raise BadRequest(f"--prompt-cache-mb must be above 0 (got {args.prompt_cache_mb})")
    if args.cache_mb == 0:
        raise BadRequest("--prompt-cache needs the prefix cache, which --cache-mb 0 turns off", "drop one of them")
    import os
    from pathlib import Path

    folder = Path(args.prompt_cache).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadRequest(f"--prompt-cache: cannot make {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise BadRequest(f"--prompt-cache: {folder} is not writable")
    return str(folder), int(args.prompt_cache_mb * (1 << 20))


def apply_cache_option(args: argparse.Namespace) -> None:
    from ..engine import prefix_cache
    from ..errors import BadRequest

    if args.cache_mb is None:
        prefix_cache.configure(None)
        return
    if not args.cache_mb >= 0:
        raise BadRequest(f"--cache-mb must be 0 or more (got {args.cache_mb})", "0 turns the prefix cache off")
    prefix_cache.configure(int(args.cache_mb * (1 << 20)))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """--threads and --activations, for every verb that computes on the CPU (run, serve, bench,
    eval)."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads to compute on, PyTorch's and ownlm's kernels' (default: every core; more "
                        "than the cores is allowed, with a warning)")
    p.add_argument("--activations", choices=("int16", "int8"), default=None,
                   help="what the CPU kernels round activations to before an integer matmul: int16 (default: "
                        "greedy answers as the float32 model's) or int8 (faster prompts and batches, "
                        "llama.cpp's rounding)")


def apply_threads_option(args: argparse.Namespace) -> None:
    """Set --threads and --activations, if given, before anything loads: a bad value is exit 2;
    more threads than cores, one warning line on stderr."""
    import sys
    import warnings

    from ..errors import BadRequest
    from ..model import kernels

    if getattr(args, "activations", None):
        kernels.set_activations(args.activations)
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise BadRequest(f"--threads must be a positive integer (got {n})", "leave it out to use every core")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels.set_threads(n)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
