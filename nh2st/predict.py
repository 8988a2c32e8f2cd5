"""Predict expression on a new slide that has no expression: `nh2st predict`.

    predict_slide("runs/zen", "my_slide.tif", "my_spots.csv", "my_slide_pred.h5ad")

Spot centres come from (told apart by content):
- Space Ranger's positions file, either version: `tissue_positions.csv` (>= 2.0, header) or
  `tissue_positions_list.csv` (1.x, no header), or `tissue_positions.parquet`; in-tissue spots only,
  x = pxl_col_in_fullres, y = pxl_row_in_fullres (nh2st.datasets.visium.read_positions);
- a comma- or tab-separated table with a header holding barcode, x, y (level-0 pixels, x = column);
- a Space Ranger / HEST `.h5ad` (obs `pxl_col_in_fullres` = x and `pxl_row_in_fullres` = y, else
  `obsm["spatial"]` = (x, y); only `in_tissue` spots when that column exists).
Patches are cropped with the slide's lazy reader, over the same field of view as the run's store
(the paper's 112 µm for visium/hest stores: nh2st.slide.at_paper_resolution; native for the
paper's datasets), and encoded with the backbone the run was trained on: the weights' sha256 must
equal the checksum recorded for the run's store. The neighbour index is rebuilt
from the new spots (nh2st.neighbors.knn_index), and each fold's model predicts from feature maps
only; with several folds the prediction is their mean.

The output `.h5ad` holds the predictions in X (float32, spots x genes), the genes as var, spot
centres in obsm["spatial"] (x, y) and obs pxl_col_in_fullres / pxl_row_in_fullres, a thumbnail
in uns["spatial"] (scanpy's layout, so `sc.pl.spatial` draws it), and provenance in uns["nh2st"].
Values are in the run's target space -- normalised to 10,000 over the run's genes, log10(x+1),
grid-smoothed -- NOT counts.

This is the one module that uses both stage one (slide, encoder) and stage two (trained models).
"""

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from nh2st import __version__, now
from nh2st.atomic import atomic_write
from nh2st.encoder import DEFAULT_WEIGHTS, FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.evaluate import VALUE_SPACE
from nh2st.extract import encode_sample
from nh2st.devices import cpu_count
from nh2st.neighbors import knn_index
from nh2st.paper import NEIGHBORS_K
from nh2st.progress import make_progress
from nh2st.slide import open_slide
from nh2st.store import EmbeddingStore
from nh2st.predictor import Predictor
from nh2st.runs import RUN_JSON, expected_folds, fold_path, read_info, resolve_run
CSV_COLUMNS = ("barcode", "x", "y")
HIRES_SIZE = 2000                # scanpy's "hires" image, as Space Ranger writes it
VISIUM_SPOT_TO_PITCH = 0.55   # 55 µm spots on a 100 µm pitch


# ---- spots ----------------------------------------------------------------------------------------------
def _check_spots(barcodes: np.ndarray, xy: np.ndarray, source: Path) -> tuple[np.ndarray, np.ndarray]:
    if len(barcodes) == 0:
        raise NH2STError(f"{source}: no spots; give at least one spot centre")
    if not np.isfinite(xy).all():
        bad = int((~np.isfinite(xy).all(axis=1)).sum())
        raise NH2STError(f"{source}: {bad} spots have missing or non-numeric x/y; fix or drop them")
    values, counts = np.unique(barcodes, return_counts=True)
    if (counts > 1).any():
        raise NH2STError(f"{source}: duplicate barcodes ({', '.join(values[counts > 1][:5])}); each spot needs its own id")
    return barcodes, xy


