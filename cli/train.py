"""`nh2st train`: NH²2ST heads (or a baseline) on a store's folds; prints the per-fold test metrics."""

from pathlib import Path

import typer
from rich.console import Console

from cli.common import MultiValueCommand, split_values, warnings_on_console
from nh2st.progress import console as stderr
from nh2st.training import MODEL_KINDS, PROTOCOLS, resolve_config, results_table, train_folds

def register(app: typer.Typer) -> None:
    @app.command("train", cls=MultiValueCommand)
    def train(
        store: Path = typer.Option(..., "--store", help="embedding store from `nh2st extract`, e.g. stores/demo.zarr"),
        folds: list[str] = typer.Option(["all"], "--folds", help="'all' or fold indices: --folds 0 2"),
        gpus: list[str] | None = typer.Option(None, "--gpus", help="GPU ids; folds run concurrently, one process "
                                              "per GPU: --gpus 0 1 2"),
        config: Path | None = typer.Option(None, "--config", help="YAML config (default: configs/<dataset>.yaml)"),
        overrides: list[str] | None = typer.Option(None, "--set", help="override a key: --set TRAINING.num_epochs=50"),
        protocol: str = typer.Option("default", "--protocol", help=f"{' or '.join(PROTOCOLS)}: 'default' selects "
                                     "on validation slides carved from the training fold; 'paper' selects on the "
                                     "test fold, as the released code"),
        model: str = typer.Option("nh2st", "--model", help=f"{', '.join(MODEL_KINDS)}"),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="runs land in <runs-dir>/<store-name>/"),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (ignored with --gpus)"),
    ) -> None:
        """Train on cached features, fold by fold, and score each fold's test slides."""
        cfg, path = resolve_config(store, config, overrides or [])
        stderr.print(f"config: {path or 'built-in defaults'}" + (f" with {', '.join(overrides)}" if overrides else ""),
                     highlight=False)
        devices = [f"cuda:{g}" for g in split_values(gpus)] if gpus else [device]
        with warnings_on_console():
            results = train_folds(store, split_values(folds) or ["all"], cfg, runs_dir, protocol, model, devices)
        title = f"{model} on {store} — test metrics ({protocol} protocol)"
        Console().print(results_table(results, title=title))
        stderr.print(f"runs written to {Path(results[0]['run_dir']).parent}", highlight=False)
