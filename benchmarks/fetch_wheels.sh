#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, fetched here (it has no network): .whl/ (lark, for every call of
# run_h100.sh) and FlashAttention-4 with its CuTe DSL in two halves, .fa4a/ and .fa4b/, each under one call's
# 64 MiB carry (benchmarks/fa4_carry.sh joins and installs them there). The three folders are ignored by git
# (.git/info/exclude), so a fresh checkout has none: run this once, from the repository root.
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
get() { python3 -m pip download -q --no-deps "${plat[@]}" -d "$@"; }
for d in /.whl/ /.fa4a/ /.fa4b/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
get .whl lark==1.3.1
tmp=$(mktemp -d)
# the versions FA4's sm90 kernels ran with on the lent H100 (issue 24); 4.7.0 of the DSL lacks its Python front end
get "$tmp" flash-attn-4==4.0.0b36 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1
big=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
split -b 48M "$tmp/$big" "$tmp/cu13.part."
sha256sum "$tmp/$big" | cut -d' ' -f1 > .fa4b/cu13.sha
mv "$tmp/cu13.part.aa" .fa4a/ && mv "$tmp/cu13.part.ab" .fa4b/ && rm "$tmp/$big"
mv "$tmp"/*.whl .fa4a/ && rmdir "$tmp"
du -sh .whl .fa4a .fa4b