def read_spots_csv(path, sep: str = ",") -> tuple[np.ndarray, np.ndarray]:
    """A table with columns barcode, x, y (level-0 pixels; header names case-insensitive), separated
    by `sep` -> (barcodes, (N, 2) xy)."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype={0: str}, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise NH2STError(f"{path}: not a readable CSV ({type(exc).__name__}); give columns {', '.join(CSV_COLUMNS)}") from None
    columns = {str(c).strip().lower(): c for c in table.columns}
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        raise NH2STError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, table.columns))}); "
                         "the spots table needs barcode, x, y with x = column and y = row in full-resolution pixels "
                         "(or give Space Ranger's spatial/tissue_positions.csv as it is)")
    barcodes = table[columns["barcode"]].astype(str).to_numpy()
    xy = np.stack([pd.to_numeric(table[columns[c]], errors="coerce").to_numpy(dtype=np.float64) for c in "xy"], axis=1)
    return _check_spots(barcodes, xy, path)


def read_spots_h5ad(path) -> tuple[np.ndarray, np.ndarray]:
    """Space Ranger / HEST h5ad -> (barcodes, (N, 2) xy); in_tissue spots only when that column exists."""
    import anndata

    path = Path(path)
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:  # h5py/anndata raise many types on damaged files
        raise NH2STError(f"{path}: not a readable .h5ad ({type(exc).__name__}: {exc})") from None
    try:
        obs = adata.obs
        if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(obs.columns):
            xy = np.stack([pd.to_numeric(obs["pxl_col_in_fullres"], errors="coerce").to_numpy(np.float64),
                           pd.to_numeric(obs["pxl_row_in_fullres"], errors="coerce").to_numpy(np.float64)], axis=1)
        elif "spatial" in adata.obsm:
            xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
        else:
            raise NH2STError(f"{path}: no spot centres (obs pxl_col_in_fullres/pxl_row_in_fullres or obsm['spatial']); "
                             "give a Space Ranger / HEST h5ad or a CSV with barcode, x, y")
        barcodes = np.asarray(adata.obs_names, dtype=str)
        if "in_tissue" in obs.columns:
            keep = pd.to_numeric(obs["in_tissue"], errors="coerce").fillna(0).to_numpy() > 0
            barcodes, xy = barcodes[keep], xy[keep]
    finally:
        adata.file.close()
    return _check_spots(barcodes, xy, path)


def read_spots_positions(path) -> tuple[np.ndarray, np.ndarray]:
    """Space Ranger positions (any version) -> in-tissue (barcodes, (N, 2) xy), x = pxl_col_in_fullres."""
    from nh2st.datasets.visium import read_positions

    table = read_positions(path)
    table = table[table["in_tissue"] == 1]
    xy = table[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    return _check_spots(table["barcode"].to_numpy(), xy, Path(path))


def _is_space_ranger_positions(first_line: str) -> bool:
    """The header of the >= 2.0 file, or a header-less 1.x row: barcode,in_tissue(0/1),row,col,y,x."""
    if "pxl_row_in_fullres" in first_line:
        return True
    fields = [f.strip() for f in first_line.split(",")]
    if len(fields) != 6 or fields[1] not in ("0", "1"):
        return False
    try:
        [float(f) for f in fields[2:]]
    except ValueError:
        return False
    return True


def read_spots(path) -> tuple[np.ndarray, np.ndarray]:
    """Spot ids and level-0 centres (x, y) from Space Ranger positions, a CSV/TSV or an .h5ad (module doc)."""
    path = Path(path)
    if not path.is_file():
        raise NH2STError(f"{path}: spots file not found; give Space Ranger's tissue_positions.csv, a CSV or "
                         "tab-separated file with barcode, x, y, or a Space Ranger / HEST .h5ad")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return read_spots_h5ad(path)
    if suffix == ".parquet":
        return read_spots_positions(path)
    try:
        with open(path, newline="") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise NH2STError(f"{path}: not a readable text file ({type(exc).__name__}); give a CSV or tab-separated file") from None
    if _is_space_ranger_positions(first):
        return read_spots_positions(path)
    return read_spots_csv(path, sep="\t" if "\t" in first else ",")


# ---- runs and weights --------------------------------------------------------------------------------------
def resolve_fold_dirs(run, fold: int | None = None, ensemble: bool = False,
                     allow_missing_folds: bool = False) -> list[Path]:
    """Fold folders to predict with: a fold folder itself, fold `fold` of a run, or every fold of the run.

    Every fold means every fold of the run's scheme: an unfinished one is an error unless
    `allow_missing_folds`, and then a warning names the folds left out of the mean.
    """
    run = Path(run)
    if fold is not None and ensemble:
        raise NH2STError("--fold and --ensemble exclude each other; pass one")
    if (run / RUN_JSON).is_file() and ensemble:
        raise NH2STError(f"--run {run} is a single fold; --ensemble needs the run folder ({run.parent})")
    root, indices = resolve_run(run, "all" if fold is None else fold, allow_missing=allow_missing_folds,
                                what="predict with")
    if (run / RUN_JSON).is_file():
        return [run]
    n_folds = expected_folds(root)
    left_out = sorted(set(range(n_folds)) - set(indices)) if n_folds and fold is None else []
    if left_out:
        warnings.warn(f"{root}: folds {', '.join(map(str, left_out))} have not finished; the prediction is the "
                      f"mean of folds {', '.join(map(str, indices))} only", UserWarning, stacklevel=2)
    return [fold_path(root, k) for k in indices]


def default_weights(run: dict) -> str:
    """The weights the run's store was made with when they are seeded-random, else the default checkpoint path."""
    store_path = Path(run.get("store", ""))
    if (store_path / "zarr.json").is_file():
        weights = EmbeddingStore.open(store_path).meta.weights
        if str(weights).startswith("random"):
            return weights
    return str(DEFAULT_WEIGHTS)


