"""The interactive chat loop: questions in, answers streamed out, slash commands."""

from __future__ import annotations

import json

from ra_cli.errors import RaError

HELP_TEXT = """commands:
  /help    this help
  /clear   forget the conversation, keep the document
  /stats   tokens, timing and memory
  /exit    leave (Ctrl-D works too); Ctrl-C stops a reply"""


def repl(session, answer) -> None:
    from ra_cli.ui import report
    from ra_cli.ui import stderr

    stderr.print(f"[dim]{session.document_tokens:,} document tokens ready. /help for commands.[/dim]")
    while True:
        try:
            stderr.print("[bold green]>>> [/bold green]", end="")
            line = input()
        except EOFError:
            stderr.print()
            return
        except KeyboardInterrupt:
            stderr.print("\n[dim](use /exit or Ctrl-D to leave)[/dim]")
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            return
        if line == "/help":
            stderr.print(HELP_TEXT, markup=False)
        elif line == "/clear":
            session.clear()
            stderr.print("[dim]conversation cleared; the document is kept[/dim]")
        elif line == "/stats":
            stderr.print(json.dumps(session.stats(), indent=1), markup=False)
        elif line.startswith("/"):
            stderr.print(f"unknown command {line.split()[0]}; /help lists them", markup=False)
        else:
            try:
                answer(line)
            except RaError as exc:
                report(str(exc))
