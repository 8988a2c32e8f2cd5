"""`nh2st extract` (stage one: slides -> embedding store) and `nh2st info` (what a store holds)."""

import datetime
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cli.common import MultiValueCommand, split_values, warnings_on_console
from nh2st.progress import console as stderr


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def _patch_field(patch: dict | None) -> str:
    """How a sample's 224-px patches were cut, from the rule extraction recorded."""
    if not patch:
        return "native"
    mpp = f" at {patch['slide_mpp']:g} µm/px" if patch.get("slide_mpp") else ""
    if patch.get("rule") == "rescaled":
        return f"{patch['field_px']} px{mpp} -> {patch['patch_size']} px"
    return f"native{mpp}"


def register(app: typer.Typer) -> None:
    @app.command("extract", cls=MultiValueCommand)
    def extract(
        dataset: str = typer.Option(..., "--dataset", "-d", help="demo, zen, int, stnet, skin, pcw, mouse; or your "
                                    "own: visium (Space Ranger outs/ folders), hest (any HEST-1k ids)"),
        data_root: Path | None = typer.Option(None, "--data-root", help="where the dataset lives (default: data/...)"),
        store: Path | None = typer.Option(None, "--store", help="store to build (default: stores/<dataset>.zarr)"),
        weights: str | None = typer.Option(None, "--weights", help="checkpoint PATH, or 'random' / 'random:seed=N' "
                                           "(default: weights/tenpercent_resnet18.ckpt; random for the demo)"),
        samples: list[str] | None = typer.Option(None, "--samples", help="sample ids to extract instead of the "
                                                 "dataset's list (repeat the flag or separate by commas)"),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (with --scheduler: on "
                                   "every worker; ignored with --gpus)"),
        batch_size: int | None = typer.Option(None, "--batch-size", help="patches per forward pass "
                                              "(default 256 on CUDA, 64 on CPU)"),
        workers: int | None = typer.Option(None, "--workers", help="threads cropping patches ahead of each encoder"),
        gpus: list[str] | None = typer.Option(None, "--gpus", help="GPU ids; one encoder per GPU on disjoint samples, "
                                              "each in a dask worker process: --gpus 0 1 2 3"),
        scheduler: str | None = typer.Option(None, "--scheduler", help="dask.distributed scheduler ADDRESS "
                                             "(tcp://host:8786): one task per sample on its workers, which must "
                                             "see the data, weights and store at the same paths"),
        overwrite: bool = typer.Option(False, "--overwrite", help="rebuild a store made with other weights/genes"),
        allow_missing_genes: bool = typer.Option(False, "--allow-missing-genes",
                                                 help="fill genes absent from a sample with zeros (warns)"),
        genes: str | None = typer.Option(None, "--genes", help="FILE (one symbol a line), hvg:N or heg:N (the N most "
                                         "variable / expressed genes of the samples); default: the paper's list"),
        image_dir: Path | None = typer.Option(None, "--image-dir", help="visium: folder of full-resolution images "
                                              "named <sample>.<ext> (default: the image next to each outs/)"),
        mpp: float | None = typer.Option(None, "--mpp", help="visium/hest: level-0 µm per pixel of the slides "
                                         "(default: read from each image file)"),
        views: int = typer.Option(1, "--views", help="dihedral views of each patch to encode: 1, 4 (rotations) or "
                                  "8 (rotations and mirror images); training draws one per target spot per epoch "
                                  "(the released code's flips and rotations), at 4x or 8x the encoder's work"),
        verbose: bool = typer.Option(False, "--verbose", "-v", help="log each sample to stderr"),
    ) -> None:
        """Encode every spot's patch once with the frozen ResNet18 into a resumable Zarr store."""
        from nh2st.extract import run_extract

        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
        with warnings_on_console():
            summary = run_extract(dataset, data_root=data_root, store_path=store, weights=weights,
                                  samples=(split_values(samples) or None), device=device, batch_size=batch_size,
                                  overwrite=overwrite, allow_missing_genes=allow_missing_genes, workers=workers,
                                  genes=genes, image_dir=image_dir, mpp=mpp,
                                  devices=[f"cuda:{g}" for g in split_values(gpus)] or None, scheduler=scheduler,
                                  views=views)
        if summary["up_to_date"]:
            stderr.print(f"{summary['store']}: up to date, all {summary['n_skipped']} samples already "
                         "extracted; nothing to do", highlight=False)
            return
        table = Table(title=f"{summary['dataset']} -> {summary['store']}")
        several = len({row.get("device") for row in summary["samples"] if row["status"] == "extracted"}) > 1
        columns = [("sample", "left"), ("status", "left")] + ([("device", "left")] if several else []) + \
                  [("spots", "right"), ("seconds", "right"), ("spots/s", "right")]
        for name, justify in columns:
            table.add_column(name, justify=justify)
        for row in summary["samples"]:
            extracted = row["status"] == "extracted"
            status = f"being written by {row['holder']}" if row["status"] == "claimed" else row["status"]
            table.add_row(row["id"], status, *([row.get("device", "")] if several else []),
                          f"{row['n_spots']:,}" if row["n_spots"] is not None else "",
                          f"{row['seconds']:.1f}" if extracted else "", f"{row['patches_per_s']:.0f}" if extracted else "")
        if summary["spots_extracted"]:
            rate = summary["patches_per_s"] or 0
            per_spot = f" ({summary['views']} views each)" if summary.get("views", 1) > 1 else ""
            table.caption = (f"{summary['spots_extracted']:,} spots{per_spot} at {rate:.0f} spots/s on "
                             f"{summary['device']} ({summary['precision']}), weights {summary['weights']}; "
                             f"store {_size(summary['store_bytes'])}")
        Console().print(table)

    @app.command("info")
    def info(store: Path = typer.Argument(..., help="an embedding store, e.g. stores/zen.zarr")) -> None:
        """Summarise a store: what produced it, its samples, spots and size on disk."""
        from nh2st.extract import describe_store

        d = describe_store(store)
        attrs = d["attributes"]
        head = Table(title=str(store), show_header=False)
        head.add_column("key", style="bold")
        head.add_column("value", overflow="fold")
        genes = attrs.get("genes", [])
        for key, value in (
            ("dataset", attrs.get("dataset")),
            ("backbone", attrs.get("backbone")),
            ("weights", attrs.get("weights")),
            ("weights sha256", attrs.get("weights_sha256")),
            ("patch size", attrs.get("patch_size")),
            ("feature shape", "x".join(map(str, attrs.get("feature_shape", [])))),
            ("neighbours k", attrs.get("neighbors_k")),
            ("views per patch", attrs.get("views", 1)),
            ("genes", f"{len(genes)} ({', '.join(genes[:5])}{', ...' if len(genes) > 5 else ''})"),
            ("genes chosen", attrs.get("gene_selection", {}).get("how", "not recorded (the dataset's shipped list)")),
            ("normalisation", ", ".join(f"{k}: {v}" for k, v in attrs.get("normalisation", {}).items())),
            ("format version", attrs.get("format_version")),
            ("created", f"{attrs.get('created_at', '?')} by {attrs.get('created_by', '?')}"),
            ("samples", f"{d['complete_samples']} complete of {len(d['samples'])}"),
            ("spots", f"{d['spots']:,}"),
            ("on disk", _size(d["bytes"])),
        ):
            head.add_row(key, str(value))
        table = Table(title="samples")
        for name, justify in (("sample", "left"), ("spots", "right"), ("complete", "left"),
                              ("completed at", "left"), ("patch field", "left"), ("on disk", "right")):
            table.add_column(name, justify=justify)
        for s in d["samples"]:
            when = (datetime.datetime.fromtimestamp(s["completed_at"]).strftime("%Y-%m-%d %H:%M:%S")
                    if s["completed_at"] else "")
            complete = ("yes" if s["complete"] else f"[yellow]no (being written by {s['writer']})[/]" if s["writer"]
                        else "[red]no (half-written)[/]")
            table.add_row(s["id"], f"{s['n_spots']:,}", complete, when, _patch_field(s.get("patch")), _size(s["bytes"]))
        out = Console()
        out.print(head)
        out.print(table)