def check_backbone(encoder: FrozenEncoder, run: dict, fold_dir: Path, weights) -> None:
    recorded = run.get("store_meta", {})
    expected = recorded.get("weights_sha256")
    if expected and encoder.weights_sha256 != expected:
        raise NH2STError(f"--weights {weights}: sha256 {encoder.weights_sha256[:12]}… is not the backbone run "
                         f"{fold_dir} was trained on ({expected[:12]}…); pass the weights used by `nh2st extract` "
                         "for its store")
    patch_size = recorded.get("patch_size")
    if patch_size and int(patch_size) != encoder.patch_size:
        raise NH2STError(f"{fold_dir}: run was trained on {patch_size}-px patches, the encoder crops "
                         f"{encoder.patch_size}-px ones; re-extract the store with {encoder.patch_size}-px patches")
    shape = recorded.get("feature_shape")
    if shape and tuple(shape) != tuple(encoder.feature_shape):
        raise NH2STError(f"{fold_dir}: run features {tuple(shape)} differ from the encoder's {encoder.feature_shape}")


# ---- features ---------------------------------------------------------------------------------------------
class _Collector:
    """Receives encoded batches in spot order (the writer side of nh2st.extract.encode_sample)."""

    def __init__(self):
        self.maps: list[np.ndarray] = []

    def write_features(self, maps: np.ndarray, pooled: np.ndarray) -> None:
        self.maps.append(maps)


def encode_spots(slide, pixel_xy: np.ndarray, encoder: FrozenEncoder, batch_size: int | None = None,
                 workers: int | None = None, show_progress: bool = True) -> np.ndarray:
    """(N, 2) level-0 centres on `slide` -> (N, 512, 7, 7) float16 maps, cropped and encoded as extract does."""
    batch_size = batch_size or encoder.default_batch_size
    workers = workers or min(8, max(2, cpu_count()))
    spots = SimpleNamespace(n_spots=len(pixel_xy), pixel_xy=pixel_xy, slide=slide)
    collector = _Collector()
    bar = make_progress(transient=True)
    bar.disable = not show_progress
    with ThreadPoolExecutor(workers, thread_name_prefix="nh2st-crop") as pool, bar:
        task = bar.add_task("encoding spots", total=len(pixel_xy))
        encode_sample(spots, encoder, collector, pool, batch_size, prefetch=workers + 1,
                      on_batch=lambda k: bar.advance(task, k))
    return np.concatenate(collector.maps)


# ---- output --------------------------------------------------------------------------------------------------
def _spot_diameter(pixel_xy: np.ndarray) -> float:
    """Visium's 55/100 of the median centre-to-centre distance (a rough spot size for plotting)."""
    from scipy.spatial import cKDTree

    if len(pixel_xy) < 2:
        return 100.0
    dist, _ = cKDTree(pixel_xy).query(pixel_xy, k=2)
    pitch = float(np.median(dist[:, 1]))
    return VISIUM_SPOT_TO_PITCH * pitch if pitch > 0 else 100.0


def _store_field_of_view(slide, run: dict, mpp: float | None):
    """The slide as the run's store cropped its samples: the paper's field for own-data stores, native otherwise."""
    from nh2st.datasets import DATASETS
    from nh2st.slide import at_paper_resolution

    spec = DATASETS.get(str(run.get("store_meta", {}).get("dataset", "")))
    if spec is None or spec.paper:
        return slide
    try:
        return at_paper_resolution(slide, mpp)[0]
    except NH2STError:
        slide.close()
        raise


