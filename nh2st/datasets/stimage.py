"""STimage-1K4M legacy-ST slides: PCW (Asp et al., fetal heart) and Mouse (Ståhl et al., olfactory bulb).

    <root>/ST/coord/<slide>_coord.csv      ",yaxis,xaxis,r": spot id, pixel ROW, pixel COLUMN, radius px
    <root>/ST/gene_exp/<slide>_count.csv   ",GENE1,GENE2,...": spot id, raw counts per gene symbol
    <root>/ST/image/<slide>.png            named .png, bytes may be JPEG, TIFF or PNG (read by content)

`root` may be the STimage-1K4M folder or its ST/ subfolder. Spot ids are "<slide>_<suffix>":
PCW suffix "<k>x<x>x<y>" (sample number, grid x, grid y; the last two tokens are kept), Mouse
suffix "<fx>x<fy>" with decimals (e.g. "16.92x9.015"), rounded to the nearest int as the paper
does. The grid id "<x>x<y>" joins the two tables; two spots that round to the same id are an
error (the paper does not guard this). Slides are matched by exact name, never by substring
(Rep1 is not Rep10).
"""

import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from nh2st.datasets.base import Sample, check_inside, find_data_folder, validate_counts
from nh2st.errors import NH2STError
from nh2st.expression import select_genes
from nh2st.slide import open_slide

FOLDERS = ("coord", "gene_exp", "image")
COORD_SUFFIX = "_coord.csv"
COUNT_SUFFIX = "_count.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# The paper selects a dataset's slides by this string in the coord file name.
DATATYPE = {"pcw": "PCW", "mouse": "Mouse"}
# Legacy ST spots are 100 µm across, so µm/px ≈ 100 / (2 r).
SPOT_DIAMETER_UM = 100.0


def resolve_root(root: Path) -> Path:
    """The folder holding coord/, gene_exp/, image/: `root/ST` or `root` itself."""
    return find_data_folder(root, [root / "ST", root], FOLDERS, "STimage-1K4M's ST/ folder",
                            "the STimage-1K4M folder (or its ST/ subfolder)")


def find_samples(spec, root: Path) -> list[str]:
    """Slides of the dataset: coord files whose name contains PCW / Mouse, minus `_coord.csv`, sorted."""
    folder = resolve_root(Path(root)) / "coord"
    datatype = DATATYPE[spec.name]
    return sorted(p.name[: -len(COORD_SUFFIX)] for p in folder.iterdir()
                  if p.is_file() and p.name.endswith(COORD_SUFFIX) and datatype in p.name)


def image_path(base: Path, slide: str) -> Path:
    """`image/<slide>.png`, else the one file whose stem is exactly `slide`."""
    folder = base / "image"
    exact = folder / f"{slide}.png"
    if exact.is_file():
        return exact
    matches = [p for p in sorted(folder.iterdir()) if p.is_file() and p.stem == slide
               and p.suffix.lower() in IMAGE_SUFFIXES]
    if not matches:
        raise NH2STError(f"{exact}: not found; every slide of coord/ needs its image in image/")
    if len(matches) > 1:
        raise NH2STError(f"{folder}: {len(matches)} images for slide {slide} "
                         f"({', '.join(p.name for p in matches)}); keep exactly one")
    return matches[0]


def grid_ids(raw_ids, dataset: str, path: Path) -> np.ndarray:
    """(N, 2) int64 grid (x, y) from STimage spot ids (see module doc); NH2STError naming `path`."""
    expected = {"pcw": "<k>x<x>x<y>", "mouse": "<x>x<y> (decimals allowed)"}[dataset]
    allowed_tokens = {"pcw": (2, 3), "mouse": (2,)}[dataset]
    out = np.empty((len(raw_ids), 2), dtype=np.int64)
    for i, raw in enumerate(raw_ids):
        tokens = str(raw).rsplit("_", 1)[-1].split("x")
        try:
            if len(tokens) not in allowed_tokens:
                raise ValueError
            x, y = (float(t) for t in tokens[-2:])
            if not (np.isfinite(x) and np.isfinite(y)):
                raise ValueError
        except ValueError:
            raise NH2STError(f"{path}: spot id {str(raw)!r} (data row {i + 1}) does not end in "
                             f"_{expected}; is this a {dataset} slide?") from None
        out[i] = np.rint(x), np.rint(y)
    return out


def _keyed(raw_ids, dataset: str, path: Path) -> tuple[np.ndarray, pd.Index]:
    """Grid coords and "<x>x<y>" keys of `raw_ids`; two ids rounding to one key are an error."""
    grid = grid_ids(raw_ids, dataset, path)
    keys = pd.Index([f"{x}x{y}" for x, y in grid])
    if keys.has_duplicates:
        key = keys[keys.duplicated()][0]
        clash = [str(r) for r, k in zip(raw_ids, keys) if k == key]
        raise NH2STError(f"{path}: spot ids {', '.join(clash)} all give grid id {key} (after rounding); "
                         "each spot needs its own grid position")
    return grid, keys


