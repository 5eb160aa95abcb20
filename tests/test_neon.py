"""ownlm's NEON kernels (AArch64), checked on this x86 machine: tests/kernel_harness.c is built
with the kernels' own sources for x86-64 (AVX2) and for AArch64 (Debian's gcc-aarch64-linux-gnu,
statically linked) and run natively and under qemu-aarch64 user emulation (Debian's qemu-user);
every case's outputs must be bit-identical. Without those tools the test skips, except where
OWNLM_REQUIRE_NEON=1 (.ci/run installs them and sets it), where it fails. The wider x86 builds
(AVX-512 VNNI) must give the AVX2 build's bits too, checked where the CPU runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ownlm.model import cpu, kernels

from .conftest import KERNELS_POSSIBLE

HARNESS = Path(__file__).with_name("kernel_harness.c")
INSTALL = "apt-get install qemu-user gcc-aarch64-linux-gnu"
CASES = 16 * 4 * 2 * 2 + 8 * 4 * 2 + 2 + 3 * 2 * 8 * 3 + 2 * 4 + 2 * 5  # the lines the harness prints
COMMON = ("-O3", "-ffp-contract=off", "-fopenmp", "-Wall", "-Werror")  # the kernels' own flags
X86 = (*COMMON, "-mavx2", "-mfma", "-mf16c")


def _build(cc: str, flags: tuple[str, ...], out: Path) -> Path:
    cmd = [cc, *flags, f"-I{kernels.CSRC}", str(HARNESS), *(str(kernels.CSRC / src) for src in kernels.SOURCES), "-o",
           str(out), "-lm"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def _run(cmd: list[str]) -> list[str]:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.splitlines()


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="the x86 side needs x86-64 Linux with AVX2 and a C compiler")
def test_neon_kernels_give_the_x86_kernels_bits(tmp_path):
    cross, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not (cross and qemu):
        if os.environ.get("OWNLM_REQUIRE_NEON"):
            pytest.fail(f"OWNLM_REQUIRE_NEON is set but the cross compiler or qemu is missing: {INSTALL}")
        pytest.skip(f"needs Debian's cross compiler and qemu for AArch64 ({INSTALL})")
    x86 = _build(os.environ.get("CC", "cc"), X86, tmp_path / "harness-x86")
    arm = _build(cross, (*COMMON, "-static"), tmp_path / "harness-arm")  # static: qemu needs no ARM sysroot
    want, got = _run([str(x86)]), _run([qemu, str(arm)])
    # int4 and int5 with and without offsets, int6, int8, int4 codebook, int4 with and without offsets and int8
    # against int8 activations, a stack and a stack mixing int8 and int16 activations: 4 row counts, 2 K, 2 dtypes;
    # the bfloat16 matmul twice; attention: 3 cache types, 2 dtypes, 2 shapes, its output and both caches;
    # RMSNorm and the activations, 2 each in 2 dtypes
    assert len(want) == CASES
    assert len({line.split()[-2] for line in want}) == len(want)  # every case its own outputs
    for w, g in zip(want, got, strict=True):
        assert w == g  # name, hash of every output's bits, first output


@pytest.mark.skipif(not KERNELS_POSSIBLE, reason="the x86 builds need x86-64 Linux with AVX2 and a C compiler")
@pytest.mark.parametrize("isa", sorted(kernels.ISAS))
def test_the_wider_x86_builds_give_the_avx2_bits(tmp_path, isa):
    need, extra = kernels.ISAS[isa]
    if not need <= cpu.flags():  # machines of one kind differ: this one runs the AVX2 build
        pytest.skip(f"this CPU lacks {' '.join(sorted(need - cpu.flags()))}, so it cannot run the {isa} build")
    want = _run([str(_build(os.environ.get("CC", "cc"), X86, tmp_path / "harness-avx2"))])
    got = _run([str(_build(os.environ.get("CC", "cc"), (*X86, *extra), tmp_path / f"harness-{isa}"))])
    assert len(want) == CASES
    assert got == want
