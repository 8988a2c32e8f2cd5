"""Small Space Ranger output folders in the real on-disk formats, for tests.

`write_10x_h5` writes a feature-barcode matrix as the 10x HDF5 spec lays it out (group `matrix`:
barcodes, data, indices, indptr, shape = (features, barcodes) as CSC, and features/{id, name,
feature_type, genome, _all_tag_keys}; fixed-length byte strings). `make_visium_sample` writes a
whole `<root>/<id>/outs/` (matrix, either positions file version, scalefactors JSON, hires and
lowres PNGs) plus the full-resolution image next to it: a tiled BigTIFF coordinate image (every
pixel encodes its (x, y), so crops can be checked exactly) or a link to a real slide (the shared
Aperio SVS). It returns what a correct reader must produce, in (grid y, grid x) order.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from scipy import sparse

from hest_fixtures import coordinate_image

REPO = Path(__file__).resolve().parents[1]
SHARED_SVS = REPO.parent / "shared" / "reference" / "data" / "CMU-1-Small-Region.svs"   # 2220 x 2967, 0.499 µm/px
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def write_10x_h5(path, barcodes, ids, names, counts, feature_types=None) -> Path:
    """counts (barcodes x features) written as 10x's CSC (features x barcodes) HDF5 matrix."""
    counts = sparse.csc_matrix(np.asarray(counts).T.astype(np.int32))   # features x barcodes
    feature_types = feature_types or ["Gene Expression"] * len(ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fixed(values):
        values = [str(v).encode() for v in values]
        return np.array(values, dtype=f"S{max(len(v) for v in values)}")

    with h5py.File(path, "w") as f:
        f.attrs.update({"filetype": "matrix", "version": 2, "software_version": "spaceranger-2.1.0",
                        "chemistry_description": "Spatial 3' v1", "library_ids": np.array([b"lib"])})
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=fixed(barcodes))
        m.create_dataset("data", data=counts.data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=counts.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(counts.shape, dtype=np.int32))
        feats = m.create_group("features")
        feats.create_dataset("id", data=fixed(ids))
        feats.create_dataset("name", data=fixed(names))
        feats.create_dataset("feature_type", data=fixed(feature_types))
        feats.create_dataset("genome", data=fixed(["GRCh38"] * len(ids)))
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    return path


def write_bigtiff(path, image: np.ndarray, mpp: float | None) -> Path:
    """A tiled (not pyramidal) BigTIFF, resolution tags in pixels per cm when `mpp` is given."""
    options = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    tifffile.imwrite(path, image, bigtiff=True, tile=(128, 128), photometric="rgb", compression="zlib",
                     metadata=None, **options)
    return Path(path)


@dataclass
class VisiumExpected:
    sample_id: str
    outs: Path
    image: Path
    barcodes: np.ndarray      # (N,) in-tissue, (array_row, array_col) order
    pixel_xy: np.ndarray      # (N, 2) (pxl_col, pxl_row)
    grid_xy: np.ndarray       # (N, 2) (array_col, array_row)
    counts: np.ndarray        # (N, G) of `genes`
    all_counts: np.ndarray    # (N, F) every gene expression feature, in `names` order
    names: list[str]
    ids: list[str]
    width: int
    height: int