def _read_coords(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise NH2STError(f"{path}: not a readable coordinate csv ({exc.__class__.__name__}); re-download it") from None
    absent = [c for c in ("yaxis", "xaxis") if c not in table.columns]
    if absent:
        raise NH2STError(f"{path}: missing column(s) {', '.join(absent)}; expected header ',yaxis,xaxis,r'")
    coords = table[[c for c in ("yaxis", "xaxis", "r") if c in table.columns]].apply(pd.to_numeric, errors="coerce")
    bad = coords[["yaxis", "xaxis"]].isna().any(axis=1).to_numpy()
    if bad.any():
        raise NH2STError(f"{path}: {int(bad.sum())} spot(s) with empty or non-numeric yaxis/xaxis "
                         f"(first: {table.index[bad][0]}); fix the file")
    return coords


def _read_counts(path: Path, genes: list[str], sample_id: str, allow_missing_genes: bool):
    """Count csv -> (raw spot ids, (N, G) float32 counts in gene order, missing genes); reads only `genes`."""
    try:
        with open(path, newline="") as handle:
            header = next(csv.reader(handle))
    except (OSError, StopIteration, UnicodeDecodeError, csv.Error) as exc:
        raise NH2STError(f"{path}: not a readable count csv ({exc.__class__.__name__}); re-download it") from None
    index, missing = select_genes(header[1:], genes, sample_id, str(path), allow_missing_genes)
    columns = [0] + [int(i) + 1 for i in index if i >= 0]
    try:
        table = pd.read_csv(path, usecols=columns, dtype={header[0] or "Unnamed: 0": str})
    except (pd.errors.ParserError, ValueError) as exc:
        raise NH2STError(f"{path}: not a readable count csv ({exc.__class__.__name__}); re-download it") from None
    raw_ids = table.iloc[:, 0].astype(str).to_numpy()
    chosen = [header[i] for i in columns[1:]]
    try:
        values = table[chosen].to_numpy(dtype=np.float32)
    except (TypeError, ValueError):
        raise NH2STError(f"{path}: non-numeric values in the gene columns; counts must be numbers") from None
    counts = np.zeros((len(table), len(genes)), dtype=np.float32)
    counts[:, index >= 0] = values
    validate_counts(counts, str(path), sample_id)
    return raw_ids, counts, missing


def read_gene_table(spec, root: Path, sample_id: str):
    """(every gene column, raw counts of every spot of the count csv) of one slide, for --genes hvg/heg."""
    path = resolve_root(Path(root)) / "gene_exp" / f"{sample_id}{COUNT_SUFFIX}"
    if not path.is_file():
        raise NH2STError(f"{path}: not found; every slide of coord/ needs its counts in gene_exp/")
    try:
        with open(path, newline="") as handle:
            names = list(dict.fromkeys(next(csv.reader(handle))[1:]))
    except (OSError, StopIteration, UnicodeDecodeError, csv.Error) as exc:
        raise NH2STError(f"{path}: not a readable count csv ({exc.__class__.__name__}); re-download it") from None
    return names, _read_counts(path, names, sample_id, False)[1]


def load_sample(spec, root: Path, sample_id: str, genes: list[str], allow_missing_genes: bool = False) -> Sample:
    """One STimage-1K4M slide: spots of the coord file that have counts, in (y, x) order."""
    base = resolve_root(Path(root))
    coord_path = base / "coord" / f"{sample_id}{COORD_SUFFIX}"
    count_path = base / "gene_exp" / f"{sample_id}{COUNT_SUFFIX}"
    if not coord_path.is_file():
        raise NH2STError(f"{coord_path}: not found; slide {sample_id} is not in this STimage-1K4M download")
    if not count_path.is_file():
        raise NH2STError(f"{count_path}: not found; every slide of coord/ needs its counts in gene_exp/")
    coords = _read_coords(coord_path)
    grid, keys = _keyed(coords.index, spec.name, coord_path)
    raw_count_ids, counts, missing = _read_counts(count_path, genes, sample_id, allow_missing_genes)
    _, count_keys = _keyed(raw_count_ids, spec.name, count_path)

    has_counts = keys.isin(count_keys)
    if not has_counts.any():
        raise NH2STError(f"{count_path}: none of its spot ids (e.g. {', '.join(raw_count_ids[:2])}) match those of "
                         f"{coord_path.name} (e.g. {', '.join(map(str, coords.index[:2]))})")
    dropped = int((~has_counts).sum())
    if dropped:
        warnings.warn(f"{coord_path}: {dropped} of {len(keys)} spots have no counts in {count_path.name} "
                      "and were dropped", stacklevel=2)
    rows = count_keys.get_indexer(keys[has_counts])
    pixel_xy = coords[["xaxis", "yaxis"]].to_numpy(dtype=np.float64)[has_counts]  # file order: y before x

    image = image_path(base, sample_id)
    slide = open_slide(image)
    check_inside(slide, pixel_xy, image, coord_path)
    radius = float(np.nanmedian(coords["r"])) if "r" in coords.columns and coords["r"].notna().any() else None
    mpp = slide.mpp if slide.mpp else (SPOT_DIAMETER_UM / (2 * radius) if radius else None)
    return Sample(id=sample_id, slide=slide, pixel_xy=pixel_xy, grid_xy=grid[has_counts],
                  barcodes=np.asarray(coords.index.astype(str))[has_counts], counts=counts[rows],
                  genes=list(genes), source=str(coord_path),
                  meta={"dataset": spec.name, "image": str(image), "counts_file": str(count_path),
                        "spot_radius_px": radius, "mpp": mpp,
                        "mpp_source": "image" if slide.mpp else ("spot radius" if radius else None),
                        "dropped_spots_without_counts": dropped,
                        "counts_without_spot": int(len(count_keys) - has_counts.sum()),
                        "missing_genes": missing})

