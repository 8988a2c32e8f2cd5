"""Expression drawn as spots on the slide: true and predicted side by side, or predicted alone.

`plot_fold` draws a trained fold's test samples, one PNG per gene: a row per sample, truth on the
left, prediction on the right. All panels of a figure share one colour scale (the range of truth
and prediction together) and one colour bar labelled with the value space, so a prediction that is
off in level or compressed toward the mean shows as such; each row's title gives that slide's PCC
and MSE, the figure's title the PCC and MSE over all spots of the named test samples.

`plot_predictions` draws the `.h5ad` of `nh2st predict` (a new slide, no ground truth): one panel
per gene with its colour bar.

Spots sit at their level-0 pixel centres over the slide's thumbnail when one is known (stored by
extraction, passed by the caller, or in the h5ad), else on a blank background. Values are in the
run's space (normalised, log10, grid-smoothed), not counts.
"""

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import EllipseCollection  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from nh2st.errors import NH2STError  # noqa: E402
from nh2st.metrics import mse_per_gene, pcc_per_gene, top_k_indices  # noqa: E402

DEFAULT_TOP = 4
VALUE_LABEL = "log10(1 + 10,000 x count / spot total over the run's genes), grid-smoothed"


@dataclass
class SamplePanel:
    """What one row of a figure needs: a sample's spots, truth and prediction (N, G)."""

    sample_id: str
    pixel_xy: np.ndarray              # (N, 2) level-0 x (column), y (row)
    targets: np.ndarray               # (N, G)
    predictions: np.ndarray           # (N, G)
    thumbnail: np.ndarray | None = None   # (h, w, 3) uint8
    thumbnail_scale: float = 1.0          # thumbnail px per level-0 px


def resolve_genes(genes: list[str], pcc: np.ndarray, requested: list[str] | None = None,
                  top: int | None = None, ranked_by: str = "PCC") -> list[str]:
    """The genes to draw: `requested` in order, then the `top` best by `pcc` (pooled PCC, or another
    score named by `ranked_by`) not already listed.

    With neither given, the DEFAULT_TOP best. An unknown requested gene is an NH2STError that
    lists the closest names of the run's gene list.
    """
    chosen: list[str] = []
    index = {g: i for i, g in enumerate(genes)}
    for gene in requested or []:
        if gene not in index:
            lowered = gene.lower()
            close = [g for g in genes if g.lower() == lowered] + [g for g in genes if g.lower().startswith(lowered)]
            close += difflib.get_close_matches(gene, genes, n=5, cutoff=0.5)
            close = list(dict.fromkeys(close))[:5]
            hint = f"close matches: {', '.join(close)}" if close else "no close match; see the run's genes in run.json"
            raise NH2STError(f"--genes: {gene!r} is not one of the run's {len(genes)} genes ({hint})")
        if gene not in chosen:
            chosen.append(gene)
    if top is None and not requested:
        top = DEFAULT_TOP
    if top:
        if top < 0:
            raise NH2STError(f"--top {top}: must be a positive number of genes")
        best = [genes[i] for i in top_k_indices(pcc, len(genes))]
        chosen += [g for g in best if g not in chosen][:top]
    if not chosen:
        raise NH2STError(f"no gene to plot: every gene has an undefined {ranked_by} (constant values); "
                         "name genes with --genes")
    return chosen


def _spot_diameter(xy: np.ndarray) -> float:
    """80 % of the median nearest-neighbour distance (level-0 px), so neighbouring spots do not overlap."""
    if len(xy) < 2:
        return 50.0
    dist, _ = cKDTree(xy).query(xy, k=2)
    d = float(np.median(dist[:, 1]))
    return 0.8 * d if d > 0 else 50.0


def _value_range(*values: np.ndarray) -> tuple[float, float]:
    """(low, high) over all finite values; a constant gene gets a tiny span so the colour map is defined."""
    finite = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values])
    finite = finite[np.isfinite(finite)]
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    return (low, high) if high > low else (low, low + 1e-6)


def _draw_panel(ax, xy: np.ndarray, values: np.ndarray, diameter: float, title: str, value_range,
                thumbnail: np.ndarray | None = None, thumbnail_scale: float = 1.0) -> EllipseCollection:
    """Spots coloured by `values` on the common `value_range`; returns the collection (for a colour bar)."""
    margin = diameter * 1.5
    x0, x1 = xy[:, 0].min() - margin, xy[:, 0].max() + margin
    y0, y1 = xy[:, 1].min() - margin, xy[:, 1].max() + margin
    if thumbnail is not None:
        h, w = thumbnail.shape[:2]
        ax.imshow(thumbnail, extent=(0, w / thumbnail_scale, h / thumbnail_scale, 0), interpolation="bilinear")
    spots = EllipseCollection(widths=diameter, heights=diameter, angles=0, units="xy", offsets=xy,
                              offset_transform=ax.transData, cmap="viridis", edgecolors="none")
    spots.set_array(np.asarray(values, dtype=np.float64))
    spots.set_clim(*value_range)
    ax.add_collection(spots)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image rows grow downward
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return spots


