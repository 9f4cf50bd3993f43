"""Rich progress bars for long work, silent on non-zero ranks and when disabled."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


def _enabled() -> bool:
    return int(os.environ.get("RANK", "0")) == 0 and os.environ.get("RAE_NO_PROGRESS", "") != "1"


@contextlib.contextmanager
def progress(total: int, description: str, unit: str = "img", completed: int = 0) -> Iterator[Callable[..., None]]:
    """``with progress(n, "encoding") as advance: advance(k, loss=0.1)`` shows a bar with ``unit``/s.

    Extra keyword arguments to ``advance`` are shown after the bar (losses, learning rate, ...).
    """
    if not _enabled():
        yield lambda n=1, **info: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False,
                  disable=not (console.is_terminal or os.environ.get("RAE_PROGRESS") == "1")) as bar:
        task = bar.add_task(description, total=total, completed=completed, rate="", info="")
        state = {"done": 0}

        def advance(n: int = 1, **info) -> None:
            state["done"] += n
            t = bar.tasks[task]
            speed = t.finished_speed or t.speed
            fields = {"rate": f"{speed:,.0f} {unit}/s" if speed else ""}
            if info:
                fields["info"] = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            bar.update(task, advance=n, **fields)

        yield advance
    if not console.is_terminal and os.environ.get("RAE_PROGRESS") != "1":
        print(f"{description}: {state['done']}/{total} {unit}", file=sys.stderr)
