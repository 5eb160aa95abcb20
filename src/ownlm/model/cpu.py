"""What this CPU can do, asked in one place: the kernels, the default dtype, training's autocast
and the repacked cache's key all read it."""

from __future__ import annotations

import functools
import os
import platform

import torch


@functools.cache
def capability() -> str:
    """PyTorch's name for the widest vector ISA it uses here ("AVX2", "AVX512", "AVX512_BF16",
    "AMX", "NEON", ..., "DEFAULT")."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older PyTorch
        return "DEFAULT"


def x86_avx2() -> bool:
    """An x86-64 CPU with AVX2 (and so FMA and F16C): what ownlm's CPU kernels need."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and capability() in ("AVX2", "AVX512", "AVX512_BF16", "AMX"))


@functools.cache
def flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them in /proc/cpuinfo ("avx2", "avx512_vnni", ...;
    empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def arm64() -> bool:
    """A 64-bit ARM CPU (AArch64: NEON is part of the architecture)."""
    return platform.machine().lower() in ("aarch64", "arm64")


def native_bf16() -> bool:
    """bfloat16 arithmetic in hardware (AVX512-BF16 or AMX), not emulated."""
    return capability() in ("AVX512_BF16", "AMX")


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
