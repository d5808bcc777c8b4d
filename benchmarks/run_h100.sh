#!/usr/bin/env bash
# One H100 call (the `device` tool) that validates a version: the gpu-marked tests, then the forward and
# the forward+backward benchmarks (ours vs FlexAttention vs SDPA, side by side). Each stage has a time
# box so a slow one cannot starve the next; results are written as they come, under $OUT.
#   run: bash benchmarks/run_h100.sh   (carry .whl/ with the lark wheel, from benchmarks/fetch_wheels.sh: that
#   machine has no network)
# GPU_TESTS=paths narrows the gpu tests, COMPARE_ONLY=case,case the runtime comparison (a short call's re-check)
set -uo pipefail
OUT=${OUT:-/tmp/patterndsl-h100}
mkdir -p "$OUT"
# .whlhf/ (transformers and its dependencies), where carried, serves the HF tests and bench_hf.py
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  $(ls .whlhf/*.whl 2>/dev/null)
# WITH_FA4=1: every stage sees FlashAttention-4 where benchmarks/fa4_carry.sh installed it (the fa4 backend's tests)
fa4path=""; [ -n "${WITH_FA4:-}" ] && [ -d /tmp/fa4site ] && fa4path=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:
export PYTHONPATH=$fa4path/tmp/site:$PWD PATTERNDSL_CACHE_DIR=${PATTERNDSL_CACHE_DIR:-/tmp/patterndsl-cache} PATTERNDSL_FAILURE_LOG=$OUT/failures.txt
log="$OUT/run.log"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >> "$log" 2>&1  # appended: one call may run this script twice

stage() {  # stage NAME SECONDS CMD...: run with a time box, keep the tail of its output in run.log
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  # its own process group, killed whole afterwards: a timed-out pytest's xdist workers (or a benchmark's
  # compile workers) must not keep the GPU and the CPU busy under the next stage's timings
  setsid timeout "$secs" "$@" > "$OUT/$name.out" 2>&1 &
  local pid=$!
  wait "$pid"
  local rc=$?
  kill -KILL -- "-$pid" 2>/dev/null
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" >> "$log"
  tail -n "${TAIL:-40}" "$OUT/$name.out" >> "$log"
  rm -f "$OUT/$name.out"
}

# a few workers holding float64 references; failures go to failures.txt as they happen (the whole gpu suite
# takes about 125 s with -n 5); forward 150 s (its warm-up compiles the tuning candidates), backward 190 s:
# 580 s of a 600 s call
# a stage whose box is 0 (T_BWD=0, ...) is skipped
if [ -z "${ONLY_EXTRA:-}" ]; then
  if [ "${T_TESTS:-240}" != 0 ]; then
    TAIL=80 stage gpu_tests "${T_TESTS:-240}" python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/gpu/} -n "${WORKERS:-5}" --maxfail=5 \
      --tb=short -rfE -p no:cacheprovider -p no:benchmark
  fi
  if [ "${T_FWD:-150}" != 0 ]; then stage bench_forward "${T_FWD:-150}" python3 benchmarks/bench_forward.py "$OUT"; fi
  if [ "${T_BWD:-190}" != 0 ]; then
    TAIL=25 stage bench_backward "${T_BWD:-190}" python3 benchmarks/bench_backward.py "$OUT"
  fi
fi
# SWEEP=1: also the backward tile sweep (about 50 s at D = 128; the three stages above leave ~130 s of a 600 s call)
if [ -n "${SWEEP:-}" ]; then TAIL=15 stage sweep_backward "${T_SWEEP:-120}" python3 benchmarks/sweep_backward.py "$OUT"; fi
# ONLY_EXTRA=1 skips the three stages above; then any of these (each about 2-4 minutes with its peers):
# SELECTORS=1 (issue 7, all three N, Flex included), VARLEN=1 (issue 9, Flex's fwd+bwd included), LAYOUTS=1
# (issue 6, forward and forward+backward)
if [ -n "${SELECTORS:-}" ]; then TAIL=20 stage bench_selectors "${T_SEL:-200}" python3 benchmarks/bench_selectors.py "$OUT"; fi
if [ -n "${VARLEN:-}" ]; then TAIL=20 stage bench_varlen "${T_VARLEN:-240}" env BENCH_DEADLINE=$(( ${T_VARLEN:-240} - 20 )) \
  python3 benchmarks/bench_varlen.py "$OUT/varlen_h100.json" "$OUT/varlen_h100.md"; fi
# SCALING=1 (issue 8: the 1-D patterns at N 4096..131072, D 64 and 128, fwd and fwd+bwd; resumes the committed
# grid in benchmarks/results/, so each call adds the cells its box allows)
if [ -n "${SCALING:-}" ]; then
  prior=(); [ -f benchmarks/results/scaling_h100.json ] && prior=(--resume benchmarks/results/scaling_h100.json)
  TAIL=10 stage bench_scaling "${T_SCALING:-300}" env BENCH_DEADLINE=$(( ${T_SCALING:-300} - 60 )) \
    python3 benchmarks/bench_scaling.py "$OUT/scaling_h100.json" "${prior[@]}"
fi
# GRAPHS=1: forward+backward eager and as a replayed CUDA graph at N = 4096 (about 4 minutes with Flex's compiles)
if [ -n "${GRAPHS:-}" ]; then TAIL=15 stage bench_graphs "${T_GRAPHS:-280}" python3 benchmarks/bench_graphs.py "$OUT"; fi
if [ -n "${LAYOUTS:-}" ]; then TAIL=20 stage bench_layouts "${T_LAYOUTS:-200}" env BENCH_BWD=1 python3 benchmarks/bench_layouts.py "$OUT"; fi
# VIDEO_DIT=1 (issue 23: 226 text tokens before a 16 x 32 x 32 latent, vs Flex with its mask build and dense SDPA)
if [ -n "${VIDEO_DIT:-}" ]; then TAIL=10 stage bench_video_dit "${T_VIDEO_DIT:-240}" python3 benchmarks/bench_video_dit.py "$OUT/video_dit_h100.json"; fi
# COMPARE=OLD_TREE (issue 20: this checkout against an older one, kernel for kernel; see compare_runtime.py)
if [ -n "${COMPARE:-}" ]; then TAIL=30 stage compare_runtime "${T_COMPARE:-200}" python3 benchmarks/compare_runtime.py "$COMPARE" "$OUT/compare_runtime.json" ${COMPARE_ONLY:+--only "$COMPARE_ONLY"}; fi
# FLEX_MASK=1 (issue 22: to_flex_block_mask against create_block_mask up to 1M tokens)
if [ -n "${FLEX_MASK:-}" ]; then TAIL=20 stage bench_flex_mask "${T_FLEX_MASK:-90}" python3 benchmarks/bench_flex_mask.py "$OUT/flex_mask_h100.json"; fi
# DECODE=1 (issue 21: decode steps against FlashAttention-style peers), PATTERN_CACHE=1 (the retaining cache)
if [ -n "${DECODE:-}" ]; then
  fa4=(); [ -d /tmp/fa4site ] && fa4=(PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH)
  TAIL=20 stage bench_decode "${T_DECODE:-240}" env "${fa4[@]}" BENCH_DEADLINE=$(( ${T_DECODE:-240} - 30 )) \
    python3 benchmarks/bench_decode.py "$OUT/decode_h100.json"
fi
# DECODE_QUICK=1: only issue 21's open criteria (selector step, flat window + sinks, paged vs contiguous), ~100 s
if [ -n "${DECODE_QUICK:-}" ]; then TAIL=20 stage bench_decode_quick "${T_DECODE_QUICK:-150}" env BENCH_QUICK=1 \
  BENCH_DEADLINE=$(( ${T_DECODE_QUICK:-150} - 30 )) python3 benchmarks/bench_decode.py "$OUT/decode_quick_h100.json"; fi
if [ -n "${PATTERN_CACHE:-}" ]; then TAIL=20 stage bench_pattern_cache "${T_PATTERN_CACHE:-90}" python3 benchmarks/bench_pattern_cache.py "$OUT/pattern_cache_h100.json"; fi
# BWD_SPLIT=1 (the dK/dV rows split over programs, automatic against bwd_split=0, NSA / sinks / Longformer)
if [ -n "${BWD_SPLIT:-}" ]; then TAIL=20 stage bench_bwd_split "${T_BWD_SPLIT:-150}" python3 benchmarks/bench_bwd_split.py "$OUT/bwd_split_h100.json"; fi
# NSA=1 (issue 23: the NSA-like model's branches)
if [ -n "${NSA:-}" ]; then TAIL=20 stage bench_nsa "${T_NSA:-150}" python3 benchmarks/bench_nsa.py "$OUT/nsa_h100.json"; fi
# HF=1 (issue 22: a Llama-style model's training step and generation; carry .whlhf/ with transformers' wheels)
if [ -n "${HF:-}" ]; then
  TAIL=20 stage bench_hf "${T_HF:-240}" env BENCH_DEADLINE=$(( ${T_HF:-240} - 30 )) BENCH_PARTS=${HF_PARTS:-training,generation} \
    python3 benchmarks/bench_hf.py "$OUT/hf_h100.json"
fi
# PEERS=1 (issue 24: ours vs FA4, Flex FLASH, Flex Triton and SDPA; FA4 where benchmarks/fa4_carry.sh installed it)
if [ -n "${PEERS:-}" ]; then
  fa4=(); [ -d /tmp/fa4site ] && fa4=(PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH)
  TAIL=60 stage bench_peers "${T_PEERS:-400}" env "${fa4[@]}" BENCH_DEADLINE=$(( ${T_PEERS:-400} - 60 )) \
    python3 benchmarks/bench_peers.py "$OUT/peers_h100.json" ${PEERS_ARGS:-}
fi
# HOST=1 (issue 24: host time of an eager N = 4096 training step, ours vs Flex and SDPA)
if [ -n "${HOST:-}" ]; then TAIL=12 stage bench_host "${T_HOST:-200}" python3 benchmarks/bench_host.py "$OUT/host_h100.json"; fi
# PERMUTE=1 (issue 23: a run-time token order, PBS-Attn's patterns, against the same patterns unpermuted)
if [ -n "${PERMUTE:-}" ]; then TAIL=20 stage bench_permute "${T_PERMUTE:-90}" python3 benchmarks/bench_permute.py "$OUT/permute_h100.json"; fi
# MINFERENCE=1 (issue 23: vertical-slash prefill at 128k against Flex with the same selection, and SDPA)
if [ -n "${MINFERENCE:-}" ]; then TAIL=20 stage bench_minference "${T_MINFERENCE:-300}" env BENCH_DEADLINE=$(( ${T_MINFERENCE:-300} - 40 )) \
  python3 benchmarks/bench_minference.py "$OUT/minference_h100.json"; fi
# CP=1 (issue 25: context parallelism on this one GPU, the rank's spans path against the single call)
if [ -n "${CP:-}" ]; then TAIL=20 stage bench_context_parallel "${T_CP:-150}" torchrun --nproc-per-node=1 \
  benchmarks/bench_context_parallel.py "$OUT/context_parallel_h100.json"; fi
# LAYOUT_CHOICE=1: every library layout pattern with its token layout and in the plain order (about 3 minutes)
if [ -n "${LAYOUT_CHOICE:-}" ]; then TAIL=20 stage bench_layout_choice "${T_LAYOUT_CHOICE:-200}" env BENCH_DEADLINE=$(( ${T_LAYOUT_CHOICE:-200} - 30 )) \
  python3 benchmarks/bench_layout_choice.py "$OUT/layout_choice_h100.json"; fi
ls -la "$OUT" >> "$log"
