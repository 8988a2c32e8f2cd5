"""Space Ranger output (10x Visium), one `outs/` folder per sample: `--dataset visium`.

    <root>/<sample>/outs/filtered_feature_bc_matrix.h5      10x HDF5 feature-barcode matrix
    <root>/<sample>/outs/spatial/tissue_positions.csv       Space Ranger >= 2.0 (header row), or
    <root>/<sample>/outs/spatial/tissue_positions_list.csv  Space Ranger 1.x (no header), or
    <root>/<sample>/outs/spatial/tissue_positions.parquet   (same columns)
    <root>/<sample>/outs/spatial/scalefactors_json.json
    <root>/<sample>/<sample>.tif | .svs | .ndpi | ...       the full-resolution H&E Space Ranger was run on
                                                            (or <image-dir>/<sample>.<ext> with --image-dir)

`<root>/<sample>/` may itself be the outs folder, and `--data-root` may be one outs folder (one
sample, named after the folder above `outs`).

10x HDF5 (https://www.10xgenomics.com/support/software/space-ranger/latest/analysis/outputs/
feature-barcode-matrices): group `matrix` with `barcodes`, `data`, `indices`, `indptr`, `shape`
= (features, barcodes), i.e. a CSC matrix of features x barcodes, and `features/{id, name,
feature_type}`; only "Gene Expression" features are kept, named by `name` (the gene symbol), or by
`id` (Ensembl) when the gene list is written in ids. Positions: columns barcode, in_tissue,
array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres (in that order in the header-less
file). Only in_tissue == 1 spots are kept; their barcodes must all be in the matrix (joined exactly,
never by position). Patch centre = (pxl_col_in_fullres, pxl_row_in_fullres) = (x, y); grid ids =
(array_col, array_row), as for HEST.

The image must be the full-resolution one: its size is checked against the scale factors and
Space Ranger's hires (or lowres) PNG, and every in-tissue spot must lie on it. Level-0 µm per pixel
come from --mpp, else from the image file; patches cover the paper's 112 µm field
(nh2st.slide.at_paper_resolution).
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from nh2st.datasets.base import Sample, check_inside, patch_rule
from nh2st.errors import NH2STError
from nh2st.expression import select_genes, take_genes
from nh2st.slide import open_slide

MATRIX = "filtered_feature_bc_matrix.h5"
POSITIONS = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv", "spatial/tissue_positions.parquet")
SCALEFACTORS = "spatial/scalefactors_json.json"
SCALED_IMAGES = (("spatial/tissue_hires_image.png", "tissue_hires_scalef"),
                 ("spatial/tissue_lowres_image.png", "tissue_lowres_scalef"))
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".scn", ".bif", ".mrxs", ".jpg", ".jpeg", ".png")
GENE_EXPRESSION = "Gene Expression"
SPOT_DIAMETER_UM = 55.0   # Visium spot
SIZE_TOLERANCE = 0.02     # relative; the scaled PNGs are rounded to whole pixels


# ---- finding samples -----------------------------------------------------------------------------------
def _looks_like_outs(folder: Path) -> bool:
    return (folder / MATRIX).is_file() or (folder / "spatial").is_dir()


def _outs_of(folder: Path) -> Path | None:
    for candidate in (folder / "outs", folder):
        if candidate.is_dir() and _looks_like_outs(candidate):
            return candidate
    return None


def _single_sample(root: Path) -> str | None:
    """The sample id when --data-root is itself one Space Ranger output folder."""
    if not _looks_like_outs(root):
        return None
    if root.name == "outs":
        return root.resolve().parent.name
    return root.resolve().name


def find_samples(spec, root: Path) -> list[str]:
    """Sample ids = names of the folders under `root` holding Space Ranger output (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise NH2STError(f"{root}: folder not found; --data-root must hold one Space Ranger output folder per sample")
    single = _single_sample(root)
    if single is not None:
        return [single]
    found = sorted(child.name for child in root.iterdir() if child.is_dir() and _outs_of(child) is not None)
    if not found:
        raise NH2STError(f"{root}: no Space Ranger output found; expected <sample>/outs/{MATRIX} and "
                         f"<sample>/outs/spatial/ under it (one folder per sample)")
    return found


def sample_folder(root: Path, sample_id: str) -> Path:
    """The outs folder of `sample_id`."""
    root = Path(root)
    if _single_sample(root) == sample_id:
        return root
    folder = _outs_of(root / sample_id)
    if folder is None:
        raise NH2STError(f"{root / sample_id}: no Space Ranger output for sample {sample_id} (looked for "
                         f"{root / sample_id / 'outs'} and {root / sample_id} holding {MATRIX} and spatial/)")
    return folder


def required_files(folder: Path) -> dict[str, Path]:
    """matrix, positions and scalefactors of one outs folder; an error lists what is found and missing."""
    positions = next((folder / p for p in POSITIONS if (folder / p).is_file()), None)
    files = {"matrix": folder / MATRIX, "positions": positions, "scalefactors": folder / SCALEFACTORS}
    missing = [name for name, path in files.items() if path is None or not path.is_file()]
    if missing:
        wanted = {"matrix": MATRIX, "positions": " or ".join(POSITIONS[:2]), "scalefactors": SCALEFACTORS}
        present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        shown = ", ".join(present[:12]) + (f" and {len(present) - 12} more" if len(present) > 12 else "")
        raise NH2STError(f"{folder}: Space Ranger output is incomplete: missing {'; '.join(wanted[m] for m in missing)} "
                         f"(found: {shown or 'nothing'}); copy the whole outs/ folder of the Space Ranger run")
    return files


# ---- 10x HDF5 ---------------------------------------------------------------------------------------------
def _strings(dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def read_10x_h5(path) -> dict:
    """A 10x feature-barcode matrix: barcodes (B,), ids/names/types (F,), counts CSR (B, F) float32."""
    import h5py
    from scipy import sparse

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise NH2STError(f"{path}: not a 10x feature-barcode matrix (no 'matrix' group; found "
                                 f"{', '.join(f.keys()) or 'nothing'}); give Space Ranger's {MATRIX}")
            m = f["matrix"]
            absent = [k for k in ("barcodes", "data", "indices", "indptr", "shape", "features") if k not in m]
            if absent:
                raise NH2STError(f"{path}: 10x matrix lacks {', '.join(absent)}; the file is damaged, copy it again")
            features = m["features"]
            n_features, n_barcodes = (int(v) for v in m["shape"][()])
            barcodes = _strings(m["barcodes"])
            ids, names = _strings(features["id"]), _strings(features["name"])
            types = _strings(features["feature_type"]) if "feature_type" in features else [GENE_EXPRESSION] * len(ids)
            # CSC of (features x barcodes) is the CSR of (barcodes x features) with the same three arrays
            counts = sparse.csr_matrix((m["data"][()].astype(np.float32), m["indices"][()], m["indptr"][()]),
                                       shape=(n_barcodes, n_features))
    except NH2STError:
        raise
    except Exception as exc:  # h5py raises many types on damaged files
        raise NH2STError(f"{path}: cannot read the 10x HDF5 matrix ({type(exc).__name__}: {exc}); copy it again "
                         "from the Space Ranger outs/ folder") from None
    if len(barcodes) != n_barcodes or not (len(ids) == len(names) == len(types) == n_features):
        raise NH2STError(f"{path}: 10x matrix shape {n_features}x{n_barcodes} disagrees with its {len(ids)} features "
                         f"and {len(barcodes)} barcodes; the file is damaged, copy it again")
    keep = np.array([t == GENE_EXPRESSION for t in types])
    if not keep.any():
        raise NH2STError(f"{path}: no '{GENE_EXPRESSION}' features in the matrix; give the gene expression matrix")
    return {"barcodes": np.asarray(barcodes, dtype=str), "ids": [i for i, k in zip(ids, keep) if k],
            "names": [n for n, k in zip(names, keep) if k], "counts": counts[:, np.flatnonzero(keep)],
            "n_other_features": int((~keep).sum())}


# ---- positions and scale factors ---------------------------------------------------------------------------
def read_positions(path) -> pd.DataFrame:
    """A Space Ranger positions file (either CSV version, or parquet) with POSITION_COLUMNS, barcode as str.

    The header-less 1.x file and the >= 2.0 file with a header are told apart by content, not name.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            table = pd.read_parquet(path)
        else:
            with open(path, newline="") as fh:
                first = fh.readline()
            has_header = "barcode" in first.lower()
            table = pd.read_csv(path, header=0 if has_header else None, dtype={0: str}, float_precision="round_trip")
            if not has_header:
                if table.shape[1] != len(POSITION_COLUMNS):
                    raise NH2STError(f"{path}: {table.shape[1]} columns without a header; a Space Ranger positions "
                                     f"file has {len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}")
                table.columns = list(POSITION_COLUMNS)
    except NH2STError:
        raise
    except Exception as exc:  # pandas / pyarrow raise many types on malformed files
        raise NH2STError(f"{path}: not a readable positions file ({type(exc).__name__}: {exc}); give Space "
                         "Ranger's spatial/tissue_positions.csv") from None
    table.columns = [str(c).strip() for c in table.columns]
    absent = [c for c in POSITION_COLUMNS if c not in table.columns]
    if absent:
        raise NH2STError(f"{path}: missing column(s) {', '.join(absent)} (found: {', '.join(table.columns)}); "
                         f"a Space Ranger positions file has {', '.join(POSITION_COLUMNS)}")
    table = table[list(POSITION_COLUMNS)].copy()
    table["barcode"] = table["barcode"].astype(str)
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any():
            row = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise NH2STError(f"{path}: column {column} is not a number for barcode {table['barcode'].iloc[row]}; "
                             "fix the file or copy it again from Space Ranger")
        table[column] = values
    repeated = table["barcode"][table["barcode"].duplicated()]
    if len(repeated):
        raise NH2STError(f"{path}: barcode(s) listed twice ({', '.join(repeated.iloc[:3])}); each spot once")
    return table


def read_scalefactors(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NH2STError(f"{path}: not readable JSON ({type(exc).__name__}); copy it again from Space Ranger") from None
    if not isinstance(data, dict):
        raise NH2STError(f"{path}: expected a JSON object of scale factors")
    for key in ("spot_diameter_fullres", "tissue_hires_scalef"):
        value = data.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise NH2STError(f"{path}: {key} is {value!r}, expected a positive number; copy the file again from Space Ranger")
    return data


def check_image_size(slide, folder: Path, scalefactors: dict, image: Path) -> None:
    """The image must be the full-resolution one the scale factors were computed for.

    Space Ranger's hires (lowres) PNG is the full-resolution image times tissue_hires_scalef
    (tissue_lowres_scalef), so its size times 1 / scale factor is the full-resolution size.
    """
    from PIL import Image

    for name, key in SCALED_IMAGES:
        scale = scalefactors.get(key)
        if not (folder / name).is_file() or not isinstance(scale, (int, float)) or scale <= 0:
            continue
        with Image.open(folder / name) as png:
            w, h = png.size
        expected = (w / scale, h / scale)
        off = [abs(got * scale - small) > max(2.0, SIZE_TOLERANCE * small)
               for got, small in ((slide.width, w), (slide.height, h))]
        if any(off):
            raise NH2STError(f"{image}: image is {slide.width}x{slide.height} px but {name} ({w}x{h}) with {key} "
                             f"{scale:g} says the full-resolution image Space Ranger used is about "
                             f"{expected[0]:.0f}x{expected[1]:.0f} px; give that image, not a resized or cropped copy")
        return


def find_image(folder: Path, sample_id: str, image_dir: Path | None) -> Path:
    """<image_dir>/<sample_id>.<ext>, else the one image file next to the outs folder (or in it)."""
    def images_in(where: Path, stem: str | None = None) -> list[Path]:
        if not where.is_dir():
            return []
        return sorted(p for p in where.iterdir() if (p.is_file() or p.suffix.lower() == ".mrxs")
                      and p.suffix.lower() in IMAGE_SUFFIXES and (stem is None or p.stem == stem))

    if image_dir is not None:
        found = images_in(Path(image_dir), sample_id)
        where = f"in --image-dir {image_dir}"
    else:
        places = [folder.parent, folder] if folder.name == "outs" else [folder]
        found = [p for place in places for p in images_in(place)]
        where = "next to " + " or in ".join(str(p) for p in places)
    if not found:
        raise NH2STError(f"{folder}: no full-resolution image for sample {sample_id} {where} (looked for "
                         f"{sample_id if image_dir else '*'}{{{','.join(IMAGE_SUFFIXES)}}}); put the H&E Space Ranger "
                         "was run on there, or pass --image-dir DIR holding <sample>.<ext>")
    if len(found) > 1:
        raise NH2STError(f"{folder}: several images for sample {sample_id} {where} ({', '.join(p.name for p in found)}); "
                         "keep only the full-resolution H&E, or pass --image-dir DIR holding <sample>.<ext>")
    return found[0]


# ---- the sample -------------------------------------------------------------------------------------------
def _in_tissue_rows(matrix: dict, positions: pd.DataFrame, files: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """In-tissue positions and, for each, its row in the matrix (joined on the exact barcode)."""
    row_of = {b: i for i, b in enumerate(matrix["barcodes"])}
    placed = set(positions["barcode"])
    unplaced = [b for b in matrix["barcodes"] if b not in placed]
    if unplaced:
        raise NH2STError(f"{files['matrix']}: {len(unplaced)} matrix barcode(s) have no row in {files['positions'].name} "
                         f"(e.g. {unplaced[0]}); the two files come from different Space Ranger runs, use one run's outs/")
    tissue = positions[positions["in_tissue"] == 1]
    if tissue.empty:
        raise NH2STError(f"{files['positions']}: no spot has in_tissue == 1; nothing to predict")
    rows = np.array([row_of.get(b, -1) for b in tissue["barcode"]])
    if (rows < 0).any():
        absent = tissue["barcode"].to_numpy()[rows < 0]
        hint = ""
        if absent[0].rsplit("-", 1)[0] in {b.rsplit("-", 1)[0] for b in matrix["barcodes"][:1000]}:
            hint = f" (the matrix writes them like {matrix['barcodes'][0]}: the suffixes differ)"
        raise NH2STError(f"{files['positions']}: {len(absent)} in-tissue barcode(s) are not in {files['matrix'].name} "
                         f"(e.g. {absent[0]}){hint}; positions and matrix must come from the same Space Ranger run")
    return tissue, rows


def read_gene_table(spec, root: Path, sample_id: str):
    """(gene symbols, raw counts of the in-tissue spots) of one sample, for --genes hvg/heg."""
    files = required_files(sample_folder(root, sample_id))
    matrix = read_10x_h5(files["matrix"])
    _, rows = _in_tissue_rows(matrix, read_positions(files["positions"]), files)
    return matrix["names"], matrix["counts"][rows]


def _gene_keys(matrix: dict, genes: list[str]) -> tuple[list[str], str]:
    """Match the list on symbols, or on Ensembl ids when the list is written in ids."""
    wanted = set(genes)
    by_id = sum(g in wanted for g in matrix["ids"])
    by_name = sum(g in wanted for g in matrix["names"])
    return (matrix["ids"], "id") if by_id > by_name else (matrix["names"], "name")


def load_sample(spec, root: Path, sample_id: str, genes: list[str], allow_missing_genes: bool = False) -> Sample:
    """One Space Ranger sample as a Sample: in-tissue spots, counts of `genes`, its full-resolution slide."""
    folder = sample_folder(root, sample_id)
    files = required_files(folder)
    matrix = read_10x_h5(files["matrix"])
    positions = read_positions(files["positions"])
    tissue, rows = _in_tissue_rows(matrix, positions, files)
    scalefactors = read_scalefactors(files["scalefactors"])

    keys, matched_on = _gene_keys(matrix, genes)
    index, missing = select_genes(keys, genes, sample_id, str(files["matrix"]), allow_missing_genes)
    counts = take_genes(matrix["counts"][rows], index)
    grid = tissue[["array_col", "array_row"]].to_numpy(np.float64)
    if not np.array_equal(grid, np.round(grid)):
        raise NH2STError(f"{files['positions']}: array_row/array_col must be whole grid ids")
    pixel_xy = tissue[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    image = find_image(folder, sample_id, spec.options.get("image_dir"))
    slide = open_slide(image)
    try:
        check_image_size(slide, folder, scalefactors, image)
        check_inside(slide, pixel_xy, image, files["positions"])
    except NH2STError:
        slide.close()
        raise
    mpp = spec.options.get("mpp")
    if mpp is None and slide.mpp is None:
        slide.close()
        estimate = SPOT_DIAMETER_UM / scalefactors["spot_diameter_fullres"]
        raise NH2STError(f"{image}: the image records no microns per pixel, so the 224-px patch's tissue size is "
                         f"unknown; pass --mpp (level-0 µm per pixel; the spot diameter in {SCALEFACTORS} suggests "
                         f"about {estimate:.2f})")
    slide, patch = patch_rule(spec, slide, mpp)
    return Sample(id=sample_id, slide=slide, pixel_xy=pixel_xy, grid_xy=grid.astype(np.int64),
                  barcodes=tissue["barcode"].to_numpy(), counts=counts, genes=list(genes), source=str(files["matrix"]),
                  meta={"dataset": spec.name, "outs": str(folder), "positions": str(files["positions"]),
                        "image": str(image), "mpp": patch["slide_mpp"], "patch": patch,
                        "genes_matched_on": matched_on, "missing_genes": missing,
                        "spots_in_positions": int(len(positions)), "spots_in_tissue": int(len(tissue)),
                        "matrix_barcodes": int(len(matrix["barcodes"])),
                        "spot_diameter_fullres": float(scalefactors["spot_diameter_fullres"])})
