"""`nh2st eval` (score trained folds), `nh2st predict` (a new slide -> .h5ad), `nh2st plot` (PNGs per gene)."""

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.common import MultiValueCommand, fmt, split_values, warnings_on_console
from nh2st.errors import NH2STError
from nh2st.progress import console as stderr

METRIC_COLUMNS = (("R (top-50)", "R"), ("PCC (all genes)", "pcc_mean"), ("HVG-50 PCC", "hvg50_pcc"),
                  ("MSE", "mse"), ("MAE", "mae"))


def eval_table(result: dict) -> Table:
    """One row per model and fold, then mean ± std over folds per model."""
    table = Table(title=f"{result['run']}: test metrics (values in the run's log10 target space)")
    table.add_column("model", justify="left")
    table.add_column("fold", justify="right")
    table.add_column("test samples", justify="left")
    table.add_column("spots", justify="right")
    for name, _ in METRIC_COLUMNS:
        table.add_column(name, justify="right", overflow="fold")  # wrap "mean ± std" rather than cut it
    table.add_column("NaN genes", justify="right")
    for kind, entry in result["models"].items():
        for k, fold in entry["folds"].items():
            table.add_row(kind, str(k), " ".join(fold["test_samples"]), f"{fold['n_spots']:,}",
                          *(fmt(fold[key]) for _, key in METRIC_COLUMNS), str(fold["n_nan_genes"]))
        if len(entry["folds"]) > 1:
            cells = []
            for _, key in METRIC_COLUMNS:
                s = entry["summary"][key]
                cells.append("—" if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}")
            table.add_row(kind, "mean ± std", "", "", *cells, "", style="bold")
        table.add_section()
    if result.get("missing_folds"):
        table.caption = (f"[bold yellow]folds {', '.join(map(str, result['missing_folds']))} have not finished and "
                         "are left out of the means[/]")
    released = [(kind, k, f["R_released"]) for kind, e in result["models"].items() for k, f in e["folds"].items()
                if f.get("protocol") == "paper" and f.get("R_released") is not None and f["R_released"] != f["R"]]
    if released:
        shown = ", ".join(f"{kind} fold {k}: {value:.3f}" for kind, k, value in released)
        table.caption = (table.caption + "\n" if table.caption else "") + \
            f"R as the released code computes it (NaN genes scramble its top 50): {shown}"
    return table


