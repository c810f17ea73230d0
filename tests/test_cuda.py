"""The accelerator path (run by scripts/gpu-check.sh on a GPU machine; skipped without CUDA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import LIGHTHOUSE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()


@pytest.fixture(scope="module")
def on_gpu(model_cache_dir):
    """The embedded model in bf16 on the GPU: the accelerator's default."""
    import os

    os.environ["RA_CACHE_DIR"] = str(model_cache_dir.parent / "ra-gpu-cache")
    (model_cache_dir.parent / "ra-gpu-cache").mkdir(exist_ok=True)
    if not (model_cache_dir.parent / "ra-gpu-cache" / "models").exists():
        (model_cache_dir.parent / "ra-gpu-cache" / "models").symlink_to(model_cache_dir, target_is_directory=True)
    from ra_cli.model import load_model

    return load_model(None, device="cuda", dtype="auto")


@pytest.fixture(scope="module")
def gpu_context(tmp_path_factory, on_gpu):
    from ra_cli.document import load_document
    from ra_cli.index import IndexParams
    from ra_cli.ingest import IngestOptions, ingest
    from ra_cli.store import ContextStore

    path = tmp_path_factory.mktemp("gpu") / "doc.txt"
    path.write_text((LIGHTHOUSE + "\n") * 11)
    out = path.parent / "ctx.idx"
    ingest(on_gpu, load_document(path), out, IngestOptions(chunk_size=256, index=IndexParams(sinks=32, window=64)))
    return ContextStore.open(out, on_gpu.fingerprint)


def test_bf16_kv_round_trips_through_the_store(gpu_context, on_gpu):
    """Stored bf16 bits reload as the same device tensors the prefill made."""
    from ra_cli.retrieval.modes import open_cache

    assert gpu_context.kv_dtype in ("bfloat16", "float16")
    cache = open_cache(on_gpu, gpu_context, "full")
    layer = cache.layers[7]
    assert layer.keys.device.type == "cuda"
    stored = torch.from_numpy(np.array(gpu_context.keys(7)).view(np.int16)).view(torch.bfloat16) \
        if gpu_context.kv_dtype == "bfloat16" else torch.from_numpy(np.array(gpu_context.keys(7)))
    torch.testing.assert_close(layer.keys[0, :, : gpu_context.n_tokens].cpu(), stored, atol=0, rtol=0)


def test_retrieval_with_a_full_budget_equals_full_attention_on_the_device(gpu_context, on_gpu):
    """The split path: static set on the GPU, retrieved keys on the CPU, merged by log-sum-exp."""
    from ra_cli.engine.generate import prefill
    from ra_cli.retrieval.layer import RetrievalSettings
    from ra_cli.retrieval.modes import open_cache

    n = gpu_context.manifest["index"]["hi"] - gpu_context.manifest["index"]["lo"]
    full = open_cache(on_gpu, gpu_context, "full")
    cache = open_cache(on_gpu, gpu_context, "retrieval", RetrievalSettings(top_k=n, ef=n, window=10_000))
    tokens = on_gpu.tokenizer(" Who was the keeper?", add_special_tokens=False).input_ids
    for want, got in [(prefill(on_gpu.model, full, tokens), prefill(on_gpu.model, cache, tokens))] + [
            (prefill(on_gpu.model, full, [t]), prefill(on_gpu.model, cache, [t])) for t in (100, 200, 300)]:
        p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
        assert int(want.argmax()) == int(got.argmax()) and float((p.exp() * (p - q)).sum()) < 0.01
    assert cache.retrieval_stats.searches > 0


def test_the_memory_cap_is_honoured(on_gpu):
    """Beyond --gpu-mem-gb an allocation fails as on a smaller card, and the CLI says so in one line."""
    from ra_cli.errors import explain as describe
    from ra_cli.model.load import cap_device_memory

    cap_device_memory("cuda", 1.0)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
            torch.empty(int(1.5 * 2**30), dtype=torch.uint8, device="cuda")
        message, code = describe(caught.value)
        assert code == 1 and "ran out of memory" in message
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_synthetic_shape_runs_the_bench_on_the_device():
    from ra_cli.cli import app

    result = runner.invoke(app, ["bench", "--synthetic", "tiny", "--context", "2k", "--steps", "3", "--json",
                                 "--modes", "retrieval,full", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["synthetic"] and all(run["peak_device_bytes"] > 0 for run in report["runs"])
