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