def _fmt(value: float, undefined: str = "undefined") -> str:
    return f"{value:.3f}" if value is not None and np.isfinite(value) else undefined


def gene_figure(gene: str, gene_index: int, panels: list[SamplePanel]):
    """A row per sample, truth | prediction of `gene` on one colour scale; PCC and MSE per slide and pooled."""
    true = [p.targets[:, gene_index] for p in panels]
    pred = [p.predictions[:, gene_index] for p in panels]
    value_range = _value_range(*true, *pred)
    fig, axes = plt.subplots(len(panels), 2, figsize=(9.5, 4.2 * len(panels) + 0.6), squeeze=False,
                             layout="constrained")
    spots = None
    for row, panel, t, p in zip(axes, panels, true, pred):
        r = pcc_per_gene(p[:, None], t[:, None])[0]
        mse = float(mse_per_gene(p[:, None], t[:, None])[0])
        diameter = _spot_diameter(panel.pixel_xy)
        images = (panel.thumbnail, panel.thumbnail_scale)
        _draw_panel(row[0], panel.pixel_xy, t, diameter, f"{panel.sample_id}: true", value_range, *images)
        spots = _draw_panel(row[1], panel.pixel_xy, p, diameter,
                            f"{panel.sample_id}: predicted, PCC {_fmt(r, 'undefined (constant)')}, MSE {mse:.3f}\n"
                            f"(this slide's {len(t):,} spots)", value_range, *images)
    all_true, all_pred = np.concatenate(true), np.concatenate(pred)
    pooled_r = pcc_per_gene(all_pred[:, None], all_true[:, None])[0]
    pooled_mse = float(mse_per_gene(all_pred[:, None], all_true[:, None])[0])
    names = ", ".join(p.sample_id for p in panels)
    fig.suptitle(f"{gene}: PCC {_fmt(pooled_r)}, MSE {pooled_mse:.3f} over all {len(all_true):,} spots of "
                 f"test sample{'s' if len(panels) > 1 else ''} {names}", fontsize=11)
    bar = fig.colorbar(spots, ax=axes.ravel().tolist(), shrink=min(1.0, 0.5 + 0.25 * len(panels)), pad=0.02)
    bar.set_label(f"{gene}: {VALUE_LABEL} (truth and prediction on one scale)", fontsize=8)
    return fig


