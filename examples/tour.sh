#!/usr/bin/env bash
# The main job on a CPU-only machine: check the pattern library, analyse and draw a pattern, compile it to
# a kernel module and run that module on CPU tensors against a dense masked softmax.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${TOUR_OUT:-$(mktemp -d)}"
mkdir -p "$out"

echo "== patc check: every pattern of the library"
patc check patterns/*.pat

echo "== patc analyze: StreamingLLM at N = 32768, 16 heads, through 12 layers"
patc analyze patterns/streaming.pat -p streaming -N 32768 --heads 16 --layers 12

echo "== patc show: the mask at N = 2048 (terminal, then $out/streaming.png)"
patc show patterns/streaming.pat -p streaming -N 2048 -D w=256
patc show patterns/streaming.pat -p streaming -N 2048 -D w=256 -o "$out/streaming.png"

echo "== patc compile: $out/streaming_attn.py (and a standalone package, $out/streaming_pkg)"
patc compile patterns/streaming.pat -p streaming -D w=256 -o "$out/streaming_attn.py"
patc compile patterns/streaming.pat -p streaming -D w=256 -o "$out/streaming_pkg" --standalone

echo "== run the generated module on CPU tensors"
python - "$out/streaming_attn.py" <<'PY'
import importlib.util, sys, time
import numpy as np
import torch
import patterndsl

spec = importlib.util.spec_from_file_location("streaming_attn", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)

B, H, N, D = 1, 4, 1000, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
t0 = time.perf_counter()
out = mod.attention(q, k, v)
dt = time.perf_counter() - t0

program = patterndsl.load("patterns/streaming.pat", {"w": 256})
body = next(p.body for p in program.patterns if p.name == "streaming")
mask = torch.from_numpy(np.asarray(patterndsl.dense_mask(body, N)))
ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
err = (out.double() - ref).abs().max().item()
print(f"attention{tuple(q.shape)} on CPU: {dt * 1e3:.1f} ms, max |out - dense masked SDPA (float64)| = {err:.2e}")
assert err < 1e-4, err

sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[1]).parent))
import streaming_pkg  # the standalone package: its own copy of the runtime
assert torch.equal(streaming_pkg.attention(q, k, v), out)
print("the standalone package gives the same output")
PY
echo "tour done: files in $out"
