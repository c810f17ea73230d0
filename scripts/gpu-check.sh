#!/usr/bin/env bash
# The accelerator path on a GPU machine with no network (the device tool), printing one JSON
# object: the CUDA tests, then `ra bench --synthetic llama-3-8b --context 32k,128k` in a
# 24 GB cap with 4-bit weights, and with bf16 weights (a mode that does not fit is reported as
# such, not skipped).
#
#   scripts/gpu-wheels.sh && <device run, carry .whl>: scripts/gpu-check.sh
#   RA_GPU_SHAPE=tiny RA_GPU_CONTEXTS=2k scripts/gpu-check.sh     the same path at toy size on a CPU
#
# At the rates measured on an H200 (docs/benchmarks.md, 2026-12-01) the defaults take longer than
# one 10-minute device call: a 128K ingest of the 8B shape is ~100 s of prefill and minutes of index
# build. Within a session's 15 minutes, run it as two calls (a machine still warm keeps the kernels
# numba compiled in the first):
#   RA_GPU_RUNS=4bit RA_GPU_CONTEXTS=32k scripts/gpu-check.sh                  (tests + 32K)
#   RA_GPU_TESTS=0 RA_GPU_RUNS=4bit RA_GPU_CONTEXTS=128k scripts/gpu-check.sh  (128K)
#
# Environment: RA_GPU_SHAPE (llama-3-8b), RA_GPU_CONTEXTS (32k,128k), RA_GPU_MEM_GB (24),
# RA_GPU_STEPS (16), RA_GPU_RUNS (4bit,bf16), RA_GPU_LIMIT_S (seconds each size's bench may take,
# 600), RA_GPU_TESTS (1; 0 skips the CUDA tests), RA_GPU_TEST_LIMIT_S (300), RA_GPU_PROFILE (0; 1 adds
# benchmarks/gpu_profile.py's operation tables for the first size),
# OUT (where logs and JSON go; default /tmp/ra-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ra-gpu-check}
SHAPE=${RA_GPU_SHAPE:-llama-3-8b}
CONTEXTS=${RA_GPU_CONTEXTS:-32k,128k}
MEM=${RA_GPU_MEM_GB:-24}
STEPS=${RA_GPU_STEPS:-16}
LIMIT=${RA_GPU_LIMIT_S:-600}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RA_CACHE_DIR=${RA_CACHE_DIR:-/tmp/ra-gpu-cache}

if ! "$PY" -c "import hnswlib, bitsandbytes, gguf, pypdf, prompt_toolkit" 2>/dev/null; then  # the GPU machine's image lacks them
  ls .whl/*.whl >/dev/null 2>&1 || { echo '{"error": "ra needs hnswlib, bitsandbytes, gguf, pypdf, prompt_toolkit: carry .whl (scripts/gpu-wheels.sh)"}'; exit 1; }
  SITE=/tmp/ra-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo '{"error": "installing the carried wheels failed"}'; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ra itself runs from this tree

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  began=$SECONDS
  if [ "${RA_GPU_TESTS:-1}" = 1 ]; then
    timeout "${RA_GPU_TEST_LIMIT_S:-300}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda-tests.log" 2>&1
    TESTS=$?
  else
    TESTS=-2
  fi
  echo "cuda tests: exit $TESTS, $((SECONDS - began)) s" >&2
  DEVICE=(--device cuda --gpu-mem-gb "$MEM")
  declare -A FLAGS=([4bit]="--load-in-4bit" [bf16]="--dtype bfloat16")
  IFS=, read -ra NAMES <<< "${RA_GPU_RUNS:-4bit,bf16}"
  MODES=retrieval,static-on-host,full,offload
else
  TESTS=-1  # no GPU: CUDA tests do not apply
  DEVICE=(--device cpu)
  declare -A FLAGS=([cpu]="")
  NAMES=(cpu)
  MODES=retrieval,full
fi

IFS=, read -ra SIZES <<< "$CONTEXTS"
RUNS=()
for name in "${NAMES[@]}"; do
  for size in "${SIZES[@]}"; do  # one bench per size: a size that runs out of time keeps the others
    run=$name-$size; RUNS+=("$run")
    began=$SECONDS
    # shellcheck disable=SC2086  # flags are words
    timeout "$LIMIT" "$PY" -m ra_cli bench --synthetic "$SHAPE" --context "$size" --modes "$MODES" --steps "$STEPS" \
      "${DEVICE[@]}" ${FLAGS[$name]} --json > "$OUT/bench-$run.json" 2> "$OUT/bench-$run.log"
    echo $? > "$OUT/bench-$run.rc"
    echo "bench $run: exit $(cat "$OUT/bench-$run.rc"), $((SECONDS - began)) s" >&2
  done
done

if [ "${RA_GPU_PROFILE:-0}" = 1 ]; then  # where a decode step's time goes, on the first run's first size (cached)
  # shellcheck disable=SC2086
  timeout "$LIMIT" "$PY" benchmarks/gpu_profile.py "$SHAPE" "${SIZES[0]}" "${DEVICE[@]}" ${FLAGS[${NAMES[0]}]} \
    > "$OUT/profile.txt" 2> "$OUT/profile.log"
  echo "profile: exit $?" >&2
fi

"$PY" - "$OUT" "$TESTS" "${RUNS[@]}" <<'PY'
import json, pathlib, sys
out, tests, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
report = {"cuda_tests": {-1: "not run (no CUDA)", -2: "not run (RA_GPU_TESTS=0)", 0: "passed"}.get(tests, f"failed (pytest exit {tests})")}
if (out / "gpu.txt").is_file():
    report["gpu"] = (out / "gpu.txt").read_text().strip()
if tests > 0:
    report["cuda_tests_log"] = (out / "cuda-tests.log").read_text()[-3000:]
for run in runs:
    code = int((out / f"bench-{run}.rc").read_text())
    try:
        report[run] = json.loads((out / f"bench-{run}.json").read_text())
    except ValueError:
        report[run] = {"error": f"exit {code}" + (" (time limit)" if code == 124 else ""),
                       "log": (out / f"bench-{run}.log").read_text()[-3000:]}
if (out / "profile.txt").is_file():
    report["profile"] = (out / "profile.txt").read_text()[-12000:]
print(json.dumps(report))
PY
