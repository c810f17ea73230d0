"""The accelerator path (run by scripts/gpu-check.sh on a GPU machine; skipped without CUDA).

Synthetic models (random weights of a real architecture, made on the device): a GPU machine here
has no network and no room to carry a trained model, and what these tests check — that the split
attention, the streamed layers and the stored KV are exact, and that memory is planned — holds
for any weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()
CONTEXT = 1536


def synthetic(dtype: str, quantize: str | None = None):
    from ra_cli.model.load import load_synthetic

    return load_synthetic("tiny", "cuda", dtype, quantize=quantize)


def ingested(loaded, context: int = CONTEXT):
    """(store, the tokens after the context) of random tokens ingested on the device."""
    from ra_cli.bench.corpus import cached_tokens, random_tokens
    from ra_cli.index import IndexParams

    tokens, layout = random_tokens(loaded, context + 8)
    bench = cached_tokens(loaded, "cuda-test", tokens, layout, context, IndexParams(sinks=32, window=64), chunk_size=256)
    return bench.store, bench.continuation


def every_layer_searches(store, **overrides):
    from ra_cli.retrieval.modes import settings_for

    return settings_for(store, dense_below=0.0, dense_when_cheaper=False, exact_margin=0.0, **overrides)


def logits_of(loaded, cache, steps):
    from ra_cli.engine.generate import prefill

    return [prefill(loaded.model, cache, tokens).float().cpu() for tokens in steps]


@pytest.mark.parametrize("static_on_host", [False, True])
def test_retrieval_with_a_full_budget_equals_full_attention_on_the_device(static_on_host):
    """The split path (static set on the GPU, every indexed key retrieved on the CPU, merged by
    log-sum-exp through one page-locked transfer), and the static sets kept in host memory too (one
    CPU call per layer): full attention, up to float32 rounding."""
    from ra_cli.retrieval.modes import open_cache, retrieval_cache

    loaded = synthetic("float32")
    store, following = ingested(loaded)
    n = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    steps = [following[:4]] + [[t] for t in following[4:8]]
    want = logits_of(loaded, open_cache(loaded, store, "full"), steps)
    cache = retrieval_cache(loaded, store, every_layer_searches(store, top_k=n, ef=n, window=10_000),
                            static_on_host=static_on_host)
    assert all(layer.keys.is_cuda != static_on_host for layer in cache.layers)
    got = logits_of(loaded, cache, steps)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)
    stats = cache.retrieval_stats
    assert stats.searches > 0 and stats.dense_layers == [] and stats.wait_seconds > 0


def test_bf16_kv_round_trips_through_the_store():
    """Stored bf16 bits reload as the same device tensors the prefill made."""
    from ra_cli.retrieval.modes import open_cache

    loaded = synthetic("bfloat16")
    store, _ = ingested(loaded)
    assert store.kv_dtype == "bfloat16"
    layer = open_cache(loaded, store, "full").layers[1]
    assert layer.keys.device.type == "cuda"
    stored = torch.from_numpy(np.array(store.keys(1)).view(np.int16)).view(torch.bfloat16)
    torch.testing.assert_close(layer.keys[0, :, : store.n_tokens].cpu(), stored, atol=0, rtol=0)


def test_a_prefill_that_cannot_keep_every_layer_on_the_device_streams_the_rest_and_stores_the_same(monkeypatch):
    """With room for one layer's KV, the other is kept in page-locked host memory and streamed per
    chunk; the stored KV and index inputs are those of an ingest with room for all."""
    import ra_cli.engine.device_memory as device_memory
    import ra_cli.ingest as ingest_module
    from ra_cli.engine.cache import HostKVLayer
    from ra_cli.engine.device_memory import kv_bytes, prefill_reserve

    loaded = synthetic("float32")
    whole, _ = ingested(loaded)
    shape = whole.manifest["model_shape"]
    layer = kv_bytes(CONTEXT, shape["kv_heads"], shape["head_dim"], 4)
    reserve = prefill_reserve(loaded.model.config, 256, 4, layer)
    monkeypatch.setattr(device_memory, "room", lambda device: reserve + layer + layer // 2)
    made = []
    planned = ingest_module.prefill_cache
    monkeypatch.setattr(ingest_module, "prefill_cache", lambda *a: made.append(planned(*a)) or made[-1])
    monkeypatch.setenv("RA_CACHE_DIR", str(whole.path.parent.parent / "streamed"))
    streamed, _ = ingested(loaded)
    assert [type(layer).__name__ for layer in made[0].layers] == ["DeviceKVLayer", "HostKVLayer"]
    assert made[0].layers[1].keys.is_pinned() and isinstance(made[0].layers[1], HostKVLayer)
    for i in range(2):
        assert np.array_equal(np.array(streamed.keys(i)), np.array(whole.keys(i)))
        assert np.array_equal(np.array(streamed.values(i)), np.array(whole.values(i)))
    timeless = lambda store: {k: {f: v for f, v in entry.items() if f != "build_seconds"}  # noqa: E731
                              for k, entry in store.manifest["index"]["layers"].items()}
    assert timeless(streamed) == timeless(whole)
    for name in ("graph_001.npy", "selected_001.npy"):
        assert (streamed.path / "index" / name).read_bytes() == (whole.path / "index" / name).read_bytes()


def test_full_attention_that_does_not_fit_says_so_and_dense_layers_stream(monkeypatch):
    """Beyond the room, full attention is refused with what to do; a retrieval cache's dense
    layers that do not fit attend exactly from host memory instead."""
    import ra_cli.retrieval.modes as modes
    from ra_cli.engine.device_memory import DoesNotFit
    from ra_cli.retrieval.modes import open_cache

    loaded = synthetic("float32")
    store, following = ingested(loaded)
    want = logits_of(loaded, open_cache(loaded, store, "full"), [following[:4], [following[4]]])
    monkeypatch.setattr("ra_cli.engine.device_memory.room", lambda device: 1024)
    with pytest.raises(DoesNotFit, match="--attention retrieval"):
        open_cache(loaded, store, "full")
    cache = open_cache(loaded, store, "retrieval", modes.settings_for(store, dense_below=1.1))  # every layer dense
    assert {type(layer).__name__ for layer in cache.layers} == {"HostKVLayer"}
    for a, b in zip(want, logits_of(loaded, cache, [following[:4], [following[4]]])):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_the_memory_cap_is_honoured():
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


@pytest.mark.parametrize("weights, modes", [([], "retrieval,static-on-host,full,offload"),
                                            (["--load-in-4bit"], "retrieval,static-on-host")])
def test_synthetic_shape_runs_the_bench_on_the_device(weights, modes):
    from ra_cli.cli import app

    result = runner.invoke(app, ["bench", "--synthetic", "tiny", "--context", "2k", "--steps", "3", "--json",
                                 "--modes", modes, "--device", "cuda", "--gpu-mem-gb", "8", *weights])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["synthetic"] and [run["mode"] for run in report["runs"]] == modes.split(",")
    assert all(run["peak_device_bytes"] > 0 for run in report["runs"])
    for retrieval in report["runs"][:2]:
        assert retrieval["keys_scanned"] > 0 and retrieval["dense_layers"] == [] and retrieval["device_wait_ms"] > 0
    assert ("4bit" in report["runs"][0]["dtype"]) == bool(weights)


def test_a_model_directory_chats_on_the_device(tmp_path, monkeypatch):
    """`ra chat --device cuda` end to end on a transformers checkpoint made on the spot: GPU ingest,
    the split retrieval path (with citations' weights) and full attention; in float32 with the
    search covering every key the two answer alike, and bf16 (the GPU default) runs as well."""
    from model_maker import TEXT, tiny_model_dir

    from ra_cli.cli import app

    model = tiny_model_dir(tmp_path / "model")
    (tmp_path / "doc.txt").write_text(TEXT * 40)
    monkeypatch.chdir(tmp_path)
    ask = ["chat", "doc.txt", "--model", str(model), "--device", "cuda", "--ask", "Who climbed the stairs?", "-n", "6",
           "--json", "--dtype", "float32"]
    exhaustive = ["--search-every-layer", "--top-k", "5000", "--ef", "5000", "--exact-margin", "0"]
    results = [runner.invoke(app, ask + extra) for extra in (["--attention", "full"], exhaustive)]
    for result in results:
        assert result.exit_code == 0, result.output
    full, searched = (json.loads(result.stdout.strip().splitlines()[-1]) for result in results)
    assert full["tokens"] == 6 and full["answer"] == searched["answer"] and "sources" in searched
    bf16 = runner.invoke(app, ask[:-2] + ["--search-every-layer"])
    assert bf16.exit_code == 0, bf16.output
    assert json.loads(bf16.stdout.strip().splitlines()[-1])["tokens"] == 6
