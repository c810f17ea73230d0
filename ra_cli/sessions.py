"""Saved conversations: `/save NAME` in a chat, `ra chat --resume NAME`, `ra sessions`.

A session file is JSON (never a pickle) in `<cache>/sessions/NAME.json`: the context it talks
about, the conversation's token ids after the document (re-prefilled on resume: the document's KV
comes from the store), where each turn began, and the questions and answers as text. Session
files are read as untrusted input: every field is checked before use.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ra_cli.chat import Answer, ChatSession
from ra_cli.errors import RaError
from ra_cli.files import write_json_atomic
from ra_cli.ingest import is_context
from ra_cli.paths import cache_root

FORMAT = "ra-session"
VERSION = 1
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def sessions_dir() -> Path:
    return cache_root() / "sessions"


def session_path(name: str) -> Path:
    if not NAME.fullmatch(name or "") or name.endswith(".json"):
        raise RaError(f"bad session name {name!r}; use letters, digits, '.', '_' or '-' (at most 64), e.g. /save contract-review")
    return sessions_dir() / f"{name}.json"


@dataclass
class SavedSession:
    name: str
    context: Path  # the store the conversation is about
    document: str
    model: str
    saved: str
    transcript: list[int]
    marks: list[int]
    turns: list[dict]  # {"question", "answer"}
    origin: Path | None = None  # the document file or folder the chat read, if any
    document_sha256: str = ""  # what it held then (a changed document is not the conversation's)


def save_session(name: str, session: ChatSession) -> Path:
    path = session_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {
        "format": FORMAT, "version": VERSION, "name": name,
        "context": str(Path(session.store.path).resolve()),
        "document": session.store.manifest["document"].get("name", ""),
        "origin": str(session.origin.resolve()) if session.origin is not None else "",
        "document_sha256": session.store.manifest["document"].get("sha256", ""),
        "model": session.store.manifest["model"].get("source", ""),
        "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "transcript": [int(t) for t in session.transcript], "marks": list(session.marks),
        "turns": [{"question": a.question, "answer": a.text} for a in session.history],
    })
    return path


def load_session(name: str) -> SavedSession:
    path = session_path(name)
    if not path.is_file():
        raise RaError(f"no saved session {name!r}; `ra sessions` lists them (save one with /save NAME in a chat)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RaError(f"{path}: unreadable session file ({str(exc)[:80]}); delete it")
    return _checked(path, data)


def _checked(path: Path, data) -> SavedSession:
    def need(condition, what: str) -> None:
        if not condition:
            raise RaError(f"{path}: not a valid ra session ({what}); delete it")

    need(isinstance(data, dict) and data.get("format") == FORMAT, "format")
    need(data.get("version") == VERSION, f"version {data.get('version')!r}, this ra reads {VERSION}")
    transcript, marks, turns = data.get("transcript"), data.get("marks"), data.get("turns")
    need(isinstance(transcript, list) and all(isinstance(t, int) and 0 <= t < 1 << 31 for t in transcript), "tokens")
    need(isinstance(marks, list) and all(isinstance(m, int) for m in marks)
         and marks == sorted(marks) and all(0 <= m <= len(transcript) for m in marks), "turn marks")
    need(isinstance(turns, list) and all(isinstance(t, dict) and isinstance(t.get("question"), str)
                                         and isinstance(t.get("answer"), str) for t in turns), "turns")
    for key in ("name", "context", "document", "model", "saved"):
        need(isinstance(data.get(key), str), key)
    for key in ("origin", "document_sha256"):  # absent from sessions saved before ra kept them
        need(isinstance(data.get(key, ""), str), key)
    return SavedSession(data["name"], Path(data["context"]), data["document"], data["model"], data["saved"],
                        transcript, marks, turns, Path(data["origin"]) if data.get("origin") else None,
                        data.get("document_sha256", ""))


def what_to_reopen(saved: SavedSession) -> Path:
    """What a resumed session reads: its context, or when that is gone (`ra cache clear`) the
    document it was made from, to ingest again."""
    if is_context(saved.context):
        return saved.context
    if saved.origin is not None and saved.origin.exists():
        return saved.origin
    where = f" and {saved.origin} is gone too" if saved.origin is not None else ""
    raise RaError(f"session {saved.name!r}: its context {saved.context} is gone (cleared from the cache?){where}; "
                  f"start a new chat with the document ({saved.document})")


def check_same_document(saved: SavedSession, sha256: str) -> None:
    """A session reopened from its document must find the text its conversation was about."""
    if saved.document_sha256 and sha256 != saved.document_sha256:
        raise RaError(f"session {saved.name!r}: {saved.origin} has changed since the conversation was saved "
                      "(and its context is gone); start a new chat with it")


def resume(session: ChatSession, saved: SavedSession) -> None:
    vocab = len(session.loaded.tokenizer)
    if any(t >= vocab for t in saved.transcript):
        raise RaError(f"session {saved.name!r} holds tokens this model does not know; it was saved with another model")
    history = [Answer(turn["question"], turn["answer"], 0, 0.0, 0, 0.0, "restored") for turn in saved.turns]
    session.restore(saved.transcript, saved.marks, history)


def list_sessions() -> list[dict]:
    found = []
    for path in sorted(sessions_dir().glob("*.json")) if sessions_dir().is_dir() else []:
        try:
            saved = _checked(path, json.loads(path.read_text()))
        except (RaError, OSError, ValueError):
            found.append({"name": path.stem, "valid": False})
            continue
        found.append({"name": saved.name, "valid": True, "document": saved.document, "context": str(saved.context),
                      "model": saved.model, "turns": len(saved.marks), "saved": saved.saved})
    return found
