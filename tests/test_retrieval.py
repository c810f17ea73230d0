"""Retrieval attention: exact when the budget covers every key, sensible when it does not,
and usable end to end from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import LIGHTHOUSE
from ra_cli.chat import ChatSession
from ra_cli.engine.cache import DeviceKVLayer
from ra_cli.retrieval.cost import expected_reads, search_is_cheaper
from ra_cli.retrieval.modes import cheaper_dense_layers, open_cache
from ra_cli.cli import app
from ra_cli.document import load_document
from ra_cli.engine.generate import prefill
from ra_cli.retrieval.layer import RetrievalLayer, RetrievalSettings
from ra_cli.index import IndexParams
from ra_cli.ingest import IngestOptions, ingest
from ra_cli.store import ContextStore

runner = CliRunner()
QUESTION = "Who was the keeper in 1902?"


def _small_context(tmp_path_factory, model):
    """~1.1K tokens with a small static set (32 sinks + 64 recent), so most keys are indexed."""
    path = tmp_path_factory.mktemp("ret") / "doc.txt"
    path.write_text((LIGHTHOUSE + "\n") * 11)
    out = path.parent / "ctx.idx"
    ingest(model, load_document(path), out, IngestOptions(chunk_size=256, index=IndexParams(sinks=32, window=64)))
    return ContextStore.open(out, model.fingerprint)


@pytest.fixture(scope="module")
def small_context(tmp_path_factory, loaded):
    return _small_context(tmp_path_factory, loaded)


@pytest.fixture(scope="module")
def small_context_fast(tmp_path_factory, loaded_fast):
    """The same context made by the CPU default: bf16 KV on disk (uint16 bits), int4 weights."""
    return _small_context(tmp_path_factory, loaded_fast)


def question_tokens(loaded, store):
    from ra_cli.prompt import Prompter, PromptLayout

    return Prompter(loaded.tokenizer, PromptLayout.from_dict(store.manifest["prompt"])).question_tokens(QUESTION, True)


@pytest.mark.parametrize("attention", ["retrieval", "flat"])
def test_full_budget_equals_full_attention(small_context, loaded, attention):
    store = small_context
    n_indexed = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    tokens = question_tokens(loaded, store)
    full = open_cache(loaded, store, "full")
    reference = [prefill(loaded.model, full, tokens)]
    everything = RetrievalSettings(top_k=n_indexed, ef=n_indexed, window=10_000, dense_when_cheaper=False, exact_margin=0)
    cache = open_cache(loaded, store, attention, everything)
    got = [prefill(loaded.model, cache, tokens)]
    for token in (100, 200, 300):  # decode steps: one query position at a time
        reference.append(prefill(loaded.model, full, [token]))
        got.append(prefill(loaded.model, cache, [token]))
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-4)
        assert int(a.argmax()) == int(b.argmax())
    assert cache.retrieval_stats.searches > 0


@pytest.mark.parametrize("attention", ["retrieval", "flat"])
def test_full_budget_equals_full_attention_with_bf16_kv(small_context_fast, loaded_fast, attention):
    """The CPU default stores bf16 KV: every retrieval layer's attention over the static set and
    every retrieved key equals exact float32 attention over the same keys (full-attention layers
    compute it with bf16 matmuls, to bf16 precision); end to end, bf16 rounding leaves the same
    tokens and a tiny divergence."""
    loaded, store = loaded_fast, small_context_fast
    assert store.kv_dtype == "bfloat16" and store.keys(0).dtype == np.uint16
    n_indexed = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    everything = RetrievalSettings(top_k=n_indexed, ef=n_indexed, window=10_000, dense_when_cheaper=False, exact_margin=0)
    full, cache = open_cache(loaded, store, "full"), open_cache(loaded, store, attention, everything)
    generator = torch.Generator().manual_seed(4)
    for index in (0, 11, 29):
        key, value = (torch.randn(1, 3, 1, 64, generator=generator).bfloat16() for _ in range(2))  # as the model rounds them
        query = torch.randn(1, 9, 1, 64, generator=generator) * 3
        for layer in (full.layers[index], cache.layers[index]):
            layer.update(key, value)
        dense = full.layers[index]
        keys, values = (t[:, :, : dense.length].float() for t in (dense.keys, dense.values))
        reference = torch.softmax(torch.einsum("bhqd,bhnd->bhqn", query, keys.repeat_interleave(3, 1)) * 0.125, -1)
        reference = torch.einsum("bhqn,bhnd->bhqd", reference, values.repeat_interleave(3, 1))
        assert dense.keys.dtype == torch.bfloat16  # full attention streams half the bytes...
        torch.testing.assert_close(dense.attend(query, 0.125), reference, atol=0.05, rtol=0)  # ...in bf16 matmuls
        torch.testing.assert_close(cache.layers[index].attend(query, 0.125), reference, atol=1e-5, rtol=1e-5)
    tokens = question_tokens(loaded, store)
    full, cache = open_cache(loaded, store, "full"), open_cache(loaded, store, attention, everything)
    pairs = [(prefill(loaded.model, full, tokens), prefill(loaded.model, cache, tokens))]
    pairs += [(prefill(loaded.model, full, [token]), prefill(loaded.model, cache, [token])) for token in (100, 200, 300)]
    for want, got in pairs:
        p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
        assert int(want.argmax()) == int(got.argmax()) and float((p.exp() * (p - q)).sum()) < 0.01


def test_default_budget_tracks_full_attention(small_context, loaded):
    store = small_context
    tokens = question_tokens(loaded, store)
    full = open_cache(loaded, store, "full")
    cache = open_cache(loaded, store, "retrieval", RetrievalSettings(top_k=100, dense_when_cheaper=False, exact_margin=0))
    a = torch.log_softmax(prefill(loaded.model, cache, tokens), -1)
    b = torch.log_softmax(prefill(loaded.model, full, tokens), -1)
    kl = float((b.exp() * (b - a)).sum())
    assert kl < 0.05 and int(a.argmax()) == int(b.argmax())
    stats = cache.retrieval_stats.as_dict()
    assert 0 < stats["keys_scanned_per_search"] <= store.manifest["index"]["hi"] - store.manifest["index"]["lo"] + 64


@pytest.mark.parametrize("fast", [False, True])
def test_uncertain_steps_run_again_with_exact_attention(small_context, small_context_fast, loaded, loaded_fast, fast):
    """With an exact margin the question is read with exact attention, and a step whose two
    likeliest tokens are closer than the margin is run again exactly: its logits (and the KV it
    leaves for later steps) are full attention's, in float32 and with the CPU default's bf16 KV
    and int4 weights; a step outside the margin keeps retrieval's own logits."""
    loaded, store = (loaded_fast, small_context_fast) if fast else (loaded, small_context)
    tokens, steps = question_tokens(loaded, store), (100, 200, 300)

    def logits(mode, settings=None):
        cache = open_cache(loaded, store, mode, settings)
        return [prefill(loaded.model, cache, tokens)] + [prefill(loaded.model, cache, [t]) for t in steps], cache

    small = dict(top_k=8, ef=16, dense_when_cheaper=False)  # far from every key: retrieval's logits differ
    reference, _ = logits("full")
    approximate, plain = logits("retrieval", RetrievalSettings(**small, exact_margin=0))
    assert plain.exact_steps == 0
    assert max(float((a - b).abs().max()) for a, b in zip(approximate, reference)) > 0.05
    always, cache = logits("retrieval", RetrievalSettings(**small, exact_margin=1e9))
    assert cache.exact_steps == 3 and cache.exact_seconds > 0  # the question's forward was exact from the start
    assert cache.retrieval_stats.searches > 0  # each step searched first, then ran again
    # whatever the search returned, the exact forward is the same: bit for bit what it gives
    # after a search that returned every key
    n_indexed = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    every_key, _ = logits("retrieval", RetrievalSettings(top_k=n_indexed, ef=n_indexed, dense_when_cheaper=False,
                                                         exact_margin=1e9))
    for got, want, same in zip(always, reference, every_key):
        assert torch.equal(got, same)
        assert int(got.argmax()) == int(want.argmax())
        if fast:  # bf16 KV and int4 weights: full attention's bf16 matmuls round differently (test above)
            p, q = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
            assert float((p.exp() * (p - q)).sum()) < 0.01
        else:
            torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    # the margin decides per step: just above a step's own gap redoes it, just below does not
    cache = open_cache(loaded, store, "retrieval", RetrievalSettings(**small, exact_margin=1e-9))
    prefill(loaded.model, cache, tokens)
    top = torch.topk(prefill(loaded.model, cache, [steps[0]]), 2).values
    gap = float(top[0] - top[1])
    assert cache.exact_steps == 0 and gap > 1e-3
    # the margin applies in proportion to the layers that search (a dense layer makes no error)
    searching = sum(isinstance(layer, RetrievalLayer) for layer in cache.layers)
    share = searching / len(cache.layers)
    assert 0 < searching and cache.exact_margin == pytest.approx(1e-9 * share)
    for margin, redone in ((gap + 1e-3, 1), (gap - 1e-3, 0)):
        settings = RetrievalSettings(**small, exact_margin=margin / share)
        cache = open_cache(loaded, store, "retrieval", settings)
        prefill(loaded.model, cache, tokens)
        prefill(loaded.model, cache, [steps[0]])
        assert cache.exact_steps == redone, margin
    # sampling picks no argmax: a close call is not a wrong one, and nothing runs again
    cache = open_cache(loaded, store, "retrieval", RetrievalSettings(**small, exact_margin=1e9))
    prefill(loaded.model, cache, tokens, greedy=False)
    assert cache.exact_steps == 0


