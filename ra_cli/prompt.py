"""Prompt layout: how document, questions and answers become one token sequence.

The stored context is the token prefix [opening + document + separator]; everything after it is
appended at chat time, so one ingest serves every question:

    chat models   <template opening, system prompt, user turn opens> DOCUMENT "\n\n" QUESTION
                  <user turn closes, assistant turn opens> ANSWER <assistant closes, user opens> ...
    plain models  DOCUMENT "\n\n" "Question: " QUESTION "\nAnswer:" ANSWER "\n\nQuestion: " ...
    --raw         DOCUMENT-PREFIX TEXT  (the text continues the document; no template at all)

The template pieces are cut out of the model's own chat template by rendering a conversation of
sentinel strings. Document and question text are tokenized with special tokens split, so a
document that contains "<|im_end|>" cannot close the user turn.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

DOC_SEPARATOR = "\n\n"
_SENTINELS = ("\x00RA_U1\x00", "\x00RA_A1\x00", "\x00RA_U2\x00")


@dataclass
class PromptLayout:
    style: str  # "chat" or "plain"
    opening: str  # before the document (may contain special tokens)
    first_open: str  # between the document separator and the first question
    close: str  # after each question: the model answers from here
    turn_open: str  # after an answer, before the next question
    stop_strings: list[str] = field(default_factory=list)
    bos_token_id: int | None = None  # prepended when the tokenizer expects one and the template lacks it

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptLayout":
        return cls(**data)


def layout_for(tokenizer) -> PromptLayout:
    bos = _implicit_bos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        pieces = _template_pieces(tokenizer)
        if pieces is not None:
            opening, user_close_assistant_open, assistant_close_user_open, close = pieces
            if bos is not None and tokenizer.bos_token and opening.startswith(tokenizer.bos_token):
                bos = None
            return PromptLayout("chat", opening, "", close, assistant_close_user_open, [], bos)
    return PromptLayout("plain", "", "Question: ", "\nAnswer:", "\n\nQuestion: ", ["\nQuestion:"], bos)


def _implicit_bos(tokenizer) -> int | None:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    return bos_id if with_special[:1] == [bos_id] and without[:1] != [bos_id] else None


def _template_pieces(tokenizer) -> tuple[str, str, str, str] | None:
    u1, a1, u2 = _SENTINELS
    messages = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        return None
    if not isinstance(rendered, str) or any(rendered.count(s) != 1 for s in _SENTINELS):
        return None
    i1, i2, i3 = (rendered.index(s) for s in _SENTINELS)
    if not i1 < i2 < i3:
        return None
    opening = rendered[:i1]
    between_user_assistant = rendered[i1 + len(u1): i2]
    between_assistant_user = rendered[i2 + len(a1): i3]
    close = rendered[i3 + len(u2):]
    return opening, between_user_assistant, between_assistant_user, close


class Prompter:
    """Turns document and conversation text into token ids under one layout."""

    def __init__(self, tokenizer, layout: PromptLayout):
        self.tokenizer = tokenizer
        self.layout = layout

    def _template(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _content(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def document_tokens(self, text: str, page_starts: list[int] | None = None) -> tuple[list[int], list[int]]:
        """Token ids of the stored prefix, and the 1-based page of each token (0: not document text)."""
        ids, pages, _ = self.document_places(text, page_starts)
        return ids, pages

    def document_places(self, text: str, page_starts: list[int] | None = None) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the stored prefix with the 1-based page and line of each token (0: not
        document text). A token's line is that of its first character other than white space, so
        "\n\nThe" belongs to the line "The" starts, and white space alone to the line before it:
        no token starts on a blank line."""
        head = ([self.layout.bos_token_id] if self.layout.bos_token_id is not None else []) + self._template(self.layout.opening)
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        tail = self._template(DOC_SEPARATOR)
        starts = page_starts or [0]
        breaks = [i for i, ch in enumerate(text) if ch == "\n"]
        doc_pages, doc_lines = [], []
        line = 1
        for start, end in encoded.offset_mapping:
            doc_pages.append(bisect.bisect_right(starts, start))
            piece = text[start:end]
            if piece.strip():
                line = bisect.bisect_left(breaks, start + len(piece) - len(piece.lstrip())) + 1
            doc_lines.append(line)
        ids = head + list(encoded.input_ids) + tail
        outside = [0] * len(head), [0] * len(tail)
        return ids, outside[0] + doc_pages + outside[1], outside[0] + doc_lines + outside[1]

    def stop_ids(self, eos_token_ids) -> set[int]:
        """Tokens that end an answer: the model's end-of-sequence tokens (`eos_token_ids`: the
        generation config's id or list of ids) and the tokenizer's, plus the chat template's own
        end-of-turn marker when it is a special token (it ends a turn even when it is not eos)."""
        ids = set()
        for token in (eos_token_ids if isinstance(eos_token_ids, (list, tuple)) else [eos_token_ids]) + [self.tokenizer.eos_token_id]:
            if token is not None:
                ids.add(int(token))
        if self.layout.style == "chat":
            close_ids = self._template(self.layout.turn_open)
            if close_ids and close_ids[0] in set(self.tokenizer.all_special_ids):
                ids.add(close_ids[0])
        return ids

    def question_tokens(self, question: str, first_turn: bool, raw: bool = False) -> list[int]:
        if raw:
            return self._content(question)
        opener = self.layout.first_open if first_turn else self.layout.turn_open
        if self.layout.style == "plain":
            # Plain openers are ordinary text; the whole turn tokenizes as content.
            return self._content(opener + question + self.layout.close)
        return self._template(opener) + self._content(question) + self._template(self.layout.close)
