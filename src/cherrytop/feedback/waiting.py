"""Waiting for people: a progress bar over work the labelling app's users do (rankings, arena votes), polled
from the database until it is done. Ctrl-C stops the wait; what was done stays in the database."""

from __future__ import annotations

import time
from collections.abc import Callable

from cherrytop.train.loop import console


def wait_for(progress: Callable[[], tuple[int, int]], what: str, poll_s: float) -> None:
    """Until progress() = (done, needed) has done >= needed, re-read every `poll_s` seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    done, need = progress()
    if done >= need:
        return
    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(what, total=need, completed=done)
        while done < need:
            time.sleep(poll_s)
            done, need = progress()
            bar.update(task, total=need, completed=done)
