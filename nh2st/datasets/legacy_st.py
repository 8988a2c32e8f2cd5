"""STNet and Skin (legacy ST) in the preprocessed layout the paper reads (TRIPLEX's copy).

    <root>/ST-imgs/HE_<name>.tif                  STNet image (RGB TIFF)
    <root>/ST-imgs/<GSM>_<name>.jpg               Skin image (JPEG), e.g. GSM4284316_P2_ST_rep1.jpg
    <root>/ST-spotfiles/<name>_selection.tsv      tab-separated, columns x, y, pixel_x, pixel_y (+ others)
    <root>/ST-cnts/<name>_sub.parquet             index "<x>x<y>", one column per gene symbol, raw counts

A spot's id is "<round(x)>x<round(y)>" from the selection file, joined exactly with the parquet
index. Spots of the selection file without counts are dropped (with a warning giving how many);
the paper's code instead pairs patches and counts by row position, which shifts every later
patch onto the wrong counts. Pixel centre: pixel_x = column, pixel_y = row of the full image.
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from nh2st.datasets.base import Sample, check_inside, find_data_folder, validate_counts
from nh2st.errors import NH2STError
from nh2st.expression import select_genes
from nh2st.slide import open_slide

FOLDERS = ("ST-imgs", "ST-spotfiles", "ST-cnts")
SPOT_SUFFIX = "_selection.tsv"
COUNTS_SUFFIX = "_sub.parquet"
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
# The image stem is "<prefix><name>": STNet "HE_", Skin an 11-character GEO sample id "GSMxxxxxxx_".
IMAGE_PREFIX = {"stnet": re.compile(r"HE_"), "skin": re.compile(r"GSM\d+_")}
# Folder names the paper's README uses, tried below a root that is their parent.
SUBFOLDERS = {"stnet": ("stnet", "STNet"), "skin": ("skin", "Skin")}


def resolve_root(spec, root: Path) -> Path:
    """The folder holding ST-imgs/, ST-spotfiles/, ST-cnts/: `root` or its stnet|skin subfolder."""
    candidates = [root] + [root / sub for sub in SUBFOLDERS.get(spec.name, ())]
    return find_data_folder(root, candidates, FOLDERS, f"the {spec.name} download",
                            "the folder that holds ST-imgs/, ST-spotfiles/ and ST-cnts/")


def find_samples(spec, root: Path) -> list[str]:
    """Sample names = selection files minus `_selection.tsv`, sorted."""
    folder = resolve_root(spec, Path(root)) / "ST-spotfiles"
    return sorted(p.name[: -len(SPOT_SUFFIX)] for p in folder.iterdir()
                  if p.is_file() and p.name.endswith(SPOT_SUFFIX))


def image_path(spec, root: Path, sample_id: str) -> Path:
    """The one image of `sample_id`: stem == known prefix + exact name (Rep1 never matches Rep10)."""
    folder = root / "ST-imgs"
    prefix = IMAGE_PREFIX[spec.name]
    matches = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        head = prefix.match(path.stem)
        if head and path.stem[head.end():] == sample_id:
            matches.append(path)
    example = {"stnet": f"HE_{sample_id}.tif", "skin": f"GSM<number>_{sample_id}.jpg"}[spec.name]
    if not matches:
        raise NH2STError(f"{folder}: no image for sample {sample_id}; expected {example}")
    if len(matches) > 1:
        raise NH2STError(f"{folder}: {len(matches)} images for sample {sample_id} "
                         f"({', '.join(p.name for p in matches)}); keep exactly one")
    return matches[0]


def _read_spots(path: Path) -> pd.DataFrame:
    """Selection file -> frame indexed by spot id "<x>x<y>" with int x, y and float pixel_x, pixel_y."""
    try:
        table = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise NH2STError(f"{path}: not a readable tab-separated spot file ({exc.__class__.__name__}); "
                         "re-download it") from None
    needed = ["x", "y", "pixel_x", "pixel_y"]
    absent = [c for c in needed if c not in table.columns]
    if absent:
        raise NH2STError(f"{path}: missing column(s) {', '.join(absent)} (has: {', '.join(map(str, table.columns))}); "
                         "a selection file needs x, y, pixel_x, pixel_y")
    values = table[needed].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1)
    if bad.any():
        raise NH2STError(f"{path}: {int(bad.sum())} row(s) with empty or non-numeric x, y, pixel_x or pixel_y "
                         f"(first at data row {int(np.flatnonzero(bad.to_numpy())[0]) + 1}); fix the file")
    spots = pd.DataFrame({"x": np.rint(values["x"]).astype(np.int64), "y": np.rint(values["y"]).astype(np.int64),
                          "pixel_x": values["pixel_x"].astype(np.float64),
                          "pixel_y": values["pixel_y"].astype(np.float64)})
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    duplicated = spots.index[spots.index.duplicated()].unique()
    if len(duplicated):
        raise NH2STError(f"{path}: duplicate grid id(s) {', '.join(duplicated[:5])}; each spot needs its own x, y")
    return spots


def _read_counts(path: Path, genes: list[str], sample_id: str, allow_missing_genes: bool):
    """Counts parquet -> (spot ids, (N, G) float32 counts in gene order, missing genes)."""
    try:
        columns = pq.read_schema(path).names
        index, missing = select_genes(columns, genes, sample_id, str(path), allow_missing_genes)
        present = [columns[i] for i in index if i >= 0]
        frame = pd.read_parquet(path, columns=present)
    except NH2STError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
        raise NH2STError(f"{path}: not a readable parquet file ({exc.__class__.__name__}); re-download it") from None
    try:
        values = frame[present].to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        raise NH2STError(f"{path}: non-numeric values in the gene columns; counts must be numbers") from None
    ids = frame.index.astype(str)
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise NH2STError(f"{path}: duplicate spot id(s) {', '.join(duplicated[:5])} in the index")
    counts = np.zeros((len(frame), len(genes)), dtype=np.float32)
    counts[:, index >= 0] = values
    validate_counts(counts, str(path), sample_id)
    return np.asarray(ids), counts, missing


def read_gene_table(spec, root: Path, sample_id: str):
    """(every gene column, raw counts of every spot of the counts file) of one section, for --genes hvg/heg."""
    path = resolve_root(spec, Path(root)) / "ST-cnts" / f"{sample_id}{COUNTS_SUFFIX}"
    if not path.is_file():
        raise NH2STError(f"{path}: not found; every sample of ST-spotfiles/ needs its counts in ST-cnts/")
    try:
        names = list(dict.fromkeys(c for c in pq.read_schema(path).names if not c.startswith("__index_level")))
    except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
        raise NH2STError(f"{path}: not a readable parquet file ({exc.__class__.__name__}); re-download it") from None
    return names, _read_counts(path, names, sample_id, False)[1]


def load_sample(spec, root: Path, sample_id: str, genes: list[str], allow_missing_genes: bool = False) -> Sample:
    """One STNet/Skin section: spots of the selection file that have counts, in (y, x) order."""
    root = resolve_root(spec, Path(root))
    spot_path = root / "ST-spotfiles" / f"{sample_id}{SPOT_SUFFIX}"
    counts_path = root / "ST-cnts" / f"{sample_id}{COUNTS_SUFFIX}"
    if not spot_path.is_file():
        raise NH2STError(f"{spot_path}: not found; sample {sample_id} is not in this {spec.name} download")
    if not counts_path.is_file():
        raise NH2STError(f"{counts_path}: not found; every sample of ST-spotfiles/ needs its counts in ST-cnts/")
    spots = _read_spots(spot_path)
    spot_ids, counts, missing = _read_counts(counts_path, genes, sample_id, allow_missing_genes)

    row_of = pd.Series(np.arange(len(spot_ids)), index=spot_ids)
    has_counts = spots.index.isin(spot_ids)
    if not has_counts.any():
        raise NH2STError(f"{counts_path}: none of its spot ids (e.g. {', '.join(spot_ids[:3])}) match the grid ids "
                         f"of {spot_path.name} (e.g. {', '.join(spots.index[:3])}); the parquet index must be "
                         "the spot id '<x>x<y>'")
    dropped = int((~has_counts).sum())
    if dropped:
        warnings.warn(f"{spot_path}: {dropped} of {len(spots)} spots have no counts in {counts_path.name} "
                      "and were dropped", stacklevel=2)
    spots = spots[has_counts]
    counts = counts[row_of[spots.index].to_numpy()]

    image = image_path(spec, root, sample_id)
    slide = open_slide(image)
    check_inside(slide, spots[["pixel_x", "pixel_y"]].to_numpy(), image, spot_path)
    return Sample(id=sample_id, slide=slide, pixel_xy=spots[["pixel_x", "pixel_y"]].to_numpy(),
                  grid_xy=spots[["x", "y"]].to_numpy(), barcodes=spots.index.to_numpy(), counts=counts,
                  genes=list(genes), source=str(spot_path),
                  meta={"dataset": spec.name, "image": str(image), "counts_file": str(counts_path),
                        "patient": sample_id.split("_")[0],   # <patient>_<section> / <patient>_ST_rep<r>
                        "mpp": slide.mpp, "dropped_spots_without_counts": dropped,
                        "counts_without_spot": int(len(spot_ids) - len(spots)), "missing_genes": missing})