def test_window_overflow_moves_tokens_into_the_index(small_context, loaded):
    """A conversation longer than the window: evicted tokens stay reachable; with a full budget
    the result is still exactly full attention."""
    store = small_context
    n_indexed = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    settings = RetrievalSettings(top_k=4096, ef=4096, window=64, dense_when_cheaper=False, exact_margin=0)
    cache = open_cache(loaded, store, "retrieval", settings)
    full = open_cache(loaded, store, "full")
    conversation = loaded.tokenizer((" The keeper wrote about storms and goats." * 30), add_special_tokens=False).input_ids
    for start in range(0, len(conversation), 50):
        got = prefill(loaded.model, cache, conversation[start:start + 50])
        want = prefill(loaded.model, full, conversation[start:start + 50])
    assert cache.retrieval_stats.evicted > 64
    layer = next(l for l in cache.layers if hasattr(l, "n_indexed"))
    assert layer.n_indexed > n_indexed and layer.static - layer.lo <= 64 + 64
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert cache.length == full.length


def test_host_kv_keeps_a_bf16_store_in_bf16_and_rounds_what_is_evicted_into_it():
    """Evicted window tokens arrive as float32: a bf16 host KV stores them rounded as the store
    would (torch's bf16), and the kernels' widening gives those bf16 values back exactly."""
    from ra_cli.retrieval.host_kv import HostKV
    from ra_cli.store import kv_to_numpy, widened

    generator = torch.Generator().manual_seed(0)
    stored = kv_to_numpy(torch.randn(3, 5, 64, generator=generator), "bfloat16")
    host = HostKV(stored.copy(), stored.copy())
    evicted = torch.randn(3, 2, 64, generator=generator)
    host.append(evicted.numpy(), (2 * evicted).numpy())
    assert host.keys.dtype == host.values.dtype == np.uint16 and host.count == 7
    np.testing.assert_array_equal(host.keys[:, :5], stored)
    np.testing.assert_array_equal(widened(host.keys[:, 5:7]), evicted.bfloat16().float().numpy())
    np.testing.assert_array_equal(widened(host.values[:, 5:7]), (2 * evicted).bfloat16().float().numpy())


