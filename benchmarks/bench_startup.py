"""First call of a compiled module from empty caches (compile + autotune) and from a warm cache, each in a
fresh process (issue 8: under 30 s and under 3 s), then its first forward+backward step (the backward's
compile + tuning). Prints and writes JSON (argv[1], default stdout only).

Measured inside the child: from `patterndsl.compile(...)` to the first `attention(...)` result on the GPU
(import torch and CUDA start-up excluded, reported apart as process wall time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time, torch
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
sys.path.insert(0, BENCHMARKS)
import patterndsl as P
q, k, v = (torch.randn(1, 16, 16384, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
t0 = time.perf_counter()
m = P.compile("pattern p = causal & window(1023)\\n")
m.attention(q, k, v)
torch.cuda.synchronize()
print("FIRST_CALL_S", time.perf_counter() - t0, m.config(q, k, v))  # what that call launched (tuned: from memory)
from runinfo import backward_launches  # (after the first call: its imports, triton's, are part of that call)
qkv = [x.requires_grad_() for x in (q, k, v)]
t0 = time.perf_counter()
with backward_launches() as bwd:  # the backward's tiles as launched: ((dK/dV, dQ tiles, warps, stages), tma)
    torch.autograd.grad(m.attention(*qkv), qkv, torch.randn_like(q))
    torch.cuda.synchronize()
print("FIRST_STEP_S", time.perf_counter() - t0, (bwd["tiles"], bwd["tma"]))
""".replace("BENCHMARKS", repr(os.path.dirname(os.path.abspath(__file__))))


def run_child(env: dict) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("FIRST_CALL_S"))
    step = next(x for x in out.splitlines() if x.startswith("FIRST_STEP_S"))
    return {
        "first_call_s": float(line.split()[1]),
        "config": line.split(" ", 2)[2],
        "first_backward_step_s": float(step.split()[1]),  # after that forward: the backward's compile + tuning
        "backward_tiles": step.split(" ", 2)[2],
        "process_s": time.perf_counter() - t0,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ, TRITON_CACHE_DIR=os.path.join(tmp, "triton"), PATTERNDSL_CACHE_DIR=os.path.join(tmp, "pd")
        )
        res = {"empty_caches": run_child(env), "warm_caches": run_child(env)}
    print(json.dumps(res, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
