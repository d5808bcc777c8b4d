"""benchmarks/kernel_resources.py compiles kernels for the H100 on the CPU; its figures steer tile and register
choices, so they must describe the kernel a launch runs. A launch specialises aligned pointers and strides
divisible by 16; compiled without that mark the loads were 16-bit and unpipelined, and the backward's spills
read 2304 B where the launched kernel has 352 (the reason BWD_ONE_LOOP was predicted faster and measured slower)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

pytest.importorskip("torch")
pytest.importorskip("triton")


@pytest.mark.slow  # compiles several kernels for sm_90 in a child process: about 6 s
def test_pointer_loads_are_pipelined_and_a_register_cap_doubles_the_blocks_per_sm() -> None:
    # its own process: a real compile for sm_90, which the interpreter's patched triton in this one cannot do
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--src", "causal",
                          "--d", "128", "--fast", "128,64,8,2", "--fast", "128,64,8,2,128"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout  # fmt: skip
    rows = re.findall(r"fast (\S+)\s+([\d.]+) KiB smem, (\d+) regs, .* (\d+) blocks/SM", out)
    assert [r[0] for r in rows] == ["128,64,8,2", "128,64,8,2,128"], out
    (_, smem, regs, blocks), (_, smem_cap, regs_cap, blocks_cap) = rows
    # 2 stages of 64 x 128 key and value tiles plus the 128 x 128 query tile, bf16: asynchronous, pipelined copies
    assert float(smem) == (128 * 128 + 2 * 2 * 64 * 128) * 2 / 1024 and int(regs) > 128 and blocks == "1", out
    assert smem_cap == smem and regs_cap == "128" and blocks_cap == "2", out
    # through host TMA descriptors the capped kernel needs no spills either (fewer address registers), but
    # ptxas then waits on each warpgroup MMA (too few registers to keep several in flight); 32-key tiles fit
    # two blocks per SM without a cap and keep the MMAs pipelined
    tma = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--src", "causal",
                          "--tma", "--fast", "128,64,8,2,128", "--fast", "128,64,8,2", "--fast", "128,32,8,2"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout  # fmt: skip
    assert re.search(r"fast 128,64,8,2,128 tma .* spill st/ld 0/0 B, wgmma serialized, 2 blocks/SM", tma), tma
    assert re.search(r"fast 128,64,8,2 tma .* spill st/ld 0/0 B, wgmma, 1 blocks/SM", tma), tma
    assert re.search(r"fast 128,32,8,2 tma .* spill st/ld 0/0 B, wgmma, 2 blocks/SM", tma), tma


@pytest.mark.parametrize("src, kernel", [("rows(0:100)", "--fast"),  # 3-4 s each: one in the fast tier
                                         pytest.param("rows(0:100)", "--fwd", marks=pytest.mark.slow),
                                         pytest.param("causal & threshold(0.9, block=128)", "--fwd", marks=pytest.mark.slow)])  # fmt: skip
def test_a_predicate_of_one_index_compiles_for_sm90(src: str, kernel: str) -> None:
    """The interpreter does not type-check a jit function's returns; triton's compiler checks every return,
    also one after a constexpr branch's return. A predicate of the query alone ([BLOCK_M, 1]: `rows`, or a
    dynamic pattern's empty static part `i < 0`) once met the key bound's [BLOCK_M, BLOCK_N] there, and the
    kernel compiled only in the interpreter (the H100's selector tests found it, 2026-11-26)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--src", src, kernel,
                          "64,64,4,2"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0 and re.search(r"KiB smem, \d+ regs", out.stdout), out.stderr[-2000:]


@pytest.mark.slow  # two kernels, three times, for sm_90 in a child process: about 15 s
def test_the_decode_kernels_compile_for_sm90_contiguous_and_paged() -> None:
    """The decode kernels loop over runs read from tables (`while` bounds loaded from memory) and branch on
    PAGED: paths the interpreter runs without type-checking them the way triton's compiler does for sm_90.
    Both cache kinds compile; a step's split kernel keeps its accumulators in registers (no spills), and a
    paged cache whose pages hold whole tiles runs as many programs per SM as a contiguous one (so the two
    take the same work split in as many waves)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--src",
                          "causal & (window(1023) | sink(4))", "--decode", "4,1,64,0", "--decode", "4,1,64,1",
                          "--decode", "4,4,64,1"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"decode G=4 Nq=(\d) block=64 (\w+): split .* spill st/ld (\d+)/\d+ B, [\w.]+, (\d+) blocks/SM",
                      out.stdout)
    assert [r[:2] for r in rows] == [("1", "contiguous"), ("1", "paged"), ("4", "paged")], out.stdout
    assert rows[0][2] == rows[1][2] == "0" and rows[0][3] == rows[1][3], out.stdout


@pytest.mark.slow  # a forward and a backward, for sm_90 in a child process: about 8 s
def test_the_kernels_at_spans_compile_for_sm90() -> None:
    """Rows at given positions (context parallelism): the forward, dQ and dK/dV kernels read their tiles
    from segment tables, a path the interpreter runs without type-checking it as triton's compiler does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--src",
                          "causal & window(255) | global(0:4)", "--spans", "--fwd", "64,64,4,2", "--bwd",
                          "64,64,64,64,4,2"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"fwd .* KiB smem", out.stdout) and re.search(r"dK/dV: .* \| dQ: .* KiB smem", out.stdout), out