def predict_slide(run, wsi, spots, out, fold: int | None = None, ensemble: bool = False, weights=None,
                  device: str = "auto", batch_size: int | None = None, show_progress: bool = True,
                  allow_missing_folds: bool = False, mpp: float | None = None) -> dict:
    """Predict every spot of `spots` on slide `wsi` with a trained run; writes `out` (.h5ad) atomically.

    run: a run folder (runs/<store-name>) or one fold folder. fold: one fold; default (or
    `ensemble`): the mean over every fold of the run (all must have finished unless
    `allow_missing_folds`). weights: checkpoint path or `random[:seed=N]`
    (default: what the run's store used if seeded-random, else weights/tenpercent_resnet18.ckpt);
    its sha256 must equal the run's. mpp: the slide's level-0 µm per pixel when its file has none
    (or is wrong). Returns a summary (out path, folds, spots, spots outside).
    """
    import anndata

    out = Path(out)
    if out.suffix != ".h5ad":
        raise NH2STError(f"--out {out}: give a path ending in .h5ad")
    folds = resolve_fold_dirs(run, fold, ensemble, allow_missing_folds)
    runs = [read_info(f).to_dict() for f in folds]
    first = runs[0]
    for f, r in zip(folds[1:], runs[1:]):
        if r.get("store_meta") != first.get("store_meta"):
            raise NH2STError(f"{f}: trained on another store than {folds[0]}; ensemble folds of one run only")
    barcodes, pixel_xy = read_spots(spots)
    weights = weights if weights is not None else default_weights(first)
    encoder = FrozenEncoder(weights, device)
    check_backbone(encoder, first, folds[0], weights)
    predictors = [Predictor.load(f, encoder.device) for f in folds]
    genes = predictors[0].genes
    if any(p.genes != genes for p in predictors):
        raise NH2STError(f"{run}: folds predict different genes; ensemble folds of one run only")

    with _store_field_of_view(open_slide(wsi), first, mpp) as slide:
        inside = ((pixel_xy[:, 0] >= 0) & (pixel_xy[:, 0] < slide.width) &
                  (pixel_xy[:, 1] >= 0) & (pixel_xy[:, 1] < slide.height))
        n_outside = int((~inside).sum())
        if n_outside:
            shown = ", ".join(barcodes[~inside][:5])
            warnings.warn(f"{spots}: {n_outside} of {len(barcodes)} spot centres lie outside the slide "
                          f"({slide.width}x{slide.height} px; e.g. {shown}); their patches are padded with white "
                          "and their predictions mean nothing. Check that x is the column and y the row in "
                          "full-resolution pixels", UserWarning, stacklevel=2)
        features = encode_spots(slide, pixel_xy, encoder, batch_size, show_progress=show_progress)
        thumbnail, thumb_scale = slide.thumbnail(HIRES_SIZE)
        slide_size = (int(slide.width), int(slide.height))
    neighbors = knn_index(pixel_xy, int(first.get("store_meta", {}).get("neighbors_k", NEIGHBORS_K)))
    prediction = np.mean([p.predict(features, neighbors) for p in predictors], axis=0).astype(np.float32)

    library_id = Path(wsi).stem
    fold_ids = [int(r.get("fold", -1)) for r in runs]
    provenance = {
        "run": str(Path(run).resolve()), "folds": np.array(fold_ids, dtype=np.int64),
        "aggregation": "mean over folds" if len(folds) > 1 else "single fold",
        "model_kind": str(predictors[0].kind), "protocol": str(first.get("protocol", "")),
        "backbone": str(first.get("store_meta", {}).get("backbone", encoder.name)),
        "weights": str(encoder.weights), "weights_sha256": encoder.weights_sha256,
        "store": str(first.get("store", "")), "dataset": str(first.get("store_meta", {}).get("dataset", "")),
        "value_space": VALUE_SPACE,
        "wsi": str(Path(wsi).resolve()), "spots": str(Path(spots).resolve()),
        "slide_size": np.array(slide_size, dtype=np.int64), "n_spots_outside_slide": n_outside,
        "nh2st_version": __version__, "created_at": now(),
    }
    obs = pd.DataFrame({"pxl_col_in_fullres": pixel_xy[:, 0], "pxl_row_in_fullres": pixel_xy[:, 1],
                        "outside_slide": ~inside}, index=pd.Index(barcodes, name="barcode"))
    adata = anndata.AnnData(X=prediction, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    adata.obsm["spatial"] = pixel_xy.astype(np.float64)
    adata.uns["nh2st"] = provenance
    adata.uns["spatial"] = {library_id: {
        "images": {"hires": thumbnail},
        "scalefactors": {"tissue_hires_scalef": float(thumb_scale), "spot_diameter_fullres": _spot_diameter(pixel_xy)},
        "metadata": {"source": "nh2st predict"}}}
    atomic_write(out, adata.write_h5ad)
    return {"out": str(out), "folds": fold_ids, "n_spots": int(len(barcodes)), "n_genes": len(genes),
            "n_outside": n_outside, "weights_sha256": encoder.weights_sha256, "model_kind": predictors[0].kind}
