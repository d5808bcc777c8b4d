"""Before and after a runtime change, side by side on one GPU: the same patterns through an older patterndsl
(its generated modules, which carried their whole runtime as text) and through this checkout, timed in
interleaved rounds in one process, with every compiled kernel's registers and spills.

    python benchmarks/compare_runtime.py OLD_TREE OUT.json [--only name,...]

OLD_TREE holds an older checkout's `patterndsl/`, `codegen/` and `grammar/` (e.g. `git archive REV patterndsl
codegen grammar | tar -x -C OLD_TREE`); its compiler runs in a subprocess and writes self-contained modules.
Both sides launch their configured tiles (PATTERNDSL_AUTOTUNE=0), so the comparison is kernel for kernel and
host path for host path, free of the tuner's noise. B=1, H=16, N=16384, D=128, bf16 (layout patterns: their
grid's N); forward and forward+backward; the median of five interleaved rounds of triton's do_bench.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ["PATTERNDSL_AUTOTUNE"] = "0"

# (name, source, N): the five 1-D patterns of bench_forward, the layouts of bench_layouts, the selector of
# bench_selectors
CASES = [
    ("causal", "pattern p = causal\n", 16384),
    ("sliding_window_1024", "pattern p = causal & window(1023)\n", 16384),
    ("longformer_512_g16", "pattern p = window(256) | global(0:16)\n", 16384),
    ("power_b64", "pattern p = causal & blockwise(64, hops(2) | window(1))\n", 16384),
    ("dilated_4x1024", "pattern p = causal & window(1023, dilation=4)\n", 16384),
    ("neighborhood_2d_k13", "layout g = grid(128, 128)\npattern p = neighborhood(g, kernel=13)\n", 16384),
    ("dilated_2d_k7_d4", "layout g = grid(128, 128)\npattern p = neighborhood(g, kernel=7, dilation=4)\n", 16384),
    ("video_3d", "layout g = grid(16, 32, 32)\npattern p = neighborhood(g, kernel=(3, 7, 7), causal=(true, false, false))\n",
     16384),
    ("nsa_like_topk16", "pattern p = causal & (window(511) | topk(16, block=64) | sink(64))\n", 16384),
]

_OLD_COMPILE = """
import sys, json
from pathlib import Path
from patterndsl.compile import compile_source
out = Path(sys.argv[1])
for name, src in json.loads(sys.argv[2]):
    (out / f"old_{name}.py").write_text(compile_source(src).text, encoding="utf-8")
"""


def _old_modules(old_tree: Path, cases: list[tuple[str, str, int]], folder: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(old_tree.resolve()) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    arg = json.dumps([(name, src) for name, src, _ in cases])
    subprocess.run([sys.executable, "-c", _OLD_COMPILE, str(folder), arg], check=True, env=env, cwd=folder)
    out = {}
    for name, _, _ in cases:
        path = folder / f"old_{name}.py"
        spec = importlib.util.spec_from_file_location(f"old_{name}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        out[name] = module
    return out


def _compiled(fn: Any) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, spill bytes, shared bytes) of every compiled variant of a @triton.jit function."""
    rows = []
    for caches in getattr(fn, "device_caches", {}).values():
        for kernel in caches[0].values():
            kernel._init_handles()
            rows.append((fn.__name__, int(kernel.n_regs), int(kernel.n_spills), int(kernel.metadata.shared)))
    return sorted(rows)


def _kernels_old(module: Any) -> list[tuple[str, int, int, int]]:
    names = ("_attn_fwd", "_attn_fwd_fast", "_attn_combine", "_attn_bwd_dq", "_attn_bwd_dkdv", "_attn_bwd_pre",
             "_pool_kernel", "_topk_kernel", "_score_kernel", "_merge_kernel", "_vl_rows", "_vl_scan", "_vl_gather")
    return sorted(r for n in names if hasattr(module, n) for r in _compiled(getattr(module, n)))