@pytest.mark.slow  # the selection kernels of one pattern, for sm_90 in a child process: about 3 s
def test_the_compressed_scoring_kernel_compiles_for_sm90_without_spills() -> None:
    """NSA's selector: `--sel` builds the compressed rule's two scoring kernels for both forms of the context,
    and at head_dim 128 their tiles stay in registers, on warpgroup MMAs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--src",
                          "causal & (window(63) | topk(16, block=64, score=compressed, share=kv))", "--sel"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"compressed (\w+)\s+lse [^|]* spill st/ld 0/0 B, wgmma,[^|]*\| sums .* spill st/ld 0/0 B, wgmma,", out.stdout)
    assert rows == ["ranges", "bytes"], out.stdout


@pytest.mark.slow  # three dK/dV kernels and two merges, for sm_90 in child processes: about 12 s
def test_the_split_dkdv_kernel_compiles_for_sm90_without_more_spills() -> None:
    """Heavy dK/dV rows split into pieces (SPLIT: early exits, pieces clipped inside the loops, atomic adds
    into a float32 workspace) and the merge kernel: paths the interpreter runs without type-checking them
    as triton's compiler does. At the default tiles of a sink's static pattern the split kernel spills no
    more than the whole-row one (none); NSA's selected branch compiles too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tool = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--bwd", "32,64,64,64,4,2"]
    static = "causal & (window(63) | sink(64))"
    runs = {split: subprocess.run([*tool, "--src", static, *(["--bwd-split"] if split else [])], capture_output=True,
                                  text=True, env=env, timeout=600) for split in (False, True)}  # fmt: skip
    for out in runs.values():
        assert out.returncode == 0, out.stderr[-2000:]
    spills = [re.search(r"dK/dV[ a-z]*: .* spill st/ld (\d+)/(\d+) B", runs[s].stdout) for s in (False, True)]
    assert all(spills) and spills[0].groups() == spills[1].groups() == ("0", "0"), runs  # type: ignore[union-attr]
    assert re.search(r"merge .* spill st/ld 0/0 B", runs[True].stdout), runs[True].stdout
    nsa = subprocess.run([*tool, "--bwd-split", "--src",
                          "causal & (sink(64) | window(63) | topk(16, block=64, score=compressed, share=kv))"],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert nsa.returncode == 0 and re.search(r"dK/dV split: .* KiB smem", nsa.stdout), nsa.stderr[-2000:]
