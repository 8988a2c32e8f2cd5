"""True and predicted expression drawn as spots, side by side, one PNG per gene.

Each figure has one row per test sample: truth on the left, prediction on the right, spots at
their level-0 pixel centres over the sample's slide thumbnail when one is known (stored by
extraction, or passed by the caller), else on a blank background. Every panel has its own colour
scale and colour bar: PCC is scale-free, and predictions are usually compressed toward the mean,
so a shared scale would hide their pattern. Values are in the run's space (normalised, log10,
grid-smoothed), not counts.
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
from nh2st.metrics import pcc_per_gene, top_k_indices  # noqa: E402

DEFAULT_TOP = 4


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
                  top: int | None = None) -> list[str]:
    """The genes to draw: `requested` in order, then the `top` best by pooled PCC not already listed.

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
        raise NH2STError("no gene to plot: every gene has an undefined PCC (constant truth or prediction); "
                         "name genes with --genes")
    return chosen


def _spot_diameter(xy: np.ndarray) -> float:
    """80 % of the median nearest-neighbour distance (level-0 px), so neighbouring spots do not overlap."""
    if len(xy) < 2:
        return 50.0
    dist, _ = cKDTree(xy).query(xy, k=2)
    d = float(np.median(dist[:, 1]))
    return 0.8 * d if d > 0 else 50.0


def _draw_panel(ax, fig, panel: SamplePanel, values: np.ndarray, diameter: float, title: str) -> None:
    xy = panel.pixel_xy
    margin = diameter * 1.5
    x0, x1 = xy[:, 0].min() - margin, xy[:, 0].max() + margin
    y0, y1 = xy[:, 1].min() - margin, xy[:, 1].max() + margin
    if panel.thumbnail is not None:
        h, w = panel.thumbnail.shape[:2]
        s = panel.thumbnail_scale
        ax.imshow(panel.thumbnail, extent=(0, w / s, h / s, 0), interpolation="bilinear")
    spots = EllipseCollection(widths=diameter, heights=diameter, angles=0, units="xy", offsets=xy,
                              offset_transform=ax.transData, cmap="viridis", edgecolors="none")
    spots.set_array(np.asarray(values, dtype=np.float64))
    ax.add_collection(spots)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image rows grow downward
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.colorbar(spots, ax=ax, fraction=0.046, pad=0.02)


def plot_gene(gene: str, gene_index: int, panels: list[SamplePanel], pooled_pcc: float | None,
              out_path: Path) -> Path:
    """One PNG: a row per sample, truth | prediction of `gene`, slide PCC in each row's title."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 4.2 * len(panels)), squeeze=False)
    for row, panel in zip(axes, panels):
        true = panel.targets[:, gene_index]
        pred = panel.predictions[:, gene_index]
        r = pcc_per_gene(pred[:, None], true[:, None])[0]
        r_text = "undefined (constant)" if not np.isfinite(r) else f"{r:.3f}"
        diameter = _spot_diameter(panel.pixel_xy)
        _draw_panel(row[0], fig, panel, true, diameter, f"{panel.sample_id}: true {gene}")
        _draw_panel(row[1], fig, panel, pred, diameter, f"{panel.sample_id}: predicted {gene}, PCC {r_text}")
    pooled = "undefined" if pooled_pcc is None or not np.isfinite(pooled_pcc) else f"{pooled_pcc:.3f}"
    fig.suptitle(f"{gene}  (PCC over all test spots: {pooled})", fontsize=12)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def plot_panels(panels: list[SamplePanel], genes: list[str], out_dir: str | Path, prefix: str = "",
                requested: list[str] | None = None, top: int | None = None) -> list[Path]:
    """Draw the chosen genes (see :func:`resolve_genes`) for `panels`; returns the PNG paths written.

    The pooled PCC (all panels' spots together) ranks genes for `top` and heads each figure.
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
        i = index[gene]
        paths.append(plot_gene(gene, i, panels, float(pcc[i]), out_dir / f"{prefix}{safe_name(gene)}.png"))
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
