"""Tiny STNet, Skin and STimage-1K4M (PCW, Mouse) downloads in their real on-disk formats.

Each writer builds a few spots on a small grid, paints every spot centre in its own colour on a
tiny image (so a test can check that x is the column and y the row), writes the files exactly as
the real downloads lay them out, and returns what a correct reader must produce:

    Expected(ids, grid_xy, pixel_xy, counts, colours, dropped, image)

ordered by (grid y, grid x), counts in the order of the `genes` passed in. Spots listed in the
coordinate file but absent from the counts (`n_without_counts`) are interleaved with the others,
so a reader that pairs rows by position instead of by id gets the wrong counts.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from PIL import Image

PITCH = 24          # px between grid positions
MARGIN = 30         # px from the image edge to grid position 0
DOT = 4             # half-size of the coloured square painted at each spot centre
EXTRA_GENES = ["ZZ_EXTRA1", "ZZ_EXTRA2", "ZZ_EXTRA3"]

SKIN_GSM = {"P2_ST_rep1": "GSM4284316", "P2_ST_rep2": "GSM4284317", "P2_ST_rep3": "GSM4284318",
            "P5_ST_rep1": "GSM4284319", "P5_ST_rep2": "GSM4284320", "P5_ST_rep3": "GSM4284321",
            "P9_ST_rep1": "GSM4284322", "P9_ST_rep2": "GSM4284323", "P9_ST_rep3": "GSM4284324",
            "P10_ST_rep1": "GSM4284325", "P10_ST_rep2": "GSM4284326", "P10_ST_rep3": "GSM4284327"}


@dataclass
class Expected:
    ids: list[str]              # barcodes a reader must return
    grid_xy: np.ndarray         # (N, 2) int
    pixel_xy: np.ndarray        # (N, 2) float, x = column
    counts: np.ndarray          # (N, G) float32 in the order of `genes`
    colours: np.ndarray         # (N, 3) uint8 painted at each spot centre
    dropped: int                # coordinate rows without counts
    image: Path


def _layout(seed: int, nx: int, ny: int, n_without_counts: int):
    """Grid (x, y) ints in file order (shuffled), pixel centres, colours, and a has-counts mask."""
    rng = np.random.default_rng(seed)
    grid = np.array([(x, y) for y in range(1, ny + 1) for x in range(1, nx + 1)], dtype=np.int64)
    grid = grid[rng.permutation(len(grid))]
    pixel = MARGIN + PITCH * (grid - 1) + rng.uniform(-2.0, 2.0, grid.shape)
    colours = rng.integers(40, 216, (len(grid), 3)).astype(np.uint8)
    has_counts = np.ones(len(grid), dtype=bool)
    has_counts[1: 1 + 2 * n_without_counts: 2] = False   # interleaved, never at the end only
    return rng, grid, pixel, colours, has_counts


def _image(pixel: np.ndarray, colours: np.ndarray, width: int, height: int) -> np.ndarray:
    image = np.full((height, width, 3), 245, dtype=np.uint8)
    for (x, y), colour in zip(pixel.astype(int), colours):
        image[y - DOT: y + DOT + 1, x - DOT: x + DOT + 1] = colour
    return image


def _image_size(pixel: np.ndarray) -> tuple[int, int]:
    return int(pixel[:, 0].max()) + MARGIN, int(pixel[:, 1].max()) + MARGIN + 7   # not square


def _counts(rng, n: int, genes: list[str]) -> pd.DataFrame:
    """Raw integer counts for `genes` + extra genes, columns in a shuffled order."""
    columns = list(genes) + EXTRA_GENES
    values = rng.poisson(3.0, (n, len(columns))).astype(np.int64)
    frame = pd.DataFrame(values, columns=columns)
    return frame[[columns[i] for i in rng.permutation(len(columns))]]


def _expected(grid, pixel, colours, has_counts, counts: pd.DataFrame, ids, genes, image) -> Expected:
    keep = np.flatnonzero(has_counts)
    order = keep[np.lexsort((grid[keep, 0], grid[keep, 1]))]
    return Expected(ids=[ids[i] for i in order], grid_xy=grid[order], pixel_xy=pixel[order],
                    counts=counts.loc[order, list(genes)].to_numpy(np.float32), colours=colours[order],
                    dropped=int((~has_counts).sum()), image=image)


def write_legacy_sample(root: Path, dataset: str, sample_id: str, genes: list[str], nx: int = 4, ny: int = 3,
                        n_without_counts: int = 1, seed: int = 0, image_format: str | None = None) -> Expected:
    """One STNet (`dataset="stnet"`) or Skin (`"skin"`) section in TRIPLEX's layout under `root`."""
    rng, grid, pixel, colours, has_counts = _layout(seed, nx, ny, n_without_counts)
    for folder in ("ST-imgs", "ST-spotfiles", "ST-cnts"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = [f"{x}x{y}" for x, y in grid]
    if dataset == "stnet":
        # leading (pandas index) column, x/y as floats that round to the grid ints
        spots = pd.DataFrame({"x": grid[:, 0] + rng.uniform(-0.2, 0.2, len(grid)),
                              "y": grid[:, 1] + rng.uniform(-0.2, 0.2, len(grid)),
                              "pixel_x": pixel[:, 0], "pixel_y": pixel[:, 1]})
        spots.to_csv(root / "ST-spotfiles" / f"{sample_id}_selection.tsv", sep="\t")
    else:
        # ST Spot Detector columns: x y new_x new_y pixel_x pixel_y selected
        spots = pd.DataFrame({"x": grid[:, 0], "y": grid[:, 1],
                              "new_x": grid[:, 0] + rng.uniform(-0.2, 0.2, len(grid)),
                              "new_y": grid[:, 1] + rng.uniform(-0.2, 0.2, len(grid)),
                              "pixel_x": pixel[:, 0], "pixel_y": pixel[:, 1], "selected": 1})
        spots.to_csv(root / "ST-spotfiles" / f"{sample_id}_selection.tsv", sep="\t", index=False)

    counts = _counts(rng, len(grid), genes)
    on_disk = counts[has_counts].copy()
    on_disk.index = [ids[i] for i in np.flatnonzero(has_counts)]
    # one spot under the tissue that the selection file does not list: the join must ignore it
    on_disk.loc[f"{nx + 5}x{ny + 5}"] = 7
    on_disk.iloc[::-1].to_parquet(root / "ST-cnts" / f"{sample_id}_sub.parquet")

    width, height = _image_size(pixel)
    pixels = _image(pixel, colours, width, height)
    image_format = image_format or ("tif" if dataset == "stnet" else "jpg")
    stem = f"HE_{sample_id}" if dataset == "stnet" else f"{SKIN_GSM.get(sample_id, 'GSM9999999')}_{sample_id}"
    image = root / "ST-imgs" / f"{stem}.{image_format}"
    if image_format == "tif":
        tifffile.imwrite(image, pixels, photometric="rgb", tile=(32, 32))
    else:
        Image.fromarray(pixels).save(image, format="JPEG", quality=95)
    np.save(root / f"genes_{dataset}.npy", np.array(genes, dtype=object), allow_pickle=True)
    return _expected(grid, pixel, colours, has_counts, counts, ids, genes, image)


def pcw_slide(stage: str = "6.5PCW", n: int = 1) -> str:
    return f"Human_Heart_Asp_12122019_ST_ST_Sample_{stage}_{n}"


def mouse_slide(rep: int = 1) -> str:
    return f"Mouse_OlfactoryBulb_Stahl_07012016_ST_Rep{rep}"


def write_stimage_slide(root: Path, dataset: str, slide: str, genes: list[str], nx: int = 4, ny: int = 3,
                        n_without_counts: int = 1, seed: int = 0, image_bytes: str = "PNG") -> Expected:
    """One PCW (`dataset="pcw"`) or Mouse (`"mouse"`) slide under `root`/ST/ (root = STimage-1K4M/).

    `image_bytes`: the format actually written into `image/<slide>.png` (PNG, JPEG or TIFF).
    """
    rng, grid, pixel, colours, has_counts = _layout(seed, nx, ny, n_without_counts)
    base = root / "ST"
    for folder in ("coord", "gene_exp", "image"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    if dataset == "pcw":
        ids = [f"{slide}_{seed % 19 + 1}x{x}x{y}" for x, y in grid]
    else:   # decimal array positions that round to the grid ints, e.g. "..._Rep1_16.92x9.015"
        fx = grid[:, 0] + rng.uniform(-0.3, 0.3, len(grid))
        fy = grid[:, 1] + rng.uniform(-0.3, 0.3, len(grid))
        ids = [f"{slide}_{a:.2f}x{b:.3f}" for a, b in zip(fx, fy)]
    radius = 9.5
    coords = pd.DataFrame({"yaxis": pixel[:, 1], "xaxis": pixel[:, 0], "r": radius}, index=ids)
    coords.to_csv(base / "coord" / f"{slide}_coord.csv")          # header ",yaxis,xaxis,r"

    counts = _counts(rng, len(grid), genes)
    on_disk = counts[has_counts].astype(np.float64).copy()
    on_disk.index = [ids[i] for i in np.flatnonzero(has_counts)]
    extra = f"{slide}_1x{nx + 5}x{ny + 5}" if dataset == "pcw" else f"{slide}_{nx + 5}.10x{ny + 5}.200"
    on_disk.loc[extra] = 7.0   # counts of a spot the coordinate file lacks: the join must ignore it
    on_disk.iloc[::-1].to_csv(base / "gene_exp" / f"{slide}_count.csv")   # header ",GENE1,GENE2,..."

    width, height = _image_size(pixel)
    pixels = _image(pixel, colours, width, height)
    image = base / "image" / f"{slide}.png"
    if image_bytes == "TIFF":
        tifffile.imwrite(image, pixels, photometric="rgb")
    else:
        Image.fromarray(pixels).save(image, format=image_bytes, **({"quality": 95} if image_bytes == "JPEG" else {}))

    meta = root / "meta" / "meta_all_gene.csv"
    meta.parent.mkdir(exist_ok=True)
    row = pd.DataFrame([{"slide": slide, "species": "human" if dataset == "pcw" else "mouse",
                         "tissue": "heart" if dataset == "pcw" else "brain", "pmid": 0, "title": "", "abstract": "",
                         "keywords": "", "involve_cancer": False, "tech": "ST", "spot_num": len(grid),
                         "gene_num": len(genes) + len(EXTRA_GENES)}])
    row.to_csv(meta, mode="a", header=not meta.exists(), index=False)
    np.save(base / f"genes_{'PCW' if dataset == 'pcw' else 'Mouse'}.npy", np.array(genes, dtype=object),
            allow_pickle=True)
    return _expected(grid, pixel, colours, has_counts, counts, ids, genes, image)


def assert_sample_matches(sample, expected: Expected, colour_tolerance: int = 0) -> None:
    """A reader's Sample holds exactly the expected spots, counts and pixel positions."""
    assert sample.barcodes.tolist() == expected.ids
    np.testing.assert_array_equal(sample.grid_xy, expected.grid_xy)
    np.testing.assert_allclose(sample.pixel_xy, expected.pixel_xy)
    np.testing.assert_array_equal(sample.counts, expected.counts)
    assert sample.meta["dropped_spots_without_counts"] == expected.dropped
    # each spot's own colour sits at (pixel_x = column, pixel_y = row) of its own image
    for (x, y), colour in zip(sample.pixel_xy.astype(int), expected.colours):
        got = sample.slide.read_region(x - 1, y - 1, 3, 3).reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(got, colour, atol=colour_tolerance + 0.01)


def extract_and_compare(dataset: str, data_root: Path, store_path: Path, expected: dict[str, Expected]) -> None:
    """`run_extract` into a fresh store; every sample's arrays match what the fixture wrote."""
    import warnings

    from nh2st.expression import process_expression
    from nh2st.extract import run_extract
    from nh2st.neighbors import knn_index
    from nh2st.store import EmbeddingStore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)    # the dropped-spot warnings, tested elsewhere
        summary = run_extract(dataset, data_root=data_root, store_path=store_path, weights="random",
                              device="cpu", batch_size=8, workers=2, progress=False)
    assert [row["id"] for row in summary["samples"]] == sorted(expected)
    assert all(row["status"] == "extracted" for row in summary["samples"])
    store = EmbeddingStore.open(store_path)
    assert store.sample_ids() == sorted(expected) and store.meta.dataset == dataset
    for sample_id, exp in expected.items():
        got = store.read_sample(sample_id)
        n = len(exp.ids)
        assert got["barcodes"].tolist() == exp.ids
        np.testing.assert_array_equal(got["counts"], exp.counts)
        np.testing.assert_array_equal(got["grid_xy"], exp.grid_xy)
        np.testing.assert_allclose(got["pixel_xy"], exp.pixel_xy)
        np.testing.assert_allclose(got["targets"], process_expression(exp.counts, exp.grid_xy), rtol=1e-6)
        np.testing.assert_array_equal(got["neighbors"], knn_index(exp.pixel_xy, 9))
        assert got["features"].shape == (n, 512, 7, 7) and np.isfinite(got["features"]).all()