def test_search_cost_model_on_the_measured_shapes():
    """retrieval/cost.py's decision on the two shapes it was measured on, and what moves it."""
    # SmolLM2 (3 KV / 9 query heads, 2 threads), a search reading ~1,160 keys: at 32K and 16K retrieval
    # pays (measured at 16K: 14.4 ms/token every layer searched, 17.1 full); at 8K dense attention wins
    assert search_is_cheaper(reads=1160, total_keys=32768, attended=1198, kv_heads=3, heads=9, threads=2)
    assert search_is_cheaper(reads=1160, total_keys=16384, attended=1198, kv_heads=3, heads=9, threads=2)
    assert not search_is_cheaper(reads=1140, total_keys=8192, attended=1198, kv_heads=3, heads=9, threads=2)
    # Qwen2.5 at 16K (2 KV / 14 query heads): a search reading a third of the keys loses to dense attention
    assert not search_is_cheaper(reads=4938, total_keys=16384, attended=1469, kv_heads=2, heads=14, threads=2)
    # 3 KV heads on 2 threads: 2 rounds of searches at 151 + 5 x 3 ns a key, the attention done beside
    # them, plus 20 us: 20,000 + 2 x 166 x reads against 16,384 x 3 x (10.7 + 2.6 x 3) / 2 ns: the search
    # wins below ~1,309 reads
    assert search_is_cheaper(reads=1300, total_keys=16384, attended=740, kv_heads=3, heads=9, threads=2)
    assert not search_is_cheaper(reads=1320, total_keys=16384, attended=740, kv_heads=3, heads=9, threads=2)
    # attention that outweighs the searches' rounds: all the work over the threads decides
    assert not search_is_cheaper(reads=1000, total_keys=16384, attended=8000, kv_heads=3, heads=9, threads=2)
    # one thread: every KV head in turn, and dense attention on one thread too
    assert not search_is_cheaper(reads=1164, total_keys=4096, attended=740, kv_heads=3, heads=9, threads=1)
    # reads grow with the beam: the calibration's count scales with a requested ef
    entry = {"ef": 128, "validation_evaluations": 1000.0}
    assert expected_reads(entry, None) == 1000.0 and expected_reads(entry, 256) == 2000.0
    assert expected_reads({"ef": 128}, None) is None  # an hnsw store measured none: it stays searched


def test_a_cpu_attends_densely_where_reading_every_key_is_faster(small_context, loaded, reuse_loaded_model):
    """At ~1K tokens a search reads a large share of the keys: the default makes those layers dense
    on a CPU, says so, and --search-every-layer searches them anyway."""
    store = small_context
    cheaper = cheaper_dense_layers(store, RetrievalSettings())
    assert cheaper
    cache = open_cache(loaded, store, "retrieval")
    assert cache.retrieval_stats.cheaper_dense_layers == cheaper
    assert all(isinstance(cache.layers[i], DeviceKVLayer) for i in cheaper)
    searching = sum(isinstance(layer, RetrievalLayer) for layer in cache.layers)
    # a close call is run again in proportion to the layers that search: never, when none does
    assert cache.exact_margin == pytest.approx(RetrievalSettings().exact_margin * searching / len(cache.layers))
    searched = open_cache(loaded, store, "retrieval", RetrievalSettings(dense_when_cheaper=False))
    assert searched.retrieval_stats.cheaper_dense_layers == []
    assert all(isinstance(searched.layers[i], RetrievalLayer) for i in cheaper)
    for flags, said in (([], True), (["--search-every-layer"], False)):
        result = runner.invoke(app, ["chat", str(store.path), "--ask", QUESTION, "--max-new-tokens", "1", *flags])
        assert result.exit_code == 0, result.output
        note = f"{len(cheaper)} faster to read whole than to search at {store.n_tokens:,} tokens on this CPU"
        assert (note in result.stderr) is said, result.stderr


