"""Console and progress bars shared by all long work (rich, on stderr)."""

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

console = Console(stderr=True)


def make_progress(*extra_columns, transient: bool = False) -> Progress:
    """A rich Progress on stderr: description, bar, n/total, extra columns, elapsed, remaining."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *extra_columns, TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=transient)
