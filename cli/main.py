"""The `nh2st` command: parses arguments, calls nh2st, renders with rich. No behaviour lives here."""

import sys

import typer

from nh2st.errors import NH2STError
from nh2st.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="NH²2ST spatial expression from H&E: extract features once, train the heads fast.")


def _register() -> None:
    from cli import evaluate, extract, splits, train
    for module in (extract, splits, train, evaluate):
        module.register(app)


_register()


def main() -> None:
    try:
        app()
    except NH2STError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
