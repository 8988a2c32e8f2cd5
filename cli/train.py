"""`nh2st train`: NH²2ST heads (or a baseline) on a store's folds; prints the per-fold test metrics."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.common import MultiValueCommand, fmt, split_values, warnings_on_console
from nh2st.progress import console as stderr
from nh2st.runs import MODEL_KINDS, PROTOCOLS


def results_table(results: list[dict], title: str = "test metrics") -> Table:
    """Per-fold test metrics as a rich table, with the mean over folds (and R released for the paper protocol)."""
    from nh2st.metrics import mean_std

    released = any(r.get("protocol") == "paper" for r in results)
    columns = [("R top-50", "R")] + ([("R released", "R_released")] if released else []) + \
        [("PCC", "pcc_mean"), ("HVG-50", "hvg50_pcc"), ("MSE", "mse"), ("MAE", "mae")]
    table = Table(title=title)
    table.add_column("fold", justify="right")
    table.add_column("test samples")
    for name, _ in columns:
        table.add_column(name, justify="right")
    table.add_column("best epoch", justify="right")
    table.add_column("selected on")
    for r in results:
        table.add_row(str(r["fold"]), " ".join(r["test_samples"]), *(fmt(r.get(key)) for _, key in columns),
                      str(r["best_epoch"]), r["selection_split"] + (" (already finished)" if r.get("skipped") else ""))
    if len(results) > 1:
        table.add_row("mean", "", *(fmt(mean_std([r.get(key) for r in results])["mean"]) for _, key in columns),
                      "", "", style="bold")
    table.caption = ("R top-50: mean of the 50 best per-gene PCCs (the paper's R); PCC: mean over all genes; "
                     "HVG-50: the 50 most variable training genes"
                     + ("; R released: the released code's computation (differs only with NaN genes)" if released else ""))
    return table


def register(app: typer.Typer) -> None:
    @app.command("train", cls=MultiValueCommand)
    def train(
        store: Path = typer.Option(..., "--store", help="embedding store from `nh2st extract`, e.g. stores/demo.zarr"),
        folds: list[str] = typer.Option(["all"], "--folds", help="'all' or fold indices: --folds 0 2"),
        split: str | None = typer.Option(None, "--split", help="fold scheme: paper (the dataset's published folds), "
                                         "patient, kfold:K or loo (default: the config's DATASET.fold_scheme)"),
        patients: Path | None = typer.Option(None, "--patients", help="CSV sample,patient for --split patient "
                                             "(default: the patient each reader recorded at extraction)"),
        gpus: list[str] | None = typer.Option(None, "--gpus", help="GPU ids; folds run concurrently, each GPU "
                                              "taking as many as its memory holds: --gpus 0 1 2"),
        config: Path | None = typer.Option(None, "--config", help="YAML config (default: configs/<dataset>.yaml)"),
        overrides: list[str] | None = typer.Option(None, "--set", help="override a key: --set TRAINING.num_epochs=50"),
        protocol: str = typer.Option("default", "--protocol", help=f"{' or '.join(PROTOCOLS)}: 'default' selects "
                                     "on validation slides carved from the training fold; 'paper' selects on the "
                                     "test fold, as the released code"),
        model: str = typer.Option("nh2st", "--model", help=f"{', '.join(MODEL_KINDS)}"),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="runs land in <runs-dir>/<store-name>/"),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (ignored with --gpus)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="retrain folds that already finished (each old "
                                       "result stays until its new one finishes)"),
        resume: bool = typer.Option(False, "--resume", help="continue interrupted or failed folds from their last "
                                    "saved epoch and skip finished ones"),
    ) -> None:
        """Train on cached features, fold by fold, and score each fold's test slides."""
        from nh2st.config import resolve_config
        from nh2st.store import EmbeddingStore
        from nh2st.training import train_folds

        opened = EmbeddingStore.open(store)
        cfg, path = resolve_config(opened.meta.dataset, config, overrides or [])
        stderr.print(f"config: {path or 'built-in defaults'}" + (f" with {', '.join(overrides)}" if overrides else ""),
                     highlight=False)
        patient_map = None
        if patients is not None:
            from nh2st.splits import read_patients
            patient_map = read_patients(patients)
        devices = [f"cuda:{g}" for g in split_values(gpus)] if gpus else [device]
        with warnings_on_console():
            results = train_folds(opened, split_values(folds) or ["all"], cfg, runs_dir, protocol, model, devices,
                                  split=split, patients=patient_map, overwrite=overwrite, resume=resume)
        scheme = split or cfg.DATASET.fold_scheme
        Console().print(results_table(results, title=f"{model} on {store} — test metrics ({protocol} protocol, "
                                                     f"{scheme} folds)"))
        stderr.print(f"runs written to {Path(results[0]['run_dir']).parent}", highlight=False)
