#!/usr/bin/env bash
# The wheels a GPU machine without network needs besides its image (torch, transformers, numba,
# numpy, typer, rich, filelock, accelerate, safetensors are there), into .whl/ (git-ignored) for
# scripts/gpu-check.sh: carry `.whl` with the device call.
#
#   scripts/gpu-wheels.sh            # PY312: a Python of the GPU machine's version (default: python3.12)
#
# bitsandbytes ships a library per CUDA release (43 MB): only those of CUDA 13 and the CPU are kept,
# so that the carried tree stays far under the device tool's 64 MiB. hnswlib has no wheel on the
# registry: it is built here for portable x86-64 (HNSWLIB_NO_NATIVE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-python3.12}
PYTHON=${PYTHON:-python3}
WHEELS=.whl
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$WHEELS" bitsandbytes==0.50.2 gguf==0.19.0 pypdf==7.1.1 prompt_toolkit==3.0.53 wcwidth==0.9.4

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m wheel unpack -d "$work" "$WHEELS"/bitsandbytes-*.whl
find "$work" -name 'libbitsandbytes_*.so' ! -name '*_cuda13*' ! -name '*_cpu.so' -delete
rm "$WHEELS"/bitsandbytes-*.whl
"$PYTHON" -m wheel pack -d "$WHEELS" "$work"/bitsandbytes-*

HNSWLIB_NO_NATIVE=1 "$PY312" -m pip wheel -q --no-deps -w "$WHEELS" hnswlib==0.8.0
du -sh "$WHEELS"
ls "$WHEELS"
