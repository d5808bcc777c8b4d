#!/usr/bin/env bash
# FlashAttention-4 on the lent GPU, which has no network: its wheels (flash-attn-4 and its CuTe DSL
# dependencies, ~98 MB) exceed one call's carry, so they travel in two calls made while the machine stays
# warm. Call 1 carries .fa4a/ (the small wheels and the first part of the libs-cu13 wheel), call 2 carries
# .fa4b/ (the second part and its sha256; benchmarks/fetch_wheels.sh makes both); each call runs `bash benchmarks/fa4_carry.sh`, which keeps what
# came in /tmp/fa4dl and, once both parts are there, joins and installs them into /tmp/fa4site.
# Then: export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# (`pip --target` does not run the package's .pth file, which would add dsl_packages).
set -euo pipefail
mkdir -p /tmp/fa4dl
for d in .fa4a .fa4b; do [ -d "$d" ] && cp "$d"/* /tmp/fa4dl/; done
cd /tmp/fa4dl
if [ -f cu13.part.aa ] && [ -f cu13.part.ab ] && [ ! -d /tmp/fa4site ]; then
  whl=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  cat cu13.part.aa cu13.part.ab > "$whl"
  echo "$(cat cu13.sha)  $whl" | sha256sum -c -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa4site ./*.whl
  echo "FA4 installed in /tmp/fa4site"
else
  ls /tmp/fa4dl
fi
