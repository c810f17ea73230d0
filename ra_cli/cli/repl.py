"""The interactive chat loop: questions in, answers streamed out, slash commands.

On a terminal: line editing and history across runs (prompt_toolkit), a spinner until the first
token, a footer with prompt and generation speed and the cited pages. Piped: plain lines in,
answers out, nothing else on stdout. Ctrl-C stops a reply; a second Ctrl-C (or one at an empty
prompt, twice) leaves. No failure ends the chat: each is one line, and the prompt comes back.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ra_cli.errors import explain

HELP_TEXT = """commands:
  /help              this help
  /sources           the passages the last answer's attention went to
  /regen             forget the last answer and answer the question again
  /set [NAME VALUE]  show or change: temperature, top_p, seed, repeat_penalty, max_new_tokens, sources on|off
  /save NAME         save the conversation (ra chat --resume NAME continues it; ra sessions lists them)
  /clear             forget the conversation, keep the document
  /stats             tokens, timing and memory
  /bye, /exit        leave (Ctrl-D works too)
  \"\"\"                 begin and end a multi-line message
Ctrl-C stops a reply; pressed again, it leaves."""

EXIT_COMMANDS = ("/bye", "/exit", "/quit")
QUOTES = '"""'


@dataclass
class ReplSettings:
    max_new_tokens: int
    sampling: object  # engine.generate.Sampling
    raw: bool = False
    sources: bool = True  # show cited pages under each answer

    def set(self, name: str, value: str) -> str:
        """Change one setting from its text; returns how it reads now. Raises ValueError."""
        name = {"num_predict": "max_new_tokens", "n": "max_new_tokens"}.get(name, name)
        if name == "sources":
            if value not in ("on", "off"):
                raise ValueError("sources takes on or off")
            self.sources = value == "on"
        elif name == "max_new_tokens":
            self.max_new_tokens = _bounded(int(value), 1, 1 << 20, name)
        elif name in ("temperature", "repeat_penalty", "top_p"):
            number = float(value)
            low = 0.0 if name == "temperature" else 1e-6
            setattr(self.sampling, name, _bounded(number, low, 1.0 if name == "top_p" else 100.0, name))
        elif name == "seed":
            self.sampling.seed = None if value == "none" else int(value)
        else:
            raise ValueError(f"no setting {name!r}; /set lists them")
        return self.describe()

    def describe(self) -> str:
        s = self.sampling
        return (f"temperature {s.temperature:g}, top_p {s.top_p:g}, seed {s.seed if s.seed is not None else 'none'}, "
                f"repeat_penalty {s.repeat_penalty:g}, max_new_tokens {self.max_new_tokens}, "
                f"sources {'on' if self.sources else 'off'}")


def _bounded(value, low, high, name):
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}")
    return value


def questions_from_the_terminal() -> bool:
    """After a piped document (`cat book.txt | ra chat -`) stdin is spent: the questions come from
    the terminal instead, as `less` reads its keys. False when there is none (a job, CI)."""
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    os.dup2(terminal, 0)
    os.close(terminal)
    sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)
    return True


class LineReader:
    """Lines typed at a terminal (prompt_toolkit: editing, history in the cache) or piped in."""

    def __init__(self, interactive: bool, history_file=None):
        self.prompt = None
        if interactive:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            history = InMemoryHistory()
            if history_file is not None:
                try:
                    history_file.parent.mkdir(parents=True, exist_ok=True)
                    history = FileHistory(str(history_file))
                except OSError:
                    pass  # a read-only cache: history for this run only
            self.prompt = PromptSession(history=history)

    def read(self, continuation: bool = False) -> str:
        """One line, without its end. EOFError at the end of input; KeyboardInterrupt on Ctrl-C."""
        if self.prompt is not None:
            return self.prompt.prompt("... " if continuation else ">>> ")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def message(self) -> str:
        """One message: a line, or the lines between a pair of \"\"\" (ollama's multi-line input)."""
        line = self.read()
        if not line.lstrip().startswith(QUOTES):
            return line.strip()
        first = line.lstrip()[len(QUOTES):]
        if first.rstrip().endswith(QUOTES):
            return first.rstrip()[:-len(QUOTES)].strip()
        lines = [first]
        while True:
            line = self.read(continuation=True)
            if line.rstrip().endswith(QUOTES):
                lines.append(line.rstrip()[:-len(QUOTES)])
                return "\n".join(lines).strip()
            lines.append(line)