def _kernels_new() -> list[tuple[str, int, int, int]]:
    from patterndsl.runtime import bwd_kernels, fwd_kernels, selection, varlen

    rows = []
    for mod in (fwd_kernels, bwd_kernels, selection, varlen):
        for value in vars(mod).values():
            if type(value).__name__ == "JITFunction" and getattr(value, "__module__", "") == mod.__name__:
                rows += _compiled(value)
    return sorted(rows)


def _new_kernels_clear() -> None:
    """Forget compiled variants (the next pattern's list starts empty; triton's disk cache keeps them)."""
    from patterndsl.runtime import bwd_kernels, fwd_kernels, selection, varlen

    for mod in (fwd_kernels, bwd_kernels, selection, varlen):
        for value in vars(mod).values():
            if type(value).__name__ == "JITFunction":
                value.device_caches.clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old_tree", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    import torch
    import triton

    import patterndsl as P
    from patterndsl.cli.bench import interleaved

    only = set(filter(None, args.only.split(",")))
    cases = [c for c in CASES if not only or c[0] in only]
    folder = Path(tempfile.mkdtemp(prefix="compare_runtime_"))
    old = _old_modules(args.old_tree, cases, folder)
    B, H, D = 1, 16, 128
    results = []
    for name, src, n in cases:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        do = torch.randn_like(q)
        new = P.compile(src)
        _new_kernels_clear()
        runs = {"old": old[name].attention, "new": new.attention}
        steps: dict[str, Any] = {}
        for side, fn in runs.items():
            steps[f"{side}_fwd"] = lambda fn=fn, q=q, k=k, v=v: fn(q, k, v)
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            steps[f"{side}_fwd_bwd"] = lambda fn=fn, qg=qg, kg=kg, vg=vg, do=do: fn(qg, kg, vg).backward(do)
        with torch.no_grad():
            same = torch.equal(old[name].attention(q, k, v), new.attention(q, k, v))
        for step in steps.values():  # compile everything before any timing
            step()
        torch.cuda.synchronize()

        def time_one(fn: Any) -> float:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

        fwd = interleaved({s: steps[f"{s}_fwd"] for s in runs}, lambda f: _no_grad(time_one, f))
        both = interleaved({s: steps[f"{s}_fwd_bwd"] for s in runs}, time_one)
        row = {"pattern": name, "source": src.strip().splitlines()[-1], "N": n, "outputs_equal": same}
        for label, rounds in (("fwd", fwd), ("fwd_bwd", both)):
            for side in runs:
                row[f"{side}_{label}_ms"] = sorted(rounds[side])[len(rounds[side]) // 2]
                row[f"{side}_{label}_rounds"] = rounds[side]
            row[f"{label}_new_over_old"] = row[f"new_{label}_ms"] / row[f"old_{label}_ms"]
        row["old_kernels"] = _kernels_old(old[name])
        row["new_kernels"] = _kernels_new()
        row["kernels_equal"] = [r[1:] for r in row["old_kernels"]] == [r[1:] for r in row["new_kernels"]]
        results.append(row)
        print(f"{name}: fwd {row['old_fwd_ms']:.3f} -> {row['new_fwd_ms']:.3f} ms ({row['fwd_new_over_old']:.3f}x), "
              f"fwd+bwd {row['old_fwd_bwd_ms']:.3f} -> {row['new_fwd_bwd_ms']:.3f} ms "
              f"({row['fwd_bwd_new_over_old']:.3f}x), outputs equal {same}, registers/spills equal "
              f"{row['kernels_equal']}", flush=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "triton": triton.__version__, "results": results}, indent=1))
        del q, k, v, do, steps
        torch.cuda.empty_cache()


def _no_grad(time_one: Any, fn: Any) -> float:
    import torch

    with torch.no_grad():
        return float(time_one(fn))


if __name__ == "__main__":
    main()
