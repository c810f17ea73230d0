"""End to end through the CLI: ingest -> saved context -> chat, checked against a single
in-memory transformers pass over [document + question]."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import LIGHTHOUSE
from ra_cli.cli import app
from ra_cli.engine.attention import install
from ra_cli.prompt import Prompter, PromptLayout
from ra_cli.store import ContextStore

runner = CliRunner()
QUESTION = "Who built the lighthouse, and when?"


def run(*args, **kwargs):
    result = runner.invoke(app, [str(a) for a in args], **kwargs)
    return result


def reference_answer(loaded, tokens: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by plain transformers (sdpa, DynamicCache) in one pass over all tokens."""
    model = loaded.model
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([tokens]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.eos_token_id)
    finally:
        install(model)
    generated = out[0, len(tokens):].tolist()
    return [t for t in generated if t != loaded.tokenizer.eos_token_id]


class PrefillCounter:
    """Counts tokens entering the model (embedding lookups) while installed."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.tokens += inputs[0].numel()

    def remove(self):
        self.handle.remove()


@pytest.fixture
def saved_context(tmp_path, lighthouse_txt, reuse_loaded_model):
    ctx = tmp_path / "ctx.idx"
    result = run("ingest", lighthouse_txt, "--save", ctx, "--chunk-size", 16)
    assert result.exit_code == 0, result.output
    assert (ctx / "manifest.json").is_file()
    return ctx


def test_ingest_writes_a_complete_store(saved_context, loaded):
    store = ContextStore.open(saved_context, loaded.fingerprint)
    manifest = store.manifest
    assert manifest["document"]["name"] == "lighthouse.txt"
    assert manifest["model"]["fingerprint"] == loaded.fingerprint.digest
    prompter = Prompter(loaded.tokenizer, PromptLayout.from_dict(manifest["prompt"]))
    tokens, pages = prompter.document_tokens(LIGHTHOUSE)
    assert store.tokens.tolist() == tokens and store.n_tokens == len(tokens)
    assert set(store.token_pages.tolist()) == {0, 1}
    assert len(store.layers) == 30 and store.keys(0).shape == (3, len(tokens), 64)
    # The stored KV is what a single pass computes (up to chunked-matmul rounding).
    model = loaded.model
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        try:
            out = model(torch.tensor([tokens]), use_cache=True)
        finally:
            install(model)
    reference = out.past_key_values.layers[12].keys[0].numpy()
    np.testing.assert_allclose(np.asarray(store.keys(12)), reference, atol=2e-4)


def test_saved_context_answer_equals_single_pass(saved_context, loaded):
    store = ContextStore.open(saved_context)
    prompter = Prompter(loaded.tokenizer, PromptLayout.from_dict(store.manifest["prompt"]))
    question_tokens = prompter.question_tokens(QUESTION, first_turn=True)
    expected = reference_answer(loaded, store.tokens.tolist() + question_tokens, 24)
    counter = PrefillCounter(loaded.model)
    try:
        result = run("chat", saved_context, "--ask", QUESTION, "--json", "--max-new-tokens", 24)
    finally:
        counter.remove()
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["answer"] == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert answer["tokens"] == len(expected)
    assert "1871" in answer["answer"] or "Oster" in answer["answer"]  # the real model reads the document
    # Only the question and the fed answer tokens went through the model (those whose next token
    # was a close call twice: once searched, once exact); no document token did.
    fed = len(expected) if answer["stop_reason"] == "stop" else len(expected) - 1
    assert counter.tokens == len(question_tokens) + fed + answer["steps_run_again_exactly"]


def test_raw_continuation_equals_single_pass(saved_context, loaded):
    store = ContextStore.open(saved_context)
    text = "The lighthouse was built by"
    raw_tokens = Prompter(loaded.tokenizer, PromptLayout.from_dict(store.manifest["prompt"])).question_tokens(text, True, raw=True)
    expected = reference_answer(loaded, store.tokens.tolist() + raw_tokens, 8)
    result = run("chat", saved_context, "--raw", "--ask", text, "--json", "--max-new-tokens", 8)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_multi_turn_follows_the_conversation(saved_context, loaded):
    store = ContextStore.open(saved_context)
    prompter = Prompter(loaded.tokenizer, PromptLayout.from_dict(store.manifest["prompt"]))
    q2 = "What did the keeper keep?"
    result = run("chat", saved_context, "--ask", QUESTION, "--ask", q2, "--json", "--max-new-tokens", 20)
    assert result.exit_code == 0, result.output
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    first_tokens = reference_answer(loaded, store.tokens.tolist() + prompter.question_tokens(QUESTION, True), 20)
    assert first["answer"] == loaded.tokenizer.decode(first_tokens, skip_special_tokens=True)
    conversation = store.tokens.tolist() + prompter.question_tokens(QUESTION, True) + first_tokens
    conversation += prompter.question_tokens(q2, first_turn=False)
    expected = reference_answer(loaded, conversation, 20)
    assert second["answer"] == loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_interactive_commands(saved_context):
    result = run("chat", saved_context, "--max-new-tokens", 6,
                 input=f"{QUESTION}\n/stats\n/clear\n/stats\n/bogus\n/help\n{QUESTION}\n/exit\n")
    assert result.exit_code == 0, result.output
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and answers[0] == answers[1]  # /clear forgot the first turn
    turns = [int(n) for n in re.findall(r"turns\s+(\d+)\n", result.stderr)]
    conversation = [int(n.replace(",", "")) for n in re.findall(r"conversation tokens +([\d,]+)\n", result.stderr)]
    assert turns == [1, 0] and conversation[0] > 0 and conversation[1] == 0
    assert "unknown command /bogus" in result.stderr and "/clear" in result.stderr


def test_ctrl_d_leaves_the_chat(saved_context):
    result = run("chat", saved_context, input="")
    assert result.exit_code == 0 and result.stdout == ""


def test_chat_on_document_reuses_cached_context(lighthouse_txt, loaded, reuse_loaded_model):
    first = run("chat", lighthouse_txt, "--ask", QUESTION, "--max-new-tokens", 4)
    assert first.exit_code == 0, first.output
    n = ContextStore.open(next((p for p in _cached_contexts()), None)).n_tokens
    assert f"reused 0/{n:,} tokens; prefilled {n:,}" in first.stderr
    counter = PrefillCounter(loaded.model)
    try:
        second = run("chat", lighthouse_txt, "--ask", QUESTION, "--max-new-tokens", 4)
    finally:
        counter.remove()
    assert second.exit_code == 0, second.output
    assert f"reused {n:,}/{n:,} tokens" in second.stderr
    assert counter.tokens < 40 and second.stdout == first.stdout


def _cached_contexts():
    import os
    from pathlib import Path

    return sorted((Path(os.environ["RA_CACHE_DIR"]) / "contexts").glob("*.idx"))


def test_answers_on_stdout_status_on_stderr(saved_context):
    result = run("chat", saved_context, "--ask", QUESTION, "--max-new-tokens", 5)
    assert result.exit_code == 0
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
