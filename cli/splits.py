"""`nh2st splits`: each fold's train/test sample ids, as a rich table or JSON."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.common import MultiValueCommand, split_values, warnings_on_console
from nh2st.datasets import get_dataset
from nh2st.errors import NH2STError
from nh2st.progress import console as stderr
from nh2st.splits import SPLITS, folds, folds_as_dict, missing_samples


def register(app: typer.Typer) -> None:
    @app.command("splits", cls=MultiValueCommand)
    def splits(
        dataset: str = typer.Option(..., "--dataset", "-d", help="stnet, skin, pcw, mouse, int, zen or demo"),
        split: str = typer.Option("paper", "--split", help=f"{' | '.join(SPLITS)}: the paper's folds, or "
                                  "patient-level folds where the paper splits one patient's slides"),
        data_root: Path | None = typer.Option(None, "--data-root", help="use the samples found in this download"),
        samples: list[str] | None = typer.Option(None, "--samples", help="sample ids to use (several after the flag, or comma-separated)"),
        as_json: bool = typer.Option(False, "--json", help='print {"0": {"train": [...], "test": [...]}, ...}'),
    ) -> None:
        """Show the cross-validation folds of a dataset (no data needed)."""
        spec = get_dataset(dataset)
        if data_root is not None and samples:
            raise NH2STError("give --data-root or --samples, not both")
        sample_ids = None
        if data_root is not None:
            sample_ids = spec.find_samples(data_root)
        elif samples:
            sample_ids = split_values(samples)
        with warnings_on_console():
            fold_list = folds(spec.name, sample_ids, split)
        if sample_ids is not None and spec.name != "demo":
            missing = missing_samples(spec.name, sample_ids)
            if missing:
                where = f"under {data_root}" if data_root is not None else "in --samples"
                stderr.print(f"[yellow]missing:[/] {len(missing)} of the paper's {spec.name} samples are not "
                             f"{where}: {', '.join(missing)}", highlight=False, soft_wrap=True)
        if as_json:
            typer.echo(json.dumps(folds_as_dict(fold_list), indent=2))
            return
        table = Table(title=f"{spec.name} folds ({split} split)")
        table.add_column("fold", justify="right")
        table.add_column("test", overflow="fold")
        table.add_column("#test", justify="right")
        table.add_column("train", overflow="fold")
        table.add_column("#train", justify="right")
        for f in fold_list:
            table.add_row(str(f.index), " ".join(f.test), str(len(f.test)), " ".join(f.train), str(len(f.train)))
        Console().print(table)
