"""What every command shares: several values after one flag, and warnings printed on stderr."""

import warnings
from contextlib import contextmanager

from typer.core import TyperCommand

from nh2st.progress import console as stderr


class MultiValueCommand(TyperCommand):
    """Lets `--folds 0 2 --genes A B` mean `--folds 0 --folds 2 --genes A --genes B`.

    Click takes one value per occurrence of a flag; every option declared as a list (multiple)
    here also takes the bare values that follow it.
    """

    def parse_args(self, ctx, args):
        multi = {opt for param in self.params if getattr(param, "multiple", False) for opt in param.opts}
        out, current, first = [], None, False
        for arg in args:
            if arg in multi:
                current, first = arg, True
                out.append(arg)
            elif arg.startswith("-"):
                current = None
                out.append(arg)
            elif current and not first:
                out += [current, arg]
            else:
                first = False
                out.append(arg)
        return super().parse_args(ctx, out)


def fmt(value) -> str:
    """A metric in a table: three decimals, an em dash where undefined."""
    return "—" if value is None else f"{value:.3f}"


def split_values(values: list[str] | str | None) -> list[str]:
    """Flatten repeated and comma-separated values: ["0,2", "3"] -> ["0", "2", "3"]."""
    if isinstance(values, str):
        values = [values]
    return [s.strip() for v in values or [] for s in v.split(",") if s.strip()]


@contextmanager
def warnings_on_console(category=UserWarning):
    """Print the library's warnings of `category` as one yellow line each on stderr, also on error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, category):
                    stderr.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)
