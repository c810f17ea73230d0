"""`ra bench --recall` and `ra eval` produce the documented JSON with sane values (small sizes)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

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
    for field in ("token_agreement", "kl_mean", "mass_coverage", "recall_at_k", "scanned_fraction", "context_tokens"):
        assert field in report
    assert 0.5 <= report["token_agreement"] <= 1 and report["kl_mean"] >= 0
    assert 0.5 < report["mass_coverage"] <= 1.0001 and 0 < report["scanned_fraction"] <= 1.2
    # with every key retrieved the approximation is exact
    exact = json.loads(runner.invoke(app, ["eval", str(context), "--tokens", "6", "--json", "--top-k", "4096",
                                           "--ef", "4096", "--dense-below", "0"]).stdout)
    assert exact["token_agreement"] == 1.0 and exact["kl_mean"] < 1e-4 and exact["mass_coverage"] > 0.9999