def test_chat_uses_retrieval_by_default_and_reports_stats(small_context, reuse_loaded_model):
    result = runner.invoke(app, ["chat", str(small_context.path), "--max-new-tokens", "8", "--search-every-layer"],
                           input=f"{QUESTION}\n/stats\n/clear\n/stats\n/exit\n")
    assert result.exit_code == 0, result.output
    import re

    def values(name):  # /stats prints a table: "name   value" per row, once per /stats
        return [float(v.replace(",", "")) for v in re.findall(rf"^{name} +([\d,.]+)$", result.stderr, re.M)]

    assert values("keys scanned per search")[0] > 0 and values("retrieval ms per token")[0] > 0
    assert values("device memory mb")[0] > 0 and values("turns") == [1, 0] and values("searches")[1] == 0


def test_full_and_retrieval_agree_on_a_short_greedy_answer(small_context, reuse_loaded_model):
    answers = {}
    for attention in ("full", "retrieval"):
        result = runner.invoke(app, ["chat", str(small_context.path), "--attention", attention, "--ask", QUESTION,
                                     "--json", "--max-new-tokens", "12", "--search-every-layer"])
        assert result.exit_code == 0, result.output
        answers[attention] = json.loads(result.stdout)["answer"]
    assert answers["retrieval"] == answers["full"]


def test_cli_rejects_a_mismatched_index_mode(small_context, reuse_loaded_model):
    result = runner.invoke(app, ["chat", str(small_context.path), "--attention", "hnsw", "--ask", "x"])
    assert result.exit_code == 1 and "indexed with graph" in result.stderr
    result = runner.invoke(app, ["chat", str(small_context.path), "--sinks", "7", "--ask", "x"])
    assert result.exit_code == 1 and "ingested with --sinks 32" in result.stderr


