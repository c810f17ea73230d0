"""Terminal presentation: status and progress on stderr, so stdout carries only answers/JSON."""

from __future__ import annotations

import contextlib

import numpy as np
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)  # listings a user asked for (ra info, ra sessions); plain when piped


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.fields.get("rate")
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"– {self.unit}/s", style="cyan")


class LeftColumn(ProgressColumn):
    """The time left as the task's own estimate gives it (field "left", seconds)."""

    def render(self, task) -> Text:
        left = task.fields.get("left")
        if left is None:
            return Text("-:--:--", style="progress.remaining")
        return Text(f"{int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}", style="progress.remaining")


def progress(unit: str, transient: bool = False, remaining: ProgressColumn | None = None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
        TimeElapsedColumn(), TextColumn("eta"), remaining or TimeRemainingColumn(),
        console=stderr, transient=transient,
    )


@contextlib.contextmanager
def page_progress(description: str = "reading"):
    """A progress bar for PDF pages; yields the callback document.load_document expects."""
    with progress("pages", transient=True) as bar:
        task = bar.add_task(description, total=None)

        def on_page(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, rate=None)

        yield on_page


def prefill_seconds_left(samples: list[tuple[float, int]], total: int, span: int | None = None) -> float | None:
    """Seconds left of a prefill of `total` tokens from its progress so far, (seconds, tokens done)
    pairs. A token costs a + b * the keys it attends to: every earlier one in a full prefill, so its
    tokens get dearer as it goes and a constant rate promises the end several times too soon; at
    most `span` in a sparse prefill (sinks, window and chosen blocks), whose cost stops growing
    there. a, b >= 0 are fitted by least squares to the time from the second sample on: the first
    chunk also pays for compiling kernels and warming caches."""
    if len(samples) >= 3:
        samples = samples[1:]
    if len(samples) < 2:
        return None

    def attended(done):  # keys attended by the tokens before `done`, summed
        done = np.asarray(done, float)
        if span is None:
            return done * done / 2
        return np.where(done <= span, done * done / 2, span * span / 2 + span * (done - span))

    (t0, d0), (_, done) = samples[0], samples[-1]
    later = np.array([d for _, d in samples[1:]], float)
    x1, x2 = later - d0, attended(later) - attended(d0)  # tokens and attended keys since the origin
    y = np.array([t - t0 for t, _ in samples[1:]], float)
    if not x1.any():
        return None
    columns = np.stack([x1, x2], 1)
    if len(y) >= 2:
        a, b = np.linalg.lstsq(columns, y, rcond=None)[0]
    if len(y) < 2 or a < 0 or b < 0:
        # one term alone: the better fit of a constant cost and a cost that grows with the keys attended
        fits = [(x1 @ y / (x1 @ x1), 0.0)] + ([(0.0, x2 @ y / (x2 @ x2))] if len(y) >= 2 else [])
        a, b = min(fits, key=lambda ab: float(np.sum((columns @ np.array(ab) - y) ** 2)))
    a, b = max(a, 0.0), max(b, 0.0)
    return float(a * (total - done) + b * (attended(total) - attended(done)))


class TokenProgress:
    """Progress bar for prefill; the rate counts only tokens prefilled in this run, the time left
    is prefill_seconds_left's. A bar is drawn only on a terminal: when stderr is a file or a pipe
    (a log, nohup, CI) a plain line reports progress every LOG_SECONDS instead, so a long ingest is
    not silent there for minutes."""

    LOG_SECONDS = 30.0

    def __init__(self, description: str = "prefill"):
        import time

        self._clock = time.perf_counter
        self.description = description
        self.bar = progress("tok", remaining=LeftColumn())
        self.task = None
        self.samples: list[tuple[float, int]] = []
        self.started = None
        self.logged = None  # when the last plain line was written
        self.first_done = 0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, done: int, total: int, reused: int, span: int | None = None) -> None:
        now = self._clock()
        if self.task is None:
            self.task = self.bar.add_task(self.description, total=total)
            self.started = self.logged = now
            self.first_done = done
        elapsed = now - self.started
        rate = (done - self.first_done) / elapsed if elapsed > 0 and done > self.first_done else None
        self.samples.append((now, done))
        seconds_left = prefill_seconds_left(self.samples, total, span)
        self.bar.update(self.task, completed=done, total=total, rate=rate, left=seconds_left)
        if not stderr.is_terminal and done < total and now - self.logged >= self.LOG_SECONDS:
            self.logged = now
            left = f", about {_minutes(seconds_left)} left" if seconds_left is not None else ""
            status(f"{self.description}: {done:,}/{total:,} tokens ({done / total:.0%}), "
                   f"{rate or 0:,.0f} tok/s{left}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class LayerProgress:
    """Progress of the per-layer index build, shown once the first layer is done."""

    def __init__(self, description: str = "index"):
        self.description = description
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress("layers", transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.description, total=total)
        self.bar.update(self.task, completed=done)
        if done == total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def status(message: str) -> None:
    # Text, not markup: messages carry file names, and "notes[draft].pdf" must print as it is.
    stderr.print(Text(message, style="dim"), soft_wrap=True)


def warn(message: str) -> None:
    stderr.print(Text.assemble(("warning:", "bold yellow"), " ", message), soft_wrap=True)


def report(message: str) -> None:
    """One line on stderr: `error: ...`. Text, not markup: file names like "notes[draft].pdf"
    must print as they are."""
    stderr.print(Text.assemble(("error:", "bold red"), " ", message.replace("\n", " ")), soft_wrap=True)


def byte_size(count: float) -> str:
    """1,234 B, 12.3 MiB, 3.9 GiB: sizes as `ra info` and `ra cache` print them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
