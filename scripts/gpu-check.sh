#!/usr/bin/env bash
# The accelerator path in one call, on a GPU machine with no network (the device tool), printing
# one JSON object: the CUDA tests, then `ra bench --synthetic llama-3-8b --context 32k,128k` in a
# 24 GB cap with 4-bit weights, and with bf16 weights when they fit (a run that does not fit is
# reported, not skipped).
#
#   scripts/gpu-check.sh                 on the GPU machine (carry .whl: see scripts/gpu-wheels.sh)
#   RA_GPU_SHAPE=tiny RA_GPU_CONTEXTS=2k scripts/gpu-check.sh     the same path at toy size on a CPU
#
# Environment: RA_GPU_SHAPE (llama-3-8b), RA_GPU_CONTEXTS (32k,128k), RA_GPU_MEM_GB (24),
# RA_GPU_STEPS (16), OUT (where logs and JSON go; default /tmp/ra-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ra-gpu-check}
SHAPE=${RA_GPU_SHAPE:-llama-3-8b}
CONTEXTS=${RA_GPU_CONTEXTS:-32k,128k}
MEM=${RA_GPU_MEM_GB:-24}
STEPS=${RA_GPU_STEPS:-16}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RA_CACHE_DIR=${RA_CACHE_DIR:-/tmp/ra-gpu-cache}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU machine: install what its image lacks, and ra
  SITE=/tmp/ra-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target "$SITE" . \
    || { echo '{"error": "install failed"}'; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$CUDA" = 1 ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda-tests.log" 2>&1
  TESTS=$?
  DEVICE=(--device cuda --gpu-mem-gb "$MEM")
  RUNS=("4bit:--load-in-4bit" "bf16:--dtype bfloat16")
  MODES=retrieval,full,offload
else
  TESTS=-1  # no GPU: CUDA tests do not apply
  DEVICE=(--device cpu)
  RUNS=("cpu:")
  MODES=retrieval,full
fi

for run in "${RUNS[@]}"; do
  name=${run%%:*}; flags=${run#*:}
  # shellcheck disable=SC2086  # flags are words
  "$PY" -m ra_cli bench --synthetic "$SHAPE" --context "$CONTEXTS" --modes "$MODES" --steps "$STEPS" \
    "${DEVICE[@]}" $flags --json > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.log"
  echo $? > "$OUT/bench-$name.rc"
done

"$PY" - "$OUT" "$TESTS" "${RUNS[@]}" <<'PY'
import json, pathlib, sys
out, tests, runs = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
report = {"cuda_tests": {-1: "not run (no CUDA)", 0: "passed"}.get(tests, f"failed (pytest exit {tests})")}
if tests not in (-1, 0):
    report["cuda_tests_log"] = (out / "cuda-tests.log").read_text()[-2000:]
for run in runs:
    name = run.split(":")[0]
    code = int((out / f"bench-{name}.rc").read_text())
    try:
        report[name] = json.loads((out / f"bench-{name}.json").read_text())
    except ValueError:
        report[name] = {"error": f"exit {code}", "log": (out / f"bench-{name}.log").read_text()[-1500:]}
print(json.dumps(report))
PY