def test_attention_over_retrieved_keys_is_exact_with_its_log_sum_exp():
    """The accelerator path's CPU half: softmax over each query's own retrieved keys (gaps of -1
    anywhere, a query with none), and the log-sum-exp that merges it with the static half."""
    from ra_cli.retrieval.kernels import attend_retrieved

    rng = np.random.default_rng(3)
    keys = (rng.standard_normal((2, 300, 64)) * 2).astype(np.float32)
    values = rng.standard_normal((2, 300, 64)).astype(np.float32)
    queries = rng.standard_normal((6, 2, 64)).astype(np.float32)
    ids = rng.integers(0, 300, (6, 2, 40)).astype(np.int32)
    ids[:, :, ::7] = -1
    ids[4, 1] = -1
    out, lse = np.empty((6, 2, 64), np.float32), np.empty((6, 2), np.float32)
    attend_retrieved(queries, keys, values, np.repeat(np.arange(2), 3), ids, np.float32(0.125), out, lse)
    for h in range(6):
        for i in range(2):
            chosen = ids[h, i][ids[h, i] >= 0]
            if chosen.size == 0:
                assert lse[h, i] == -np.inf and not out[h, i].any()
                continue
            scores = keys[h // 3, chosen].astype(np.float64) @ queries[h, i] * 0.125
            weights = np.exp(scores - scores.max())
            np.testing.assert_allclose(out[h, i], weights @ values[h // 3, chosen] / weights.sum(), atol=1e-6)
            np.testing.assert_allclose(lse[h, i], scores.max() + np.log(weights.sum()), rtol=1e-6)


def test_a_question_is_read_exactly_while_small_enough(small_context, loaded, monkeypatch):
    """With an exact margin, a forward of several tokens attends to every key (no search): full
    attention's logits; past the work bound (question x context tokens) it is searched."""
    from ra_cli.engine import generate

    settings = RetrievalSettings(top_k=8, ef=16, dense_when_cheaper=False)  # the default margin
    tokens = question_tokens(loaded, small_context)
    cache = open_cache(loaded, small_context, "retrieval", settings)
    got = prefill(loaded.model, cache, tokens)
    assert cache.retrieval_stats.searches == 0 and cache.exact_steps == 0
    torch.testing.assert_close(got, prefill(loaded.model, open_cache(loaded, small_context, "full"), tokens),
                               atol=2e-3, rtol=1e-4)
    monkeypatch.setattr(generate, "EXACT_QUESTION_WORK", len(tokens) * small_context.n_tokens)  # just short
    cache = open_cache(loaded, small_context, "retrieval", settings)
    prefill(loaded.model, cache, tokens)
    assert cache.retrieval_stats.searches > 0


def test_chat_runs_uncertain_steps_again_only_when_greedy(small_context, loaded):
    from ra_cli.chat import start_chat
    from ra_cli.engine.generate import Sampling

    always = RetrievalSettings(top_k=8, ef=16, dense_when_cheaper=False, exact_margin=1e9)
    chat = start_chat(loaded, small_context, "retrieval", always)
    answer = chat.ask(QUESTION, 6, Sampling(temperature=0.8, seed=3))
    assert answer.tokens > 1 and chat.cache.exact_steps == 0
    chat = start_chat(loaded, small_context, "retrieval", always)
    answer = chat.ask(QUESTION, 6, Sampling())
    assert chat.cache.exact_steps == answer.decode_steps  # every token fed back (the question was read exactly)
    reference = start_chat(loaded, small_context, "full").ask(QUESTION, 6, Sampling())
    assert answer.text == reference.text


def test_chat_says_how_many_close_calls_ran_again(small_context, reuse_loaded_model):
    args = ["chat", str(small_context.path), "--ask", QUESTION, "-n", "5", "--search-every-layer", "--top-k", "8"]
    always = runner.invoke(app, [*args, "--exact-margin", "1000"])
    assert always.exit_code == 0, always.output
    assert "(4 close calls run again exactly)" in always.stderr  # 5 tokens: 4 fed back, each run again
    answer = json.loads(runner.invoke(app, [*args, "--exact-margin", "1000", "--json"]).stdout)
    assert answer["steps_run_again_exactly"] == 4 and answer["tokens"] == 5
    alone = json.loads(runner.invoke(app, [*args, "--exact-margin", "0", "--json"]).stdout)
    assert alone["steps_run_again_exactly"] == 0


def test_workers_take_each_task_of_a_shared_queue_exactly_once():
    """The atomic intrinsics search_and_attend's queue stands on: two workers drawing turns from
    one counter take every task once, and a flag stored after a write shows the write (x86 keeps
    stores in order anyway: there that check guards against the compiler moving them)."""
    from numba import njit, prange

    from ra_cli.intrinsics import atomic_add, atomic_load, atomic_store

    @njit(parallel=True)
    def drain(tasks, taken, done, seen, order_ok):
        for worker in prange(2):
            while True:
                turn = atomic_add(taken, 0, 1)
                if turn >= tasks:
                    break
                seen[turn] += 1
                if turn > 0 and atomic_load(done, turn - 1) == 1 and seen[turn - 1] != 1:
                    order_ok[0] = 0  # a done flag without the write before it
                atomic_store(done, turn, np.int32(1))

    tasks = 20000
    taken, order_ok = np.zeros(1, np.int64), np.ones(1, np.int64)
    done, seen = np.zeros(tasks, np.int64), np.zeros(tasks, np.int64)
    drain(tasks, taken, done, seen, order_ok)
    assert (seen == 1).all() and done.all() and taken[0] == tasks + 2 and order_ok[0] == 1


def test_search_and_attend_queues_searches_then_static_halves_then_heads_by_readiness():
    """Searches costliest first, static halves costliest first, then each head's merge by when
    its KV head's two tasks end if 2 workers take the queue in turn with last step's costs."""
    from ra_cli.retrieval.kernels import task_order

    costs = np.array([400.0, 500.0, 300.0, 70.0, 80.0, 60.0] + [1.0] * 9)
    order, taken, done = task_order(costs, 3, 2)
    # KV head 1: searched by itself (500), static at 580; KV head 0: 400, static at 650; KV head 2: 700, 710
    assert order.tolist() == [1, 0, 2, 4, 3, 5, 9, 10, 11, 6, 7, 8, 12, 13, 14]
    assert taken.tolist() == [0] and done.tolist() == [0] * 15


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_dtype", ["float32", "bf16"])
@pytest.mark.parametrize("k,ef", [(700, 700), (200, 16), (20, 24)])
def test_search_and_attend_is_the_search_then_the_attention(kv_dtype, k, ef, threads, monkeypatch):
    """Decode's one call per layer gives what the search and the attention kernels give one after
    the other: the same keys, scores and evaluations, the same output, and the next step's entry
    points (each head's best CARRY keys, then their successors); with every key answered, the
    output is full attention over the static and indexed keys (float64 reference), with one
    worker taking the whole queue or two sharing it."""
    import numba

    from test_index import synthetic_layer

    from ra_cli.index.graph import GraphLayerIndex
    from ra_cli.intrinsics import bf16_bits
    from ra_cli.retrieval.kernels import CARRY, attend_static_and_retrieved, search_and_attend
    from ra_cli.retrieval.host_path import NO_MASS
    from ra_cli.store import widened

    keys, queries, layer, params = synthetic_layer(seed=4)
    rng = np.random.default_rng(4)
    heads, (kv_heads, n, dim) = queries.shape[0], keys.shape
    values = rng.standard_normal((kv_heads, n, dim)).astype(np.float32)
    if kv_dtype == "bf16":
        keys, values = bf16_bits(torch.from_numpy(keys).bfloat16()), bf16_bits(torch.from_numpy(values).bfloat16())
    static_keys = rng.standard_normal((kv_heads, 16, dim)).astype(np.float32)
    static_values = rng.standard_normal((kv_heads, 16, dim)).astype(np.float32)
    visible, lo, scaling = np.array([9, 10]), 3, np.float32(0.25)
    query = np.ascontiguousarray(queries[:, :2])
    extra = np.full((heads, 2 * CARRY + 4), -1, np.int32)
    extra[:, 2 * CARRY:] = [5, 6, 400, 401]  # token seeds

    index = GraphLayerIndex(layer, keys, params)
    expected = index.search(query, k, ef, extra, ordered=CARRY)
    expected_out = np.empty((heads, 2, dim), np.float32)
    attend_static_and_retrieved(query, static_keys, static_values, visible, values, expected.ids, expected.scores,
                                scaling, expected_out, NO_MASS, np.float32(0), 0, lo, lo + n)

    fused = GraphLayerIndex(layer, keys, params)
    monkeypatch.setattr(numba, "get_num_threads", lambda: threads)
    result = type(expected)(np.empty_like(expected.ids), np.empty_like(expected.scores),
                            np.empty_like(expected.evaluations))
    out = np.empty((heads, 2, dim), np.float32)
    costs = np.ones(2 * kv_heads + heads)
    evaluations, searching = search_and_attend(
        *fused.lockstep_arguments(query, k, fused.beam(ef, k), extra, result, CARRY, costs),
        static_keys, static_values, visible, values, scaling, out, NO_MASS, np.float32(0), 0, lo, lo + n, extra)

    np.testing.assert_array_equal(result.ids[..., :CARRY], expected.ids[..., :CARRY])
    np.testing.assert_array_equal(np.sort(result.ids, -1), np.sort(expected.ids, -1))
    np.testing.assert_array_equal(result.evaluations, expected.evaluations)
    assert evaluations == expected.evaluations.sum() and 0 < searching < 1 and (costs > 1).all()
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-6)
    best = expected.ids[:, -1, :CARRY]
    np.testing.assert_array_equal(extra[:, :CARRY], best)
    np.testing.assert_array_equal(extra[:, CARRY:2 * CARRY], np.where((best >= 0) & (best + 1 < n), best + 1, -1))
    np.testing.assert_array_equal(extra[:, 2 * CARRY:], np.broadcast_to([5, 6, 400, 401], (heads, 4)))
    all_keys, all_values = widened(keys).astype(np.float64), widened(values).astype(np.float64)
    for h in range(heads):  # float64 softmax over the static keys and the answered ones
        g = h // (heads // kv_heads)
        for i in range(2):
            answered = result.ids[h, i][result.ids[h, i] >= 0]
            if k >= n:  # every key answered: full attention
                assert sorted(answered) == list(range(n))
            scores = np.concatenate([static_keys[g, :visible[i]] @ query[h, i], all_keys[g, answered] @ query[h, i]])
            weights = np.exp((scores - scores.max()) * scaling)
            rows = np.concatenate([static_values[g, :visible[i]], all_values[g, answered]])
            np.testing.assert_allclose(out[h, i], weights @ rows / weights.sum(), rtol=1e-4, atol=1e-5)


def _reference_budget(queries, keys, lo, hi, scaling, budgets, coverage, probes=8):
    """float64: the smallest budget whose static keys (positions < lo or >= hi) plus exact top-k
    indexed keys hold `coverage` of the mean softmax mass of the last `probes` queries, causally
    (query i of q sits at position n - q + i of keys [KVH, n, D]); the largest if none does."""
    heads, count, _ = queries.shape
    kv_heads, n, _ = keys.shape
    q = queries[:, -probes:].astype(np.float64)
    k = np.repeat(keys.astype(np.float64), heads // kv_heads, axis=0)
    scores = np.einsum("hqd,hnd->hqn", q, k) * scaling
    positions = np.arange(n)
    for i in range(q.shape[1]):
        scores[:, i, positions > n - probes + i] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    static = weights[..., :lo].sum(-1) + weights[..., hi:].sum(-1)
    ranked = np.cumsum(-np.sort(-weights[..., lo:hi], axis=-1), axis=-1)
    masses = {b: float((static + ranked[..., min(b, hi - lo) - 1]).mean()) for b in budgets}
    return next((b for b in budgets if masses[b] >= coverage), budgets[-1]), masses


@pytest.mark.parametrize("bf16", [False, True])
def test_question_budget_is_the_smallest_whose_exact_mass_reaches_the_coverage(bf16):
    """question_budget against a float64 softmax: the question's last 8 queries, the static set
    causally masked (the window holds the question itself), indexed keys in float32 or bf16 bits."""
    from ra_cli.retrieval.budget import question_budget
    from ra_cli.retrieval.host_kv import as_host_dtype
    from ra_cli.store import widened

    rng = np.random.default_rng(7)
    heads, kv_heads, dim, lo, n_indexed, window = 6, 2, 16, 4, 900, 20
    n = lo + n_indexed + window
    keys = rng.standard_normal((kv_heads, n, dim)).astype(np.float32)
    topic = rng.standard_normal(dim).astype(np.float32)
    keys[:, lo + 5: lo + 60] += topic  # a stretch the queries lean towards: mass 0.81 at 50 keys, 0.998 at 800
    query = (rng.standard_normal((heads, 12, dim)) + topic).astype(np.float32)
    host = as_host_dtype(keys[:, lo:lo + n_indexed], np.uint16 if bf16 else np.float32)
    keys[:, lo:lo + n_indexed] = widened(host)  # the reference sees the keys as stored
    static_keys = torch.from_numpy(np.concatenate([keys[:, :lo], keys[:, lo + n_indexed:]], axis=1))[None]
    static_positions = torch.cat([torch.arange(lo), torch.arange(lo + n_indexed, n)])
    budgets = (50, 100, 200, 400, 800)
    _, masses = _reference_budget(query, keys, lo, lo + n_indexed, 0.25, budgets, 1.0)
    assert masses[50] < masses[800] - 0.05  # the budgets really differ here
    levels = sorted(masses.values())
    for coverage in [levels[0] / 2] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [1.0]:
        want, _ = _reference_budget(query, keys, lo, lo + n_indexed, 0.25, budgets, coverage)
        got = question_budget(torch.from_numpy(query)[None], static_keys, static_positions, n - 12, host, n_indexed,
                              0.25, budgets, coverage)
        assert got == want, coverage


def test_a_question_sets_each_layers_answer_budget_from_its_own_attention(small_context, loaded):
    """A question read exactly measures, per retrieval layer, the budget its last queries need
    (against full attention's own queries and keys, in float64); the answer searches with it, never
    with less than ingest chose; a fixed --top-k, or no exact read, leaves the budgets alone."""
    store = small_context
    section = store.manifest["index"]
    lo, hi = section["lo"], section["hi"]
    tokens = question_tokens(loaded, store)
    captured = {}
    full = open_cache(loaded, store, "full")
    for layer in full.layers:
        layer.observer = lambda i, query, keys, q_offset, kv_offset, scaling: captured.setdefault(
            i, (query[0].float().numpy(), keys[0].float().numpy(), scaling))
    prefill(loaded.model, full, tokens)
    settings = RetrievalSettings(dense_when_cheaper=False)
    cache = open_cache(loaded, store, "retrieval", settings)
    layers = [layer for layer in cache.layers if isinstance(layer, RetrievalLayer)]
    assert layers and all(layer.budgets == tuple(section["params"]["budgets"]) for layer in layers)
    floors = {layer.layer_idx: layer.top_k for layer in layers}
    layers[0].ingest_top_k = layers[0].top_k = 1  # one layer whose ingest budget is below any question's
    prefill(loaded.model, cache, tokens)
    raised = 0
    for layer in layers:
        query, keys, scaling = captured[layer.layer_idx]
        want, _ = _reference_budget(query, keys, lo, hi, scaling, layer.budgets, settings.coverage)
        floor = 1 if layer is layers[0] else floors[layer.layer_idx]
        assert layer.top_k == max(floor, want), layer.layer_idx
        assert cache.retrieval_stats.budgets[layer.layer_idx] == layer.top_k
        raised += layer.top_k > floor
    assert layers[0].top_k >= 100 and raised >= 1
    prefill(loaded.model, cache, [100])  # the answer's step searches with the question's budget
    for settings in (RetrievalSettings(top_k=37, dense_when_cheaper=False),
                     RetrievalSettings(dense_when_cheaper=False, exact_margin=0)):
        cache = open_cache(loaded, store, "retrieval", settings)
        before = {layer.layer_idx: layer.top_k for layer in cache.layers if isinstance(layer, RetrievalLayer)}
        prefill(loaded.model, cache, tokens)
        assert before == {layer.layer_idx: layer.top_k for layer in cache.layers if isinstance(layer, RetrievalLayer)}


def test_a_measured_choice_times_both_ways_and_keeps_the_faster():
    """After its warm-up steps a layer alternates its search with reading every key, and after
    PAIRS of each keeps the faster by median; a question that changes the budget measures again,
    unless reading every key won (that does not depend on the budget)."""
    from ra_cli.retrieval.cost import PAIRS, WARM_UP_STEPS, MeasuredChoice

    def run(choice, search_seconds, every_key_seconds):
        ways = []
        while choice.reads_every_key is None:
            every_key = choice.every_key_next()
            ways.append("every key" if every_key else "search")
            choice.record(every_key, every_key_seconds if every_key else search_seconds)
        return ways

    choice = MeasuredChoice()
    assert run(choice, 0.002, 0.001) == ["search"] * WARM_UP_STEPS + ["search", "every key"] * PAIRS
    assert choice.reads_every_key and choice.every_key_next()
    choice.restart()
    assert choice.reads_every_key and choice.every_key_next()  # kept: the budget does not change it
    choice = MeasuredChoice()
    assert run(choice, 0.001, 0.002)[-1] == "every key" and choice.reads_every_key is False
    assert not choice.every_key_next()
    choice.restart()
    assert choice.reads_every_key is None and len(run(choice, 0.003, 0.002)) == WARM_UP_STEPS + 2 * PAIRS
    assert choice.reads_every_key


def reading_every_key(cache):
    """A retrieval cache whose searched layers were all timed slower than reading every key."""
    from ra_cli.retrieval.cost import MeasuredChoice

    for layer in cache.layers:
        if isinstance(layer, RetrievalLayer):
            layer.choice = MeasuredChoice(reads_every_key=True)
    return cache


@pytest.mark.parametrize("fast", [False, True])
def test_a_layer_reading_every_key_is_full_attention_and_cites_every_key(small_context, small_context_fast, loaded,
                                                                         loaded_fast, fast):
    """A searched layer whose search was timed slower reads every key at decode: its attention and
    the attention weights it collects for citations are full attention's (float32 store, and the
    CPU default's bf16 KV) — with chat's floor, exactly the keys at or above it — and end to end
    the logits match the full cache's."""
    from ra_cli.engine.mass import AttentionMass

    loaded, store = (loaded_fast, small_context_fast) if fast else (loaded, small_context)
    searched = RetrievalSettings(top_k=8, ef=16, window=64, dense_when_cheaper=False, exact_margin=0)
    full, cache = open_cache(loaded, store, "full"), reading_every_key(open_cache(loaded, store, "retrieval", searched))
    generator = torch.Generator().manual_seed(5)
    n = store.n_tokens + 1
    for index in (0, 11, 29):
        key, value = (torch.randn(1, 3, 1, 64, generator=generator).bfloat16() for _ in range(2))
        query = torch.randn(1, 9, 1, 64, generator=generator) * 3
        for layer in (full.layers[index], cache.layers[index]):
            layer.update(key, value)
        dense, layer = full.layers[index], cache.layers[index]
        keys, values = (t[0, :, : dense.length].double().repeat_interleave(3, 0) for t in (dense.keys, dense.values))
        weights = torch.softmax(torch.einsum("hd,hnd->hn", query[0, :, 0].double(), keys) * 0.125, -1)  # [H, n]
        reference = torch.einsum("hn,hnd->hd", weights, values)
        layer.mass = AttentionMass(9, n, sinks=1)
        searches = cache.retrieval_stats.searches
        torch.testing.assert_close(layer.attend(query, 0.125)[0, :, 0].double(), reference, atol=1e-5, rtol=1e-5)
        assert cache.retrieval_stats.searches == searches  # it read every key, searched nothing
        expected = np.zeros((9, n))
        for g in range(3):  # each KV head's weights gather in the row of its first query head
            expected[3 * g] = weights[3 * g: 3 * g + 3].sum(0).numpy()
        expected[:, :1] = 0.0
        np.testing.assert_allclose(layer.mass.rows, expected, atol=1e-6, rtol=1e-4)
        # chat's way, with a floor: only the keys at or above it, each KV head's from both halves
        floor = float(weights.max(-1).values.min()) / 2  # every query head has a key above it
        layer.mass = AttentionMass(9, n, sinks=1, floor=floor)
        layer.attend(query, 0.125)
        heavy = torch.where(weights >= floor, weights, 0.0)
        expected = np.zeros((9, n))
        for g in range(3):
            expected[3 * g] = heavy[3 * g: 3 * g + 3].sum(0).numpy()
        expected[:, :1] = 0.0
        assert np.count_nonzero(expected) >= 3
        np.testing.assert_allclose(layer.mass.rows, expected, atol=1e-6, rtol=1e-4)
        layer.mass = None
    full, cache = open_cache(loaded, store, "full"), reading_every_key(open_cache(loaded, store, "retrieval", searched))
    for token in (100, 200, 300):  # decode steps only: a question of several tokens would be searched
        torch.testing.assert_close(prefill(loaded.model, cache, [token]), prefill(loaded.model, full, [token]),
                                   atol=2e-3, rtol=1e-4)


def test_a_cpu_chat_times_its_searched_layers_and_reports_the_ones_reading_every_key(small_context, loaded,
                                                                                       monkeypatch):
    """The default on a CPU: every searched layer decides within its first decode steps, and the
    stats name those that now read every key."""
    from ra_cli.retrieval import modes
    from ra_cli.retrieval.cost import PAIRS, WARM_UP_STEPS

    monkeypatch.setattr(modes, "search_is_cheaper", lambda *args: True)  # at 1K tokens dense is predicted cheaper
    cache = open_cache(loaded, small_context, "retrieval", RetrievalSettings(top_k=8, ef=16, exact_margin=0))
    searched = [layer for layer in cache.layers if isinstance(layer, RetrievalLayer)]
    assert searched and all(layer.choice is not None for layer in searched)
    prefill(loaded.model, cache, question_tokens(loaded, small_context))
    for token in range(100, 100 + WARM_UP_STEPS + 2 * PAIRS):
        prefill(loaded.model, cache, [token])
    assert all(layer.choice.reads_every_key is not None for layer in searched)
    stats = cache.retrieval_stats.as_dict()
    assert stats["measured_dense_layers"] == [layer.layer_idx for layer in searched if layer.choice.reads_every_key]


def test_the_accelerators_split_path_is_full_attention_and_cites_as_it(small_context, loaded):
    """What a GPU runs (the static set's attention beside the retrieved keys', merged by
    log-sum-exp; the citations' weights taken after the merge), forced on this CPU: with every key
    retrieved it is full attention, and the weights it collects are full attention's, position by
    position."""
    from ra_cli.engine.mass import AttentionMass
    from ra_cli.retrieval.layer import RetrievalLayer

    store = small_context
    n_indexed = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    everything = RetrievalSettings(top_k=n_indexed, ef=n_indexed, window=10_000, dense_when_cheaper=False, exact_margin=0)
    full, cache = open_cache(loaded, store, "full"), open_cache(loaded, store, "retrieval", everything)
    split = [layer for layer in cache.layers if isinstance(layer, RetrievalLayer)]
    assert split
    for layer in split:
        layer.split = True
    tokens = question_tokens(loaded, store)
    torch.testing.assert_close(prefill(loaded.model, cache, tokens), prefill(loaded.model, full, tokens), atol=2e-3, rtol=1e-4)
    for token in (100, 200, 300):
        masses = [AttentionMass(9, store.n_tokens, sinks=4) for _ in range(2)]
        with full.collecting(masses[0]):
            want = prefill(loaded.model, full, [token])
        with cache.collecting(masses[1]):
            got = prefill(loaded.model, cache, [token])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
        np.testing.assert_allclose(masses[1].by_position(), masses[0].by_position(), atol=2e-4, rtol=1e-3)
        assert masses[0].by_position().sum() > 1.0
    assert cache.retrieval_stats.searches > 0 and all(layer.staging is None for layer in split)  # no device: no staging