def _parse_slides(values: list[str] | None) -> dict[str, Path]:
    out = {}
    for item in values or []:
        sample_id, sep, path = item.partition("=")
        if not sep or not sample_id or not path:
            raise NH2STError(f"--slide {item!r}: expected SAMPLE_ID=PATH, e.g. --slide ZEN42=data/HEST-1k/wsis/ZEN42.tif")
        out[sample_id] = Path(path)
    return out


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        store: Path | None = typer.Option(None, "--store", help="store to score on (default: the one the run "
                                          "was trained on); its genes and backbone must match the run's"),
        fold: str = typer.Option("all", "--fold", help="a fold index, or all (adds mean ± std over folds)"),
        run: Path | None = typer.Option(None, "--run", help="run folder runs/<store-name> or one fold folder "
                                        "(default: the most recent run under --runs-dir with the fold)"),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where to look for runs"),
        as_json: bool = typer.Option(False, "--json", help="print only the metrics JSON on stdout"),
        device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N"),
        allow_missing_folds: bool = typer.Option(False, "--allow-missing-folds", help="with --fold all, score the "
                                                 "finished folds when others have not finished (named in the output)"),
    ) -> None:
        """Score trained folds on their test samples (and the mean/ridge baselines trained beside them)."""
        from nh2st.evaluate import evaluate
        from nh2st.runs import resolve_run

        if fold != "all" and not fold.isdigit():
            raise NH2STError(f"--fold {fold!r}: give a fold index (0, 1, ...) or all")
        chosen = fold if fold == "all" else int(fold)
        run_dir, folds = resolve_run(run, chosen, runs_dir, allow_missing=allow_missing_folds)
        if run is None:
            which = "most recent run" if fold == "all" else f"most recent run with fold {fold}"
            stderr.print(f"using run {run_dir} ({which})", highlight=False)
        result = evaluate(run_dir, folds if chosen != "all" else "all", store=store, runs_root=runs_dir,
                          device=device, show_progress=not as_json, allow_missing_folds=allow_missing_folds)
        if result.get("missing_folds"):
            stderr.print(f"[yellow]warning:[/] folds {', '.join(map(str, result['missing_folds']))} of {run_dir} have "
                         "not finished; the means cover the others only", highlight=False)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        Console().print(eval_table(result))
        written = ([f"{run_dir}/metrics.json"] if chosen == "all" else []) + [r["run_dir"] + "/{metrics.json,predictions.zarr}"
                                                for e in result["models"].values() for r in e["folds"].values()]
        stderr.print("written: " + ", ".join(written), highlight=False, soft_wrap=True)

    @app.command("predict")
    def predict(
        run: Path = typer.Option(..., "--run", help="run folder runs/<store-name> (or one fold folder)"),
        wsi: Path = typer.Option(..., "--wsi", help="the slide: pyramidal TIFF, SVS, NDPI, SCN, JPEG or PNG"),
        spots: Path = typer.Option(..., "--spots", help="Space Ranger's tissue_positions.csv / tissue_positions_list.csv, "
                                   "a CSV or tab-separated file with barcode, x, y (full-resolution pixels, x = "
                                   "column), or a Space Ranger / HEST .h5ad"),
        mpp: float | None = typer.Option(None, "--mpp", help="level-0 µm per pixel of the slide when its file "
                                         "records none (runs on visium/hest stores crop the paper's 112 µm field)"),
        out: Path = typer.Option(..., "--out", help="output .h5ad"),
        fold: int | None = typer.Option(None, "--fold", help="predict with this fold only"),
        ensemble: bool = typer.Option(False, "--ensemble", help="mean of all folds of the run (the default "
                                      "without --fold)"),
        allow_missing_folds: bool = typer.Option(False, "--allow-missing-folds", help="average the finished folds "
                                                 "when others have not finished (a warning names them)"),
        weights: str | None = typer.Option(None, "--weights", help="the backbone checkpoint PATH the run's store was "
                                           "made with, or random / random:seed=N (checked by sha256)"),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N"),
        batch_size: int | None = typer.Option(None, "--batch-size", help="patches per forward pass"),
    ) -> None:
        """Predict expression for the spots of a slide with no expression; writes an AnnData .h5ad."""
        from nh2st.predict import predict_slide

        with warnings_on_console():
            summary = predict_slide(run, wsi, spots, out, fold=fold, ensemble=ensemble, weights=weights,
                                    device=device, batch_size=batch_size, allow_missing_folds=allow_missing_folds,
                                    mpp=mpp)
        folds = ", ".join(map(str, summary["folds"]))
        stderr.print(f"{summary['out']}: {summary['n_spots']:,} spots x {summary['n_genes']} genes, "
                     f"{summary['model_kind']} fold{'s' if len(summary['folds']) > 1 else ''} {folds}"
                     f"{' (mean)' if len(summary['folds']) > 1 else ''}; values are normalised log10 "
                     "expression (the run's targets), not counts", highlight=False, soft_wrap=True)

    @app.command("plot", cls=MultiValueCommand)
    def plot(
        run: Path | None = typer.Option(None, "--run", help="run folder runs/<store-name> or one fold folder "
                                        "(default: the most recent run with the fold)"),
        predictions: Path | None = typer.Option(None, "--predictions", help="the .h5ad of `nh2st predict`: draw its "
                                                "predicted maps (a new slide, no ground truth) instead of a fold"),
        fold: int | None = typer.Option(None, "--fold", help="fold to draw (needed with a run folder of several folds)"),
        genes: list[str] | None = typer.Option(None, "--genes", help="genes to draw (repeat or separate by commas)"),
        top: int | None = typer.Option(None, "--top", help="also draw the N best-predicted genes (with --predictions: "
                                       "the N most varying predictions; default 4 without --genes)"),
        out: Path = typer.Option(Path("plots"), "--out", help="folder for the PNGs"),
        store: Path | None = typer.Option(None, "--store", help="store to use if the run's has moved"),
        sample: list[str] | None = typer.Option(None, "--sample", help="only these test samples"),
        slide: list[str] | None = typer.Option(None, "--slide", help="SAMPLE_ID=PATH: draw on this slide's "
                                               "thumbnail (default: the thumbnail stored by extract)"),
        runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where to look for runs"),
        device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N (if it must evaluate first)"),
    ) -> None:
        """Draw true and predicted expression side by side on the slide (or predictions alone), one PNG per gene."""
        if predictions is not None:
            given = [flag for flag, value in (("--run", run), ("--fold", fold), ("--store", store), ("--sample", sample),
                                              ("--slide", slide)) if value not in (None, [])]
            if given:
                raise NH2STError(f"--predictions draws its own .h5ad; drop {', '.join(given)}")
            from nh2st.plots import plot_predictions

            for path in plot_predictions(predictions, split_values(genes) or None, top, out):
                Console().print(str(path), highlight=False, soft_wrap=True)
            return
        from nh2st.plots import plot_fold
        from nh2st.runs import resolve_run

        run_dir, folds = resolve_run(run, "all" if fold is None else fold, runs_dir, allow_missing=fold is None)
        if len(folds) > 1:
            raise NH2STError(f"{run_dir} has folds {', '.join(map(str, folds))}; pick one with --fold")
        if run is None:
            stderr.print(f"using run {run_dir}", highlight=False)
        thumbnails = {}
        if slide:
            from nh2st.slide import open_slide  # the CLI may read a slide; stage two itself never does
            for sample_id, path in _parse_slides(slide).items():
                with open_slide(path) as opened:
                    thumbnails[sample_id] = opened.thumbnail()
        paths = plot_fold(run_dir / f"fold-{folds[0]}", split_values(genes) or None, top, out, store, thumbnails,
                          split_values(sample) or None, device)
        for path in paths:
            Console().print(str(path), highlight=False, soft_wrap=True)
