"""The vocabulary of ra's options, in one light module: the CLI validates them before importing
torch, and every layer that acts on a choice imports it from here."""

from enum import Enum


class ComputeDtype(str, Enum):
    auto = "auto"  # bfloat16 (+ int4 decode weights) on CPU for llama-family models, else float32; bf16/fp16 on GPUs
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class WeightFormat(str, Enum):
    auto = "auto"  # int4 where exact, else int8, on CPU; dense on GPUs
    dense = "dense"  # the compute dtype throughout
    int8 = "int8"  # int8 rows for decode
    int4 = "int4"  # int4 groups for decode where they are exact, int8 rows elsewhere


class KvDtype(str, Enum):
    auto = "auto"  # the model's compute dtype: reloaded KV is bit-identical to what prefill made
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class PrefillMode(str, Enum):
    auto = "auto"  # sparse past ingest.SPARSE_FROM tokens on a CPU, else full
    full = "full"  # every chunk attends to all earlier tokens (quadratic)
    sparse = "sparse"  # sinks, recent window and selected blocks (linear)


class IndexKind(str, Enum):
    graph = "graph"  # attention-aware, built from prefill queries (ours)
    hnsw = "hnsw"  # hnswlib over centred keys: the key-only baseline
    flat = "flat"  # exact scan, nothing to build


class AttentionMode(str, Enum):
    retrieval = "retrieval"
    full = "full"
    flat = "flat"
    offload = "offload"
    graph = "graph"
    hnsw = "hnsw"


# A greedy step whose two likeliest next tokens are closer than this many nats is run again with
# exact attention (engine/generate.py prefill): on `ra eval` 0.25 did nearly what 0.5 did (agreement
# 0.977 vs 0.979 on the 8K document, 0.969 at both on Qwen at 32K) running 8-10% of steps again
# instead of 18% (docs/benchmarks.md, "Exact where it shows").
EXACT_MARGIN = 0.25
