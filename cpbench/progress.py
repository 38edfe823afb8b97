"""Progress of a sweep on stderr: a live bar on a terminal, one plain line per case elsewhere.

A terminal gets rich's progress bar (redrawn in place). Anything else (a CI log, ``nohup``, a pipe)
gets one line per finished case, ``cpbench: [k/N] <case> (t s, total T s)``, flushed at once, so a
log shows how far a run got and how long each case took. ``--no-progress`` turns both off.
"""

from __future__ import annotations

import sys
import time


class LineProgress:
    """The subset of ``rich.progress.Progress`` the sweep uses, printing one line per advance."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.stream = stream or sys.stderr
        self.done = 0
        self.description = ""
        self._t0 = self._t_case = time.perf_counter()

    def start(self) -> None:
        self._t0 = self._t_case = time.perf_counter()

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: int | None = None) -> int:
        self.total = total if total is not None else self.total
        return 0

    def update(self, task: int, description: str | None = None) -> None:
        if description is not None:
            self.description = description
            self._t_case = time.perf_counter()

    def advance(self, task: int, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        text = self.description.split("] ", 1)[-1] if self.description.startswith("[") else self.description
        print(
            f"cpbench: [{self.done}/{self.total}] {text} ({now - self._t_case:.1f} s, total {now - self._t0:.0f} s)",
            file=self.stream,
            flush=True,
        )


def make_progress(total: int):
    """A rich progress bar on a terminal, else a :class:`LineProgress`."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return LineProgress(total)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