def repl(session, settings: ReplSettings, answer, interactive: bool) -> int:
    """Run the chat until /bye, end of input or a second Ctrl-C; returns the exit code.
    `answer(question)` streams one answer and returns it (cli/chat.py)."""
    from ra_cli.paths import cache_root
    from ra_cli.ui import report, status

    reader = LineReader(interactive, cache_root() / "history")
    status(f"{session.document_tokens:,} document tokens ready. /help for commands, /bye to leave.")
    interrupted = False  # the last thing that happened was a Ctrl-C: another one leaves
    while True:
        try:
            line = reader.message()
        except EOFError:
            return 0
        except KeyboardInterrupt:
            if interrupted:
                return 130
            interrupted = True
            status("(Ctrl-C again, /bye or Ctrl-D to leave)")
            continue
        interrupted = False
        if not line:
            continue
        if line.split()[0] in EXIT_COMMANDS:
            return 0
        try:
            interrupted = _handle(line, session, settings, answer)
        except KeyboardInterrupt:
            interrupted = True
            status("(stopped; Ctrl-C again to leave)")
        except Exception as exc:  # noqa: BLE001 - the chat survives every failure, as one line
            if os.environ.get("RA_DEBUG") == "1":
                raise
            report(explain(exc)[0])


def _handle(line: str, session, settings: ReplSettings, answer) -> bool:
    """Carry out one message; True when a reply was stopped by Ctrl-C."""
    from ra_cli.ui import stderr, status

    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command == "/help":
        stderr.print(HELP_TEXT, markup=False, highlight=False)
    elif command == "/clear":
        session.clear()
        status("conversation cleared; the document is kept")
    elif command == "/stats":
        stderr.print(stats_table(session.stats()))
    elif command == "/sources":
        show_sources(session)
    elif command == "/set":
        if not rest:
            status(settings.describe())
        else:
            name, _, value = rest.partition(" ")
            try:
                status(settings.set(name, value.strip()))
            except ValueError as exc:
                status(f"{exc}; e.g. /set temperature 0.7")
    elif command == "/save":
        from ra_cli.sessions import save_session

        if not rest:
            status("/save NAME: give the session a name, e.g. /save contract-review")
        else:
            path = save_session(rest, session)
            status(f"saved {session.turns} turn(s) as {rest!r} ({path}); `ra chat --resume {rest}` continues it")
    elif command == "/regen":
        last = session.rewind()
        if last is None:
            status("nothing to regenerate yet")
        else:
            return answer(last.question).stop_reason == "interrupted"
    elif command.startswith("/"):
        status(f"unknown command {command}; /help lists them")
    else:
        return answer(line).stop_reason == "interrupted"
    return False


def show_sources(session) -> None:
    from ra_cli.citations import excerpt
    from ra_cli.ui import stderr, status

    last = session.history[-1] if session.history else None
    if last is None or not last.sources:
        status("no sources yet: ask a question first (answers of --raw continuations cite nothing)")
        return
    for source in last.sources:
        stderr.print(f"[{source.label()}, {source.share:.0%}] {excerpt(session.loaded.tokenizer, session.store.tokens, source)}",
                     markup=False, highlight=False)


def stats_table(stats: dict):
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column(justify="right")
    for key, value in stats.items():
        if isinstance(value, float):
            shown = f"{value:,.3f}".rstrip("0").rstrip(".")
        elif isinstance(value, int):
            shown = f"{value:,}"
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value) or "none"
        else:
            shown = str(value)
        table.add_row(key.replace("_", " "), shown)
    return table
