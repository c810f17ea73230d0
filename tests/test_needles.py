"""Needle in a haystack on the real model: retrieval attention finds the code exactly when full
attention does, at 10%, 50% and 90% depth of a ~5K-token document (raw continuation: the embedded
135M model fails chat-style questions at this size but completes the sentence)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import REPO
from ra_cli.cli import app

runner = CliRunner()
NEEDLE = "The secret code for project Falcon is red-otter-25."
CUE = "The secret code for project Falcon is"


def haystack_with_needle(depth: float) -> str:
    paragraphs = (REPO / "samples" / "ra-handbook.md").read_text().split("\n\n")
    hay = paragraphs + paragraphs
    at = int(len(hay) * depth)
    return "\n\n".join(hay[:at] + [NEEDLE] + hay[at:])


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_found_exactly_when_full_attention_finds_it(depth, tmp_path, reuse_loaded_model):
    document = tmp_path / f"needle{int(depth * 100)}.md"
    document.write_text(haystack_with_needle(depth))
    context = tmp_path / "needle.idx"
    ingested = runner.invoke(app, ["ingest", str(document), "--save", str(context), "--json"])
    assert ingested.exit_code == 0, ingested.output
    assert 4000 <= json.loads(ingested.stdout)["tokens"] <= 6000
    answers = {}
    for attention in ("full", "retrieval"):
        result = runner.invoke(app, ["chat", str(context), "--raw", "--ask", CUE, "--attention", attention,
                                     "--max-new-tokens", "8", "--json"])
        assert result.exit_code == 0, result.output
        answers[attention] = json.loads(result.stdout)["answer"]
    assert "red-otter-25" in answers["full"]  # the model can do it with full attention...
    assert answers["retrieval"] == answers["full"]  # ...and retrieval attention gives the same answer
