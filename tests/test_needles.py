"""Needle in a haystack on the real model: retrieval attention finds the code exactly when full
attention does, at 10%, 50% and 90% depth of a ~5K-token document (raw continuation: the embedded
135M model fails chat-style questions at this size but completes the sentence)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import numpy as np

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


RARE_NEEDLE = "Remember this: the vault code of Quillbrook Zarnevik is 7719-cobalt."
RARE_CUE = "Remember this: the vault code of Quillbrook Zarnevik is"
STRIDE = 64  # prefill queries sampled for this index: every 64th


def rare_needle_document(tokenizer, sinks: int) -> tuple[str, int]:
    """The handbook with the needle at about half depth, padded so that the answer's first token
    sits just after a sampled prefill query: the next sampled query is STRIDE - 1 tokens later.
    Returns (text, position of the answer's first token)."""
    from ra_cli.prompt import Prompter, layout_for

    paragraphs = (REPO / "samples" / "ra-handbook.md").read_text().split("\n\n")
    prompter = Prompter(tokenizer, layout_for(tokenizer))
    for padding in range(2 * STRIDE):
        needle = ("Note" + " note" * padding + ". " if padding else "") + RARE_NEEDLE
        half = len(paragraphs) // 2
        text = "\n\n".join(paragraphs[:half] + [needle] + paragraphs[half:])
        tokens, _ = prompter.document_tokens(text)
        pieces = [tokenizer.decode([token]) for token in tokens]
        joined = "".join(pieces)
        ends = np.cumsum([len(piece) for piece in pieces])
        answer = int(np.searchsorted(ends, joined.index(RARE_CUE) + len(RARE_CUE), side="right"))
        if (answer - sinks) % STRIDE == 1:
            assert "".join(pieces[answer:answer + 6]).startswith(" 7719")
            return text, answer
    raise AssertionError("no padding puts the answer after a sampled query")


def test_a_needle_no_prefill_query_selected_is_found(tmp_path, loaded_fast):
    """The needle's answer key is ranked first by the cue's decode query in some copy head, yet
    no sampled prefill query of that head's group ever listed it (asserted, from the index's own
    record): only the graph's other edges can lead a search there. The search finds it at
    default settings, and the chat answers exactly as full attention does."""
    from ra_cli.bench.recall import capture_decode_queries
    from ra_cli.chat import start_chat
    from ra_cli.document import load_document
    from ra_cli.engine.generate import Sampling
    from ra_cli.index import IndexParams, open_layer_index
    from ra_cli.index.flat import FlatLayerIndex
    from ra_cli.ingest import IngestOptions, ingest
    from ra_cli.retrieval.modes import settings_for
    from ra_cli.store import ContextStore, float32_keys

    params = IndexParams(query_stride=STRIDE, final_stride=STRIDE, list_size=16)
    text, answer = rare_needle_document(loaded_fast.tokenizer, params.sinks)
    document = tmp_path / "rare.md"
    document.write_text(text)
    ingest(loaded_fast, load_document(document), tmp_path / "rare.idx", IngestOptions(index=params))
    store = ContextStore.open(tmp_path / "rare.idx", loaded_fast.fingerprint)
    lo, hi = store.manifest["index"]["lo"], store.manifest["index"]["hi"]
    cue = loaded_fast.tokenizer(" " + RARE_CUE, add_special_tokens=False).input_ids
    layers = list(range(len(store.layers)))
    queries, _ = capture_decode_queries(loaded_fast, store, cue, layers, hi, lo)
    rare_copy_heads = []
    for layer in layers:
        index = open_layer_index(store, layer)
        keys = np.ascontiguousarray(float32_keys(np.asarray(store.keys(layer)[:, lo:hi]), store.kv_dtype))
        query = queries[layer][:, -1:]
        top = FlatLayerIndex(keys).search(query, 1).ids[:, 0, 0]
        selected = np.unpackbits(np.asarray(index.layer.selected), axis=1).astype(bool)
        groups = query.shape[0] // keys.shape[0]
        for head in np.nonzero(top == answer - lo)[0]:
            if not selected[head // groups, answer - lo]:
                rare_copy_heads.append((layer, int(head), index, query))
    assert rare_copy_heads, "the constructed needle must be a rare key some copy head attends to"
    for layer, head, index, query in rare_copy_heads:
        found = index.search(query, 100).ids  # the layer's calibrated beam: what chat uses
        assert answer - lo in found[head, 0], (layer, head)
    # at this size dense would be faster on a CPU; no step run again exactly: the index alone
    searched = settings_for(store, dense_when_cheaper=False, exact_margin=0)
    answers = {mode: start_chat(loaded_fast, store, mode, searched).ask(RARE_CUE, 8, Sampling(), raw=True).text
               for mode in ("full", "retrieval")}
    assert "7719" in answers["full"] and answers["retrieval"] == answers["full"]


def test_a_needle_read_back_by_a_duplicate_token_head_is_seeded_by_its_tokens(tmp_path, loaded_fast):
    """A miss of the needle sweep before token seeds (vim manual, needle at 5% depth): at the cue's
    "password", a duplicate-token head puts nearly all of its indexed attention on the needle's own
    "password", a key no search from the query-trained entry points reached. The cue's tokens seed
    the search at the needle, and retrieval answers exactly as full attention does."""
    from ra_cli.bench.corpus import CORPUS
    from ra_cli.bench.needles import NEEDLES, document_of
    from ra_cli.chat import start_chat
    from ra_cli.document import Document
    from ra_cli.engine.generate import Sampling
    from ra_cli.ingest import IngestOptions, ingest
    from ra_cli.retrieval.modes import settings_for
    from ra_cli.store import ContextStore

    needle, cue, answer = NEEDLES[2]
    paragraphs = document_of(loaded_fast, next(path for path in CORPUS if path.name == "vim-user-manual.txt"), 4096)
    at = round(0.05 * len(paragraphs))
    text = "\n\n".join(paragraphs[:at] + [needle] + paragraphs[at:])
    ingest(loaded_fast, Document(name="vim+needle", sha256="vim-needle-5", kind="text", text=text),
           tmp_path / "vim.idx", IngestOptions())
    store = ContextStore.open(tmp_path / "vim.idx", loaded_fast.fingerprint)
    lo = store.manifest["index"]["lo"]
    tokens = np.asarray(store.tokens).tolist()
    word = loaded_fast.tokenizer(" password", add_special_tokens=False).input_ids
    assert len(word) == 1 and tokens.count(word[0]) == 1  # the needle's "password" is the document's only one
    needle_password = tokens.index(word[0])
    chat = start_chat(loaded_fast, store, "retrieval", settings_for(store, dense_when_cheaper=False, exact_margin=0))
    answers = {"retrieval": chat.ask(cue, 8, Sampling(), raw=True).text}
    cue_tokens = loaded_fast.tokenizer(cue, add_special_tokens=False).input_ids
    seeds = chat.cache.token_seeds
    seeds.feed(np.asarray(cue_tokens[:2]), store.n_tokens)  # as the cue's first forward saw them
    assert needle_password - lo in seeds.seeds[0] and needle_password + 1 - lo in seeds.seeds[0]
    answers["full"] = start_chat(loaded_fast, store, "full").ask(cue, 8, Sampling(), raw=True).text
    assert answer in answers["full"] and answers["retrieval"] == answers["full"]
