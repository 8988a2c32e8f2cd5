"""`nh2st splits`: each fold's train/test sample ids, as a rich table or JSON."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.common import MultiValueCommand, split_values, warnings_on_console
from nh2st.errors import NH2STError
from nh2st.progress import console as stderr
from nh2st.splits import (DEFAULT_SEED, SPLITS, folds, folds_as_dict, missing_samples, parse_split,
                          patients_from_store, read_patients)


def register(app: typer.Typer) -> None:
    @app.command("splits", cls=MultiValueCommand)
    def splits(
        dataset: str | None = typer.Option(None, "--dataset", "-d", help="stnet, skin, pcw, mouse, int, zen, demo, "
                                           "visium or hest (default with --store: the store's)"),
        split: str = typer.Option("paper", "--split", help=f"{' | '.join(SPLITS)}: the paper's folds; leave one "
                                  "patient out (or K folds of whole patients); K folds over samples; one per sample"),
        store: Path | None = typer.Option(None, "--store", help="use the samples (and the patients readers "
                                          "recorded) of this embedding store"),
        data_root: Path | None = typer.Option(None, "--data-root", help="use the samples found in this download"),
        samples: list[str] | None = typer.Option(None, "--samples", help="sample ids to use (several after the flag, or comma-separated)"),
        patients: Path | None = typer.Option(None, "--patients", help="CSV with columns sample,patient for "
                                             "--split patient (default: the patients recorded in --store)"),
        seed: int = typer.Option(DEFAULT_SEED, "--seed", help="shuffle seed of --split kfold:K"),
        as_json: bool = typer.Option(False, "--json", help='print {"0": {"train": [...], "test": [...]}, ...}'),
    ) -> None:
        """Show the cross-validation folds of a dataset or a store (the paper's need no data)."""
        from nh2st.datasets import get_dataset

        if sum(x is not None and x != [] for x in (store, data_root, samples)) > 1:
            raise NH2STError("give one of --store, --data-root or --samples")
        kind, k = parse_split(split)
        sample_ids, patient_map, source = None, None, "the patient list"
        if store is not None:
            from nh2st.store import EmbeddingStore

            opened = EmbeddingStore.open(store)
            dataset = dataset or opened.meta.dataset
            sample_ids = opened.sample_ids()
            patient_map, source = patients_from_store(opened) or None, f"{store} (patients its readers recorded)"
        if dataset is None:
            raise NH2STError("give --dataset (or --store to take the dataset and samples from a store)")
        spec = get_dataset(dataset)
        if data_root is not None:
            sample_ids = spec.find_samples(data_root)
        elif samples:
            sample_ids = split_values(samples)
        if patients is not None:
            patient_map, source = read_patients(patients), str(patients)
        with warnings_on_console():
            fold_list = folds(spec.name, sample_ids, split, patients=patient_map, seed=seed, patients_source=source)
        if sample_ids is not None and spec.paper and spec.name != "demo" and kind in ("paper", "patient") and k is None:
            missing = missing_samples(spec.name, sample_ids)
            if missing:
                where = f"under {data_root}" if data_root is not None else f"in {store}" if store else "in --samples"
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
