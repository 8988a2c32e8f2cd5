"""Small HEST-1k samples in the real on-disk format, for tests.

`make_hest_sample` writes st/<id>.h5ad (anndata: sparse float32 raw counts, HEST obs columns and QC
columns, gene-symbol var_names in an order that is not the list order, the uns['spatial'] block),
wsis/<id>.tif (tiled pyramidal RGB TIFF with resolution tags, written by tifffile through
`nh2st.datasets.demo.write_hest_sample`), metadata/<id>.json (with bare NaN tokens) and optionally
patches/<id>.h5 (img / coords / barcode as HEST's patcher writes them). Its slide is a "coordinate
image": every pixel's colour encodes its own (x, y), so a test can check any crop exactly.

It returns an `Expected` holding what a correct reader must produce, in (grid y, grid x) order.
"""

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from scipy import sparse

from nh2st.datasets.demo import write_hest_sample

EXTRA_GENES = ["MT-CO1", "MT-ND1", "XIST"]


def coordinate_pixels(x, y) -> np.ndarray:
    """(..., 3) uint8 colour of level-0 pixel (x, y): R = x mod 256, G = y mod 256, B = high bits."""
    x, y = np.broadcast_arrays(np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64))
    return np.stack([x & 255, y & 255, ((x >> 8) & 15) | (((y >> 8) & 15) << 4)], axis=-1).astype(np.uint8)


def coordinate_image(width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 image whose pixels encode their coordinates (unique up to 4096 px)."""
    return coordinate_pixels(np.arange(width)[None, :], np.arange(height)[:, None])


def expected_crop(cx: float, cy: float, width: int, height: int, size: int = 224) -> np.ndarray:
    """What Slide.crop must return on a coordinate image: window at floor(centre) - size//2, white outside."""
    x0, y0 = int(np.floor(cx)) - size // 2, int(np.floor(cy)) - size // 2
    xs, ys = np.arange(x0, x0 + size)[None, :], np.arange(y0, y0 + size)[:, None]
    out = coordinate_pixels(xs, ys)
    outside = (xs < 0) | (xs >= width) | (ys < 0) | (ys >= height)
    out[outside] = 255
    return out


@dataclass
class Expected:
    sample_id: str
    barcodes: np.ndarray        # (N,) in-tissue barcodes, (grid y, grid x) order
    pixel_xy: np.ndarray        # (N, 2) (pxl_col_in_fullres, pxl_row_in_fullres)
    grid_xy: np.ndarray         # (N, 2) (array_col, array_row)
    counts: np.ndarray          # (N, G) float32 in the order of `genes`
    width: int
    height: int
    paths: dict


def make_hest_sample(root, sample_id: str, genes: list[str], *, n_rows: int = 5, per_row: int = 6,
                     seed: int = 0, dense: bool = False, off_tissue: int = 3, drop_columns=(),
                     counts_hook=None, obs_hook=None, pyramid: str = "subifds", compression: str = "zlib",
                     patches: bool = False, metadata: dict | None = None) -> Expected:
    """Write one HEST-format sample under `root` and return what a reader must give back.

    Spots lie on a Visium hex grid (array_col of one row 2 apart, odd rows shifted) with fractional
    pixel centres; the slide is wider than tall so swapped x/y would show. `off_tissue` spots get
    in_tissue = 0. `drop_columns` removes obs columns; `counts_hook(X_dense)` and `obs_hook(obs)`
    may corrupt the data for bad-input tests; `metadata` adds keys to metadata/<id>.json.
    """
    rng = np.random.default_rng(seed)
    array_row = np.repeat(np.arange(n_rows), per_row) + 10
    array_col = 2 * np.tile(np.arange(per_row), n_rows) + array_row % 2 + 20
    x = 120.0 + 50.0 * (array_col - 20) + rng.uniform(0.05, 0.95, len(array_row))
    y = 100.0 + 43.3 * (array_row - 10) + rng.uniform(0.05, 0.95, len(array_row))
    width, height = int(x.max()) + 90, int(y.max()) + 60
    n = len(array_row)
    barcodes = np.array([f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n)])
    in_tissue = np.ones(n, dtype=np.int64)
    in_tissue[rng.choice(n, off_tissue, replace=False)] = 0

    var_names = list(genes) + EXTRA_GENES
    var_names = [var_names[i] for i in rng.permutation(len(var_names))]
    counts = rng.poisson(rng.gamma(1.0, 4.0, (n, len(var_names)))).astype(np.float32)
    if counts_hook is not None:
        counts = counts_hook(counts)

    order = rng.permutation(n)  # h5ad rows are not in grid order
    obs = pd.DataFrame({"in_tissue": in_tissue, "array_row": array_row, "array_col": array_col,
                        "pxl_col_in_fullres": x, "pxl_row_in_fullres": y}, index=pd.Index(barcodes)).iloc[order]
    obs = obs.drop(columns=list(drop_columns))
    if obs_hook is not None:
        obs = obs_hook(obs)
    X = counts[order] if dense else sparse.csr_matrix(counts[order])
    metadata = {"id": sample_id, "st_technology": "Visium", "pixel_size_um_estimated": 0.5,
                "magnification": "20x", "oncotree_code": float("nan"), "treatment_comment": float("nan"),
                "spot_diameter": 55.0, "inter_spot_dist": 100.0, **(metadata or {})}
    paths = write_hest_sample(root, sample_id, image=coordinate_image(width, height), mpp=0.5, obs=obs, X=X,
                              var_names=var_names, metadata=metadata, compression=compression, pyramid=pyramid)
    if patches:
        paths["patches"] = write_patches_h5(Path(root) / "patches" / f"{sample_id}.h5", barcodes, x, y, width, height)

    keep = np.flatnonzero(in_tissue == 1)
    keep = keep[np.lexsort((array_col[keep], array_row[keep]))]
    column = {name: i for i, name in enumerate(var_names)}
    return Expected(sample_id=sample_id, barcodes=barcodes[keep], pixel_xy=np.stack([x, y], 1)[keep],
                    grid_xy=np.stack([array_col, array_row], 1)[keep],
                    counts=counts[keep][:, [column[g] for g in genes]], width=width, height=height, paths=paths)


def write_patches_h5(path: Path, barcodes, x, y, width: int, height: int, size: int = 32) -> Path:
    """patches/<id>.h5 as HEST writes it: img (N, P, P, 3) uint8, coords (N, 2) top-left (x, y),
    barcode (N, 1) variable-length UTF-8; spots whose patch leaves the slide are dropped."""
    left, top = np.floor(x).astype(int) - size // 2, np.floor(y).astype(int) - size // 2
    inside = (left >= 0) & (top >= 0) & (left + size <= width) & (top + size <= height)
    image = coordinate_image(width, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        img = f.create_dataset("img", data=np.stack([image[t:t + size, l:l + size]
                                                     for l, t in zip(left[inside], top[inside])]))
        img.attrs.update({"patch_size_src": size, "patch_size_target": size, "downsample": 1.0,
                          "pixel_size": 0.5, "name": path.stem})
        f.create_dataset("coords", data=np.stack([left[inside], top[inside]], 1))
        f.create_dataset("barcode", data=np.asarray(barcodes)[inside][:, None].astype(object),
                         dtype=h5py.string_dtype("utf-8"))
    return path
