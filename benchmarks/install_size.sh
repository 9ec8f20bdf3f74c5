#!/usr/bin/env bash
# Installed size and import time of the runtime (base) install versus the export and serve extras,
# each in a new virtual environment. Usage: [INSTALLS="base serve"] bash benchmarks/install_size.sh [OUT.md]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/benchmarks/results/install-size.md}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
measure() {  # name, pip spec
  python3 -m venv "$TMP/$1" >/dev/null
  "$TMP/$1/bin/pip" install -q --disable-pip-version-check "$2" >/dev/null 2>&1
  size=$(du -sm "$TMP/$1" | cut -f1)
  best=999
  for _ in 1 2 3 4 5; do
    t=$("$TMP/$1/bin/python" -c "import time; t=time.perf_counter(); import q3vl; from q3vl import Embedder; print(round(time.perf_counter()-t, 3))")
    best=$(python3 -c "print(min($best, $t))")
  done
  torch=$("$TMP/$1/bin/python" -c "import sys, q3vl; from q3vl import Embedder; print('torch' in sys.modules)")
  ort=$("$TMP/$1/bin/python" -c "import time; t=time.perf_counter(); import q3vl.runtime, onnxruntime; print(round(time.perf_counter()-t, 3))")
  echo "| $1 | $size MB | ${best} s | ${ort} s | $torch |"
}
{
  echo "| install | venv size | import q3vl + Embedder (best of 5) | + import onnxruntime | torch imported |"
  echo "|---|---|---|---|---|"
  for name in ${INSTALLS:-base export serve}; do
    if [ "$name" = base ]; then measure base "$ROOT"; else measure "$name" "$ROOT[$name]"; fi
  done
} | tee "$OUT"