def _save(fig, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_gene(gene: str, gene_index: int, panels: list[SamplePanel], out_path: Path) -> Path:
    """One PNG of :func:`gene_figure`."""
    return _save(gene_figure(gene, gene_index, panels), out_path)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plot_panels(panels: list[SamplePanel], genes: list[str], out_dir: str | Path, prefix: str = "",
                requested: list[str] | None = None, top: int | None = None) -> list[Path]:
    """Draw the chosen genes (see :func:`resolve_genes`) for `panels`; returns the PNG paths written.

    The pooled PCC (all panels' spots together) ranks genes for `top`.
    """
    if not panels:
        raise NH2STError("nothing to plot: no samples with predictions")
    pred = np.concatenate([p.predictions for p in panels])
    true = np.concatenate([p.targets for p in panels])
    pcc = pcc_per_gene(pred, true)
    chosen = resolve_genes(genes, pcc, requested, top)
    index = {g: i for i, g in enumerate(genes)}
    out_dir = Path(out_dir)
    paths = []
    for gene in chosen:
        paths.append(plot_gene(gene, index[gene], panels, out_dir / f"{prefix}{safe_name(gene)}.png"))
    return paths


def plot_fold(fold_dir, genes: list[str] | None = None, top: int | None = None, out_dir="plots",
              store=None, thumbnails: dict | None = None, samples: list[str] | None = None,
              device="cpu") -> list[Path]:
    """PNGs of a trained fold's test predictions (evaluated first if predictions.zarr is missing or stale).

    thumbnails: {sample id: (image, thumbnail px per level-0 px)} overriding the store's; by default
    the thumbnails extraction stored, when the run's store is still there. samples: restrict rows.
    Files are <out_dir>/<run name>_fold-<k>_<gene>.png.
    """
    from nh2st.evaluate import PREDICTIONS, evaluate_fold, load_predictions, open_run_store
    from nh2st.runs import read_info

    fold_dir = Path(fold_dir)
    predictions = fold_dir / PREDICTIONS
    if not (predictions / "zarr.json").is_file() or \
            predictions.stat().st_mtime < (fold_dir / "checkpoint.pt").stat().st_mtime:
        evaluate_fold(fold_dir, store, device)
    attrs, arrays = load_predictions(fold_dir)
    if samples:
        unknown = [s for s in samples if s not in arrays]
        if unknown:
            raise NH2STError(f"--sample {', '.join(unknown)}: not a test sample of {fold_dir} "
                             f"(test samples: {', '.join(arrays)})")
        arrays = {s: arrays[s] for s in samples}
    thumbnails = dict(thumbnails or {})
    try:
        opened = open_run_store(read_info(fold_dir).to_dict(), fold_dir, store)
    except NH2STError:
        opened = None  # the store is only needed for backgrounds; spots still draw on white
    if opened is not None:
        for sample_id in arrays:
            if sample_id not in thumbnails and opened.is_complete(sample_id):
                found = opened.thumbnail(sample_id)
                if found is not None:
                    thumbnails[sample_id] = found
    panels = [SamplePanel(sid, a["pixel_xy"], a["targets"], a["predictions"],
                          *(thumbnails[sid] if sid in thumbnails else (None, 1.0)))
              for sid, a in arrays.items()]
    prefix = f"{safe_name(fold_dir.parent.name)}_{fold_dir.name}_"
    return plot_panels(panels, list(attrs["genes"]), out_dir, prefix, genes, top)


def read_predictions(path) -> dict:
    """The .h5ad of `nh2st predict`: genes, predictions (N, G), pixel_xy (N, 2), thumbnail, provenance."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise NH2STError(f"--predictions {path}: file not found; write it with `nh2st predict --out {path.name}`")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types on damaged files
        raise NH2STError(f"{path}: not a readable .h5ad ({type(exc).__name__}: {exc}); write it again with nh2st predict") from None
    if "spatial" not in adata.obsm:
        raise NH2STError(f"{path}: no spot centres (obsm['spatial']); give the .h5ad written by `nh2st predict`")
    thumbnail, scale, library = None, 1.0, path.stem
    for name, entry in dict(adata.uns.get("spatial", {})).items():
        images, factors = entry.get("images", {}), entry.get("scalefactors", {})
        if "hires" in images and "tissue_hires_scalef" in factors:
            thumbnail, scale, library = np.asarray(images["hires"]), float(factors["tissue_hires_scalef"]), name
            break
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return {"genes": list(map(str, adata.var_names)), "predictions": X.astype(np.float32),
            "pixel_xy": np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2], "thumbnail": thumbnail,
            "thumbnail_scale": scale, "library": library, "provenance": dict(adata.uns.get("nh2st", {}))}


def prediction_figure(gene: str, values: np.ndarray, pixel_xy: np.ndarray, library: str, provenance: dict,
                      thumbnail=None, thumbnail_scale: float = 1.0):
    """One panel: the predicted map of `gene` on a slide without ground truth, with its colour bar."""
    fig, ax = plt.subplots(figsize=(6.5, 5.6), layout="constrained")
    folds = provenance.get("folds")
    folds = ", ".join(map(str, np.atleast_1d(folds))) if folds is not None else "?"
    kind = provenance.get("model_kind", "model")
    spots = _draw_panel(ax, pixel_xy, values, _spot_diameter(pixel_xy),
                        f"{library}: predicted {gene} ({len(values):,} spots, no ground truth)\n"
                        f"{kind}, fold(s) {folds}", _value_range(values), thumbnail, thumbnail_scale)
    bar = fig.colorbar(spots, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(f"{gene}: predicted {VALUE_LABEL}", fontsize=8)
    return fig


def plot_predictions(path, genes: list[str] | None = None, top: int | None = None, out_dir="plots") -> list[Path]:
    """PNGs of the predicted maps in an `nh2st predict` .h5ad: `genes` in order, then the `top` genes whose
    predictions vary most over the slide (default: DEFAULT_TOP of them). Files are <out_dir>/<h5ad stem>_<gene>.png."""
    data = read_predictions(path)
    values = data["predictions"]
    spread = np.where(np.isfinite(values).all(axis=0), values.var(axis=0), np.nan)
    spread[spread == 0] = np.nan
    chosen = resolve_genes(data["genes"], spread, genes, top, ranked_by="spread of predictions")
    index = {g: i for i, g in enumerate(data["genes"])}
    out_dir = Path(out_dir)
    return [_save(prediction_figure(gene, values[:, index[gene]], data["pixel_xy"], data["library"],
                                    data["provenance"], data["thumbnail"], data["thumbnail_scale"]),
                  out_dir / f"{safe_name(Path(path).stem)}_{safe_name(gene)}.png")
            for gene in chosen]
