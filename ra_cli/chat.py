"""Chat over a stored context: append a question, stream an answer, keep the conversation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ra_cli.citations import FLOOR, SINKS, Citer, Source
from ra_cli.document import citation_unit
from ra_cli.engine.cache import ContextCache
from ra_cli.engine.mass import AttentionMass
from ra_cli.engine.generate import Sampling, decode, prefill
from ra_cli.errors import RaError
from ra_cli.model import LoadedModel
from ra_cli.prompt import Prompter, PromptLayout
from ra_cli.choices import AttentionMode
from ra_cli.retrieval.modes import open_cache
from ra_cli.retrieval.layer import RetrievalSettings
from ra_cli.store import ContextStore


@dataclass
class Answer:
    question: str
    text: str
    tokens: int
    seconds: float
    prompt_tokens: int
    prompt_seconds: float
    stop_reason: str
    sources: list[Source] = field(default_factory=list)
    decode_steps: int = 0  # forward passes after the prompt's (its logits give the first token)
    exact_steps: int = 0  # of those, how many ran again with exact attention (a close call between two tokens)

    @property
    def tokens_per_second(self) -> float:
        """Generation speed: decode forward passes per second (0 when there were none, e.g. -n 1)."""
        decode_seconds = self.seconds - self.prompt_seconds
        return self.decode_steps / decode_seconds if decode_seconds > 0 and self.decode_steps else 0.0

    def as_json(self) -> dict:
        return {
            "question": self.question, "answer": self.text, "tokens": self.tokens,
            "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 2),
            "prompt_tokens": self.prompt_tokens, "prompt_seconds": round(self.prompt_seconds, 3),
            "prompt_tokens_per_second": round(self.prompt_tokens_per_second, 1),
            "stop_reason": self.stop_reason, "steps_run_again_exactly": self.exact_steps,
            "sources": [source.as_json() for source in self.sources],
        }

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


class TextStream:
    """Incremental detokenization: yields only text that can no longer change."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.emitted = ""

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, tokens: list[int], stops: list[str] = ()) -> str:
        """New printable text; a tail that could be the start of a stop string is held back."""
        text = self.text(tokens)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""  # a multi-byte character is still incomplete, or detokenization shifted
        safe = len(text)
        for stop in stops:
            for size in range(min(len(stop), len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    safe = min(safe, len(text) - size)
                    break
        new = text[len(self.emitted):safe]
        self.emitted += new
        return new


def start_chat(loaded: LoadedModel, store: ContextStore, mode: AttentionMode | str = AttentionMode.retrieval,
               settings: RetrievalSettings | None = None) -> "ChatSession":
    """A conversation over a stored context. /clear rebuilds a retrieval cache (the conversation
    may have moved into its index); a full cache just forgets tokens."""
    mode = AttentionMode(mode)
    rebuild = None if mode is AttentionMode.full else (lambda: open_cache(loaded, store, mode, settings))
    return ChatSession(loaded, store, open_cache(loaded, store, mode, settings), rebuild=rebuild)


@dataclass
class ChatSession:
    loaded: LoadedModel
    store: ContextStore
    cache: ContextCache
    rebuild: Callable[[], ContextCache] | None = None  # a fresh cache, for /clear when truncation cannot
    turns: int = 0
    unfed: list[int] = field(default_factory=list)  # sampled tokens not yet in the cache
    history: list[Answer] = field(default_factory=list)
    cite: bool = True  # collect each answer's attention by position and cite the pages it went to
    # every token after the document, fed to the model or not (unfed's are its tail): what a saved
    # session stores and a resumed one prefills
    transcript: list[int] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)  # len(transcript) before each turn, for /regen
    # the document file or folder the chat read (None: a saved context, or stdin): a saved session
    # keeps it, to read it again if its cached context is cleared away
    origin: Path | None = None

    def __post_init__(self):
        self.layout = PromptLayout.from_dict(self.store.manifest["prompt"])
        self.prompter = Prompter(self.loaded.tokenizer, self.layout)
        self.document_tokens = self.store.n_tokens
        self.prefilled_tokens = 0  # tokens run through the model in this session (never the document)
        self.stop_ids = self.prompter.stop_ids(self.loaded.eos_token_id)
        document = self.store.manifest["document"]
        self.citer = Citer(self.store.token_pages, self.store.token_lines, citation_unit(document),
                           document.get("sections"), document.get("parts"))

    def clear(self) -> None:
        """Forget the conversation, keep the document."""
        self._restart()
        self.turns = 0
        self.unfed, self.transcript, self.marks, self.history = [], [], [], []

    def _restart(self) -> None:
        if self.rebuild is not None:
            self.cache = self.rebuild()  # retrieval caches may have moved conversation into the index
        else:
            self.cache.truncate(self.document_tokens)

    def restore(self, transcript: list[int], marks: list[int], history: list["Answer"]) -> None:
        """Continue a saved conversation: its tokens go back through the model after the document."""
        self.clear()
        if transcript:
            prefill(self.loaded.model, self.cache, transcript, want_logits=False)
            self.prefilled_tokens += len(transcript)
        self.transcript, self.marks, self.history = list(transcript), list(marks), list(history)
        self.turns = len(marks)

    def rewind(self) -> "Answer | None":
        """Forget the last turn (for /regen); returns it, or None when there is none."""
        if not self.marks:
            return None
        keep = self.marks.pop()
        last = self.history.pop() if self.history else None
        fed = self.cache.length - self.document_tokens
        try:
            if keep > fed:
                raise ValueError("the kept part was never fed")
            self.cache.truncate(self.document_tokens + keep)
        except ValueError:  # tokens already moved into the index: start over and replay what is kept
            self._restart()
            if keep:
                prefill(self.loaded.model, self.cache, self.transcript[:keep], want_logits=False)
        self.transcript = self.transcript[:keep]
        self.unfed = []
        self.turns = len(self.marks)
        return last

    def ask(self, question: str, max_new_tokens: int = 256, sampling: Sampling | None = None, raw: bool = False,
            on_text: Callable[[str], None] | None = None) -> Answer:
        sampling = sampling or Sampling()
        started = time.perf_counter()
        if not question.strip():
            raise RaError("the question is empty; type a question (or text to continue with --raw)")
        asked = self.prompter.question_tokens(question, first_turn=self.turns == 0, raw=raw)
        prompt = self.unfed + asked
        length = self.cache.length
        try:
            logits = prefill(self.loaded.model, self.cache, prompt, greedy=sampling.temperature <= 0)
        except KeyboardInterrupt:
            self.cache.truncate(length)  # as if the question had not been asked
            return Answer(question, "", 0, time.perf_counter() - started, 0, 0.0, "interrupted")
        self.marks.append(len(self.transcript))
        self.transcript += asked
        self.unfed = []
        self.prefilled_tokens += len(prompt)
        prompt_seconds = time.perf_counter() - started
        stream = TextStream(self.loaded.tokenizer)
        stops = [] if raw else self.layout.stop_strings

        def on_token(tokens: list[int]) -> bool:
            if stops and any(s in stream.text(tokens) for s in stops):
                return True
            piece = stream.push(tokens, stops)
            if piece and on_text is not None:
                on_text(piece)
            return False

        mass = AttentionMass(self.store.manifest["model_shape"]["heads"], self.document_tokens, SINKS, FLOOR) if self.cite else None
        redone = self.cache.exact_steps
        with self.cache.collecting(mass):
            decoded = decode(self.loaded.model, self.cache, logits, max_new_tokens, self.stop_ids, sampling, on_token)
        self.prefilled_tokens += decoded.fed
        tokens = decoded.tokens
        text = stream.text(tokens)
        for stop in stops:
            if stop in text:
                # Drop the stop marker from the answer and from the cache: the next turn writes its own.
                while tokens and stop in stream.text(tokens):
                    tokens = tokens[:-1]
                self.cache.truncate(self.cache.length - max(0, decoded.fed - len(tokens)))
                decoded.fed = min(decoded.fed, len(tokens))
                text = stream.text(tokens)
        tail = text[len(stream.emitted):] if text.startswith(stream.emitted) else ""
        if tail and on_text is not None:
            on_text(tail)
        self.unfed = tokens[decoded.fed:]
        self.transcript += tokens
        self.turns += 1
        sources = self.citer.sources(mass.by_position()) if mass is not None and not raw else []
        answer = Answer(question, text, len(decoded.tokens), time.perf_counter() - started, len(prompt),
                        prompt_seconds, decoded.stop_reason, sources, decoded.fed, self.cache.exact_steps - redone)
        self.history.append(answer)
        return answer

    def stats(self) -> dict:
        stats = {
            "document_tokens": self.document_tokens,
            "conversation_tokens": self.cache.length - self.document_tokens + len(self.unfed),
            "turns": self.turns,
            "prefilled_tokens_this_session": self.prefilled_tokens,
            "device_memory_mb": round(device_memory_bytes(self.cache, self.loaded) / 2**20, 1),
        }
        retrieval = getattr(self.cache, "retrieval_stats", None)
        if retrieval is not None:
            stats.update(retrieval.as_dict())
            stats["indexed_keys_per_head"] = retrieval.indexed_keys + retrieval.evicted
            stats["steps_run_again_exactly"] = self.cache.exact_steps
        return stats


def device_memory_bytes(cache: ContextCache, loaded: LoadedModel) -> int:
    """Bytes of KV the cache holds on the compute device (plus, on CUDA, what torch allocated)."""
    import torch

    if loaded.device.type == "cuda":
        return torch.cuda.memory_allocated(loaded.device)
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
