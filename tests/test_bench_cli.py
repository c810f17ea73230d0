"""`ra bench --recall` and `ra eval` produce the documented JSON with sane values (small sizes)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ra_cli.choices import EXACT_MARGIN
from ra_cli.cli import app, parse_tokens

runner = CliRunner()


def test_token_counts_parse():
    assert parse_tokens("16k") == 16384 and parse_tokens("128K") == 131072 and parse_tokens("5000") == 5000


def test_recall_bench_json(reuse_loaded_model):
    result = runner.invoke(app, ["bench", "--recall", "--context", "1536", "--queries", "16", "--layers", "3,20",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["context_tokens"] == 1536 and report["indexed_keys"] == 1536 - 640 and report["layers"] == [3, 20]
    for kind in ("graph", "hnsw", "hnsw_centered", "flat"):
        row = report["indexes"][kind]
        for field in ("recall_at_100", "worst_head_recall_at_100", "evaluations_per_query", "scanned_fraction",
                      "build_seconds", "index_bytes"):
            assert field in row
        assert 0 <= row["worst_head_recall_at_100"] <= row["recall_at_100"] <= 1
    assert report["indexes"]["flat"]["recall_at_100"] == 1.0
    assert report["indexes"]["flat"]["evaluations_per_query"] == 1536 - 640
    assert report["indexes"]["graph"]["recall_at_100"] > 0.85
    assert "hnsw_to_graph_scan_ratio" in report and "hnsw_centered_to_graph_scan_ratio" in report
    reach = report["reach"]
    assert reach["reachable_fraction_min"] == 1.0  # every indexed key, every head
    assert reach["selected_key_recall_with_token_seeds"] > 0.8
    for field in ("rare_key_recall", "rare_key_recall_with_token_seeds"):
        assert reach[field] is None or 0 <= reach[field] <= 1
    for layer in ("3", "20"):
        mass = report["attention_mass"][layer]
        assert 0 < mass["static_mean"] <= mass["static_top100_mean"] <= 1


def test_eval_json(tmp_path, lighthouse_txt, reuse_loaded_model):
    document = tmp_path / "doc.txt"
    document.write_text(lighthouse_txt.read_text() * 12)
    context = tmp_path / "ctx.idx"
    assert runner.invoke(app, ["ingest", str(document), "--save", str(context), "--sinks", "32", "--window", "64"]).exit_code == 0
    result = runner.invoke(app, ["eval", str(context), "--tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for field in ("token_agreement", "kl_mean", "mass_coverage", "recall_at_k", "scanned_fraction", "context_tokens",
                  "exact_step_fraction"):
        assert field in report
    assert 0.5 <= report["token_agreement"] <= 1 and report["kl_mean"] >= 0
    assert report["exact_margin"] == EXACT_MARGIN and 0 <= report["exact_step_fraction"] <= 1
    assert 0.5 < report["mass_coverage"] <= 1.0001 and 0 < report["scanned_fraction"] <= 1.2
    # with every key retrieved the approximation is exact
    exact = json.loads(runner.invoke(app, ["eval", str(context), "--tokens", "6", "--json", "--top-k", "4096",
                                           "--ef", "4096", "--dense-below", "0"]).stdout)
    assert exact["token_agreement"] == 1.0 and exact["kl_mean"] < 1e-4 and exact["mass_coverage"] > 0.9999
    # every step run again exactly: full attention's tokens, whatever the search found
    redone = json.loads(runner.invoke(app, ["eval", str(context), "--tokens", "6", "--json", "--top-k", "4",
                                            "--exact-margin", "1000"]).stdout)
    assert redone["exact_step_fraction"] == 1.0 and redone["token_agreement"] == 1.0 and redone["kl_mean"] < 1e-4
    assert redone["recall_at_k"] is not None  # the searches still ran (and were graded) first


def test_decode_step_bench_times_a_correct_retrieval():
    import numpy as np
    import torch

    from ra_cli.bench.decode import DecodeStepConfig, exact_step, run_decode_step_bench

    report = run_decode_step_bench(DecodeStepConfig(keys=4096, queries=8, cold=False), status=lambda *_: None)
    assert report["indexed_keys"] == 4096 and report["heads"] == 9 and report["kv_heads"] == 3
    assert report["recall_at_k"] >= 0.9 and 0 < report["evaluations_per_query"] < 4096
    assert min(report["ms_exact"], report["ms_retrieval"], report["ms_flat_topk"]) > 0
    # the exact side is real attention: compare with a per-head softmax
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator) for shape in ((9, 1, 64), (3, 300, 64), (3, 300, 64)))
    expected = torch.stack([torch.softmax(q[h] @ k[h // 3].T * 0.125, -1) @ v[h // 3] for h in range(9)])
    np.testing.assert_allclose(exact_step(q, k, v, 0.125), expected, rtol=1e-5, atol=1e-6)


def test_decode_step_bench_retrieval_is_attention_over_the_static_set_and_the_keys_it_found():
    """The timed retrieval step (search and attention in one call) against a float64 softmax over
    the sinks, the window and the keys its search returned."""
    import numpy as np

    from ra_cli.bench.decode import DecodeStepConfig, RetrievalStep, build_index, synthetic_layer
    from ra_cli.index import IndexParams

    config, params = DecodeStepConfig(keys=3000), IndexParams()
    keys, values, queries_for, heads, _ = synthetic_layer(config, 3000 + 40)
    static_keys, static_values = (np.ascontiguousarray(np.concatenate([a[:, :8], a[:, 3008:]], axis=1)) for a in (keys, values))
    indexed_keys, indexed_values = (np.ascontiguousarray(a[:, 8:3008]) for a in (keys, values))
    step = RetrievalStep(build_index(indexed_keys, queries_for, heads, params), static_keys, static_values, indexed_values,
                         heads, 50)
    queries = queries_for(np.array([3039, 3039, 1500]))  # [H, 3, D]
    for i in range(queries.shape[1]):
        q = np.ascontiguousarray(queries[:, i:i + 1])
        out = step(q, 0.125)
        ids = step.result.ids[:, 0]
        assert ((ids >= 0).sum(-1) == 50).all() and step.result.evaluations.min() > 50
        for h in range(heads):
            g = h // (heads // 3)
            k = np.concatenate([static_keys[g], indexed_keys[g][ids[h]]]).astype(np.float64)
            v = np.concatenate([static_values[g], indexed_values[g][ids[h]]]).astype(np.float64)
            w = np.exp((k @ q[h, 0] - (k @ q[h, 0]).max()) * 0.125)
            np.testing.assert_allclose(out[h, 0], (w / w.sum()) @ v, rtol=2e-5, atol=2e-6)


def test_decode_step_bench_rejects_an_unknown_shape():
    result = runner.invoke(app, ["bench", "--decode-step", "--shape", "gpt5"])
    assert result.exit_code != 0 and "unknown --shape 'gpt5'; choose smollm2, llama3-8b" in result.output


def test_recall_bench_compares_ingest_times_from_the_same_run(reuse_loaded_model):
    args = ["bench", "--recall", "--context", "1536", "--queries", "8", "--layers", "3", "--baseline-ingest",
            "--prefill", "sparse", "--json"]
    for run in ("fresh", "cached"):  # the second run finds the indexed context in the cache and times it again
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["ingest"]["prefill"] == "sparse", run  # the bench's context is ingested as asked
        assert report["ingest_baseline_seconds"] > 0 and report["ingest_with_graph_seconds"] > 0, run
        assert abs(report["ingest_speed_ratio"] - report["ingest_baseline_seconds"] / report["ingest_with_graph_seconds"]) < 0.05
        alone = report["indexes"]["graph_heads_alone"]  # one search per query head: exact once ef covers every key
        assert alone["sweep"][-1]["ef"] >= report["indexed_keys"] and alone["sweep"][-1]["recall"] == 1.0
        assert 0 < alone["evaluations_per_query"] <= report["indexed_keys"] + 64
    assert "timing the graph ingest again" in result.stderr


def test_context_bench_reports_every_field_at_a_tiny_context(tmp_path):
    """Whole-model decode per mode, each run in its own worker process (no llama.cpp in CI: the
    run says how to get it), with a plot."""
    result = runner.invoke(app, ["bench", "--context", "1k", "--modes", "retrieval,search-all,full", "--steps", "3", "--json",
                                 "--baseline", "llama.cpp", "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["synthetic"] is False and report["machine"]["cpus"] >= 1
    runs = {run["mode"]: run for run in report["runs"]}
    from ra_cli.bench.context import llama_cpp_available

    modes = {"retrieval", "search-all", "full"}
    assert set(runs) == (modes | {"llama.cpp"} if llama_cpp_available() else modes)
    if not llama_cpp_available():
        assert "pip install 'ra-cli[bench]'" in result.stderr
    for mode in modes:
        run = runs[mode]
        assert run["context_tokens"] == 1024 and run["steps"] == 3
        for key in ("decode_ms_per_token", "body_ms", "attention_ms", "ingest_tokens_per_s", "peak_rss_bytes", "disk_bytes"):
            assert run[key] > 0, (mode, key)
        assert run["peak_device_bytes"] is None  # no accelerator here
        # the parts split the mean step (the median is what the table leads with; on a busy
        # machine the two can differ by far more than any tolerance)
        parts = ("body_ms", "search_ms", "attention_ms", "other_ms", "exact_ms")
        assert abs(sum(run[part] for part in parts) - run["decode_mean_ms"]) < 0.01
        assert min(run["search_ms"], run["other_ms"], run["exact_ms"]) >= 0
        # the retrieval part is the searched layers' share: attention of the layers read whole apart
        assert abs(run["retrieval_ms"] + run["dense_attention_ms"]
                   - (run["search_ms"] + run["attention_ms"] + run["other_ms"])) < 0.01
        assert (run["dense_attention_ms"] > 0) == bool(run["dense_layers"]) or mode == "full"
        assert (run["exact_steps"] is None) == (mode == "full") and (run["exact_steps"] or 0) <= 3
    # at 1K tokens a CPU reads some layers whole rather than search them; search-all searches every one
    assert runs["retrieval"]["cheaper_dense_layers"] and set(runs["retrieval"]["cheaper_dense_layers"]) <= set(
        runs["retrieval"]["dense_layers"])
    assert runs["search-all"]["cheaper_dense_layers"] == [] and len(runs["search-all"]["dense_layers"]) < len(
        runs["retrieval"]["dense_layers"])
    # searched layers timed slower than reading every key: never one already dense; search-all times nothing
    assert set(runs["retrieval"]["measured_dense_layers"]).isdisjoint(runs["retrieval"]["dense_layers"])
    assert runs["search-all"]["measured_dense_layers"] == []
    assert runs["search-all"]["search_ms"] > 0 and runs["search-all"]["keys_scanned"] > 0
    assert runs["full"]["search_ms"] == 0 and runs["full"]["keys_scanned"] is None
    assert runs["full"]["retrieval_ms"] == 0 and runs["full"]["dense_attention_ms"] == runs["full"]["attention_ms"] > 0
    assert runs["search-all"]["retrieval_ms"] > 0
    assert runs["full"]["ingest_cached"]  # the second mode reused the first run's ingest
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_context_bench_rejects_bad_choices():
    for args, message in ((["--modes", "magic"], "choose from retrieval, full, flat"),
                          (["--baseline", "vllm"], "the one baseline is llama.cpp"),
                          (["--recall", "--context", "8k,16k"], "give --context a single size")):
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code == 1 and message in result.stderr, result.output


def test_gpu_check_script_runs_its_path_at_toy_size_on_a_cpu(tmp_path):
    """scripts/gpu-check.sh, as the GPU machine runs it, with `--synthetic tiny` on this CPU: one
    JSON, the CUDA tests marked not run, and a synthetic run that searches every layer at the fixed
    budget and beam (random keys would make a calibrated search read everything)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"
    env = dict(os.environ, RA_GPU_SHAPE="tiny", RA_GPU_CONTEXTS="1k", RA_GPU_STEPS="2", PYTHON=sys.executable,
               OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cuda_tests"] == "not run (no CUDA)"
    bench = report["cpu-1k"]
    assert bench["synthetic"] and bench["model"] == "synthetic:tiny"
    runs = {run["mode"]: run for run in bench["runs"]}
    assert set(runs) == {"retrieval", "full"}
    retrieval = runs["retrieval"]
    assert retrieval["dense_layers"] == [] and retrieval["keys_scanned"] > 0 and retrieval["search"] == {"top_k": 100, "ef": 128}
    assert retrieval["ingest_prefill_s"] > 0 and retrieval["ingest_index_s"] > 0 and retrieval["ingest_collect_s"] > 0
    assert (tmp_path / "out" / "bench-cpu-1k.json").is_file() and "bench cpu-1k: exit 0" in done.stderr


def test_a_mode_that_does_not_fit_is_a_row_of_the_report(monkeypatch, capsys):
    """A bench worker whose mode cannot fit on the accelerator reports that as its result (the
    bench goes on with the other modes) instead of failing the run."""
    import sys

    import ra_cli.bench.worker as worker
    from ra_cli.bench.context import print_table
    from ra_cli.engine.device_memory import DoesNotFit

    def does_not_fit(config, context, mode):
        raise DoesNotFit("full attention over 131,072 tokens needs 16.5 GB on the accelerator and 9.0 GB free under "
                         "--gpu-mem-gb 24; use --attention retrieval (the default), or --attention offload")

    monkeypatch.setattr(worker, "decode_run", does_not_fit)
    monkeypatch.setattr(sys, "argv", ["worker", json.dumps({"task": "decode", "config": {}, "context": 131072, "mode": "full"})])
    worker.main()
    captured = capsys.readouterr()
    row = json.loads(captured.out.strip().splitlines()[-1])
    assert row["fits"] is False and row["mode"] == "full" and row["decode_ms_per_token"] is None
    assert "--attention retrieval" in row["error"] and "needs 16.5 GB" in captured.err
    print_table({"model": "synthetic:llama-3-8b", "synthetic": True, "steps": 8, "runs": [row]})
    assert "full: does not fit" in capsys.readouterr().err
