"""HEST-1k reader (INT, ZEN and any HEST id) in the layout a HEST download has.

    <root>/st/<id>.h5ad          AnnData: raw counts X (sparse or dense), var_names = gene symbols,
                                 obs: in_tissue, array_row, array_col, pxl_col_in_fullres (x),
                                 pxl_row_in_fullres (y)
    <root>/wsis/<id>.tif         pyramidal TIFF, level-0 pixels are the h5ad's pixel space
    <root>/metadata/<id>.json    optional; flat object that may contain bare NaN tokens

The patch centre is (pxl_col_in_fullres, pxl_row_in_fullres) = (x, y), the true spot centre. The
paper's code swaps the two (datasets.md §8.1); nh2st does not. Grid ids are (array_col, array_row),
as the paper's "<array_col>x<array_row>" spot id, so the 3x3 smoothing stencil finds the same
neighbours as the paper on the Visium hex grid. Only spots with in_tissue == 1 are kept when the
column exists. The HEST metadata's `patient` goes to `Sample.meta["patient"]` (folds by patient).

`--dataset hest` takes any ids present in st/ (all of them by default) and crops the paper's field
of view (nh2st.slide.at_paper_resolution, µm/px from --mpp, else HEST's pixel_size_um_estimated,
else the TIFF's tags); zen and int crop natively, as the paper does.
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from nh2st.datasets.base import Sample, patch_rule
from nh2st.errors import NH2STError
from nh2st.expression import select_genes, take_genes
from nh2st.slide import open_slide

COORD_COLUMNS = ("array_row", "array_col", "pxl_col_in_fullres", "pxl_row_in_fullres")


def sample_paths(root: Path, sample_id: str) -> dict[str, Path]:
    root = Path(root)
    return {"st": root / "st" / f"{sample_id}.h5ad", "wsi": root / "wsis" / f"{sample_id}.tif",
            "metadata": root / "metadata" / f"{sample_id}.json"}


def find_samples(spec, root: Path) -> list[str]:
    """The dataset's known ids (exact names, e.g. ZEN40-ZEN49) that have st/<id>.h5ad, in known order.

    Exact names only: INT1 never matches INT10.h5ad. Raises NH2STError if st/ is missing or holds
    none of the dataset's samples (naming the folder and the expected ids).
    """
    folder = Path(root) / "st"
    if not folder.is_dir():
        raise NH2STError(f"{folder}: folder not found; --data-root must be the HEST-1k download "
                         "holding st/ and wsis/")
    if not spec.paper:  # any HEST id: everything downloaded
        present = sorted(p.name[:-len(".h5ad")] for p in folder.glob("*.h5ad") if p.is_file())
        if not present:
            raise NH2STError(f"{folder}: no <id>.h5ad there; download HEST-1k samples (see README, "
                             "'Your own data') or point --data-root at the download")
        return present
    known = spec.known_samples()
    present = [sid for sid in known if (folder / f"{sid}.h5ad").is_file()]
    if not present:
        raise NH2STError(f"{folder}: none of the {spec.name} samples ({known[0]}..{known[-1]}) is there; "
                         "download them or name the ones you have with --samples")
    return present


def read_metadata(path: Path) -> dict:
    """metadata/<id>.json as a dict, NaN/Infinity tokens (Python's json writes them) turned into None."""
    try:
        data = json.loads(path.read_text(), parse_constant=lambda token: None)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NH2STError(f"{path}: not readable JSON ({type(exc).__name__}: {exc}); re-download or delete it") from None
    if not isinstance(data, dict):
        raise NH2STError(f"{path}: expected one JSON object of sample metadata; re-download or delete it")
    return data


def _read_h5ad(path: Path):
    import anndata

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for damaged files
        raise NH2STError(f"{path}: cannot read h5ad ({type(exc).__name__}: {exc}); re-download it") from None


def _numeric(column) -> np.ndarray:
    """A pandas column (numeric, bool, categorical or strings) as float64, NaN where not a number."""
    return pd.to_numeric(pd.Series(np.asarray(column, dtype=object)), errors="coerce").to_numpy(np.float64)


def _metadata_mpp(meta: dict) -> float | None:
    value = meta.get("pixel_size_um_estimated")
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _require_files(paths: dict, sample_id: str, kinds=("st", "wsi")) -> None:
    for kind in kinds:
        if not paths[kind].is_file():
            what = "expression (h5ad)" if kind == "st" else "whole-slide image"
            raise NH2STError(f"{paths[kind]}: not found; sample {sample_id} needs its {what} at "
                             f"{paths[kind].parent}/{paths[kind].name}; download it or drop the sample")


def read_gene_table(spec, root: Path, sample_id: str):
    """(every gene name, raw counts of the in-tissue spots) of one sample, for --genes hvg/heg."""
    paths = sample_paths(root, sample_id)
    _require_files(paths, sample_id, ("st",))
    adata = _read_h5ad(paths["st"])
    X = adata.X
    if "in_tissue" in adata.obs.columns:
        X = X[_numeric(adata.obs["in_tissue"]) == 1]
    return list(map(str, adata.var_names)), X


def load_sample(spec, root: Path, sample_id: str, genes: list[str], allow_missing_genes: bool = False) -> Sample:
    """One HEST sample (any id present on disk) as a Sample, spots with in_tissue == 1 only."""
    paths = sample_paths(root, sample_id)
    _require_files(paths, sample_id)
    source = str(paths["st"])
    adata = _read_h5ad(paths["st"])
    obs = adata.obs
    absent = [c for c in COORD_COLUMNS if c not in obs.columns]
    if absent:
        raise NH2STError(f"{source}: obs lacks the HEST column(s) {', '.join(absent)}; "
                         "nh2st needs array_row, array_col, pxl_col_in_fullres, pxl_row_in_fullres")

    keep = np.ones(adata.n_obs, dtype=bool)
    if "in_tissue" in obs.columns:
        keep = _numeric(obs["in_tissue"]) == 1
    coords = np.stack([_numeric(obs[c]) for c in COORD_COLUMNS], axis=1)
    barcodes = np.asarray(adata.obs_names, dtype=str)
    no_coords = keep & ~np.isfinite(coords).all(axis=1)
    if no_coords.any():
        first = barcodes[np.flatnonzero(no_coords)[0]]
        raise NH2STError(f"{source}: {int(no_coords.sum())} barcode(s) without coordinates (e.g. {first}: "
                         f"NaN or non-numeric {', '.join(COORD_COLUMNS)}); fix the h5ad or set their in_tissue to 0")
    if not keep.any():
        raise NH2STError(f"{source}: no spot has in_tissue == 1; sample {sample_id} has nothing to predict")

    index, missing = select_genes(adata.var_names, genes, sample_id, source, allow_missing_genes)
    rows = np.flatnonzero(keep)
    counts = take_genes(adata.X[rows] if len(rows) < adata.n_obs else adata.X, index)
    coords = coords[rows]
    grid_xy = np.stack([coords[:, 1], coords[:, 0]], axis=1)  # (array_col, array_row)
    if not np.array_equal(grid_xy, np.round(grid_xy)):
        raise NH2STError(f"{source}: array_row/array_col must be integer grid ids")
    pixel_xy = coords[:, [2, 3]]  # (pxl_col_in_fullres, pxl_row_in_fullres) = (x, y)

    meta = read_metadata(paths["metadata"]) if paths["metadata"].is_file() else {}
    slide = open_slide(paths["wsi"])
    mpp = spec.options.get("mpp") or _metadata_mpp(meta)
    slide, patch = patch_rule(spec, slide, mpp)
    if "mpp" not in spec.options and _metadata_mpp(meta):
        patch["mpp_from"] = f"{paths['metadata'].name} pixel_size_um_estimated"
    outside = ((pixel_xy < 0) | (pixel_xy >= (slide.width, slide.height))).any(axis=1)
    if outside.any():
        warnings.warn(f"{paths['wsi']}: {int(outside.sum())} of {len(rows)} spot centres of sample {sample_id} "
                      f"lie outside the {slide.width}x{slide.height} slide; their patches are padded white",
                      stacklevel=2)
    return Sample(id=sample_id, slide=slide, pixel_xy=pixel_xy, grid_xy=grid_xy.astype(np.int64),
                  barcodes=barcodes[rows], counts=counts, genes=list(genes), source=source,
                  meta={"dataset": spec.name, "st": source, "wsi": str(paths["wsi"]), "mpp": mpp or slide.mpp,
                        "patient": meta.get("patient"), "patch": patch,
                        "magnification": meta.get("magnification"), "spots_in_file": int(adata.n_obs),
                        "spots_off_tissue_dropped": int(adata.n_obs - len(rows)), "missing_genes": missing,
                        "hest_metadata": meta})