def make_visium_sample(root, sample_id: str, genes: list[str], *, positions: str = "csv", image: str = "bigtiff",
                       mpp: float | None = 0.5, n_rows: int = 4, per_row: int = 5, pitch: float = 60.0,
                       origin=(100.0, 90.0), seed: int = 0, extra_genes=("MT-CO1", "XIST"), counts=None,
                       hires_scale: float = 0.25, outs: bool = True) -> VisiumExpected:
    """One Space Ranger sample under `root`/<sample_id>/outs/ with the image next to outs/.

    positions: "csv" (>= 2.0, header) | "list" (1.x, no header) | "parquet". image: "bigtiff" (a
    coordinate image sized to the spots) | "svs" (a link to the shared Aperio file) | "none".
    Spots lie on a Visium hex grid; 2 extra barcodes are off tissue (in positions only, as the
    filtered matrix has only in-tissue barcodes), and the matrix holds one Antibody Capture feature
    the reader must drop. Matrix rows are shuffled against the positions' order.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / sample_id
    out_dir = folder / "outs" if outs else folder
    spatial = out_dir / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)

    array_row = np.repeat(np.arange(n_rows), per_row)
    array_col = 2 * np.tile(np.arange(per_row), n_rows) + array_row % 2
    x = origin[0] + pitch / 2 * array_col + rng.uniform(0.05, 0.95, len(array_row))
    y = origin[1] + pitch * 0.866 * array_row + rng.uniform(0.05, 0.95, len(array_row))
    n = len(array_row)
    barcodes = np.array([f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n)])
    off = np.array([f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(2)])

    names = list(genes) + list(extra_genes)
    names = [names[i] for i in rng.permutation(len(names))]
    ids = [f"ENSG{1000 + i:011d}" for i in range(len(names))]
    if counts is None:
        counts = rng.poisson(rng.gamma(1.0, 4.0, (n, len(names)))).astype(np.float32)
    counts = np.asarray(counts, dtype=np.float32)
    antibody = rng.poisson(50.0, (n, 1))
    order = rng.permutation(n)   # matrix order differs from the positions' order
    write_10x_h5(out_dir / "filtered_feature_bc_matrix.h5", barcodes[order], ids + ["CD3_TotalSeqB"],
                 names + ["CD3"], np.hstack([counts, antibody])[order],
                 ["Gene Expression"] * len(names) + ["Antibody Capture"])

    table = pd.DataFrame({"barcode": np.concatenate([barcodes, off]),
                          "in_tissue": np.r_[np.ones(n, int), np.zeros(2, int)],
                          "array_row": np.r_[array_row, [n_rows + 1, n_rows + 1]],
                          "array_col": np.r_[array_col, [1, 3]],
                          "pxl_row_in_fullres": np.r_[y, [5.0, 5.0]],
                          "pxl_col_in_fullres": np.r_[x, [5.0, 7.0]]})[POSITION_COLUMNS]
    table = table.iloc[rng.permutation(len(table))]
    if positions == "csv":
        table.to_csv(spatial / "tissue_positions.csv", index=False)
    elif positions == "list":
        table.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    elif positions == "parquet":
        table.to_parquet(spatial / "tissue_positions.parquet", index=False)
    else:
        raise ValueError(positions)

    if image == "svs":
        image_path = folder / f"{sample_id}.svs"
        os.symlink(SHARED_SVS, image_path)
        width, height = 2220, 2967
    elif image == "bigtiff":
        width, height = int(x.max() + pitch), int(y.max() + pitch)
        image_path = write_bigtiff(folder / f"{sample_id}.tif", coordinate_image(width, height), mpp)
    else:
        image_path, width, height = None, int(x.max() + pitch), int(y.max() + pitch)
    spot_diameter = 55.0 / (mpp or 0.5)
    scalefactors = {"spot_diameter_fullres": spot_diameter, "tissue_hires_scalef": hires_scale,
                    "fiducial_diameter_fullres": spot_diameter * 1.6, "tissue_lowres_scalef": hires_scale / 4,
                    "regist_target_img_scalef": hires_scale}
    (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    for name, scale in (("tissue_hires_image.png", hires_scale), ("tissue_lowres_image.png", hires_scale / 4)):
        Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), "white").save(spatial / name)

    keep = np.lexsort((array_col, array_row))
    column = {name: i for i, name in enumerate(names)}
    return VisiumExpected(sample_id=sample_id, outs=out_dir, image=image_path, barcodes=barcodes[keep],
                          pixel_xy=np.stack([x, y], 1)[keep], grid_xy=np.stack([array_col, array_row], 1)[keep],
                          counts=counts[keep][:, [column[g] for g in genes]], all_counts=counts[keep],
                          names=names, ids=ids, width=width, height=height)
