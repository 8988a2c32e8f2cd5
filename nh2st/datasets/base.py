"""The common Sample every dataset reader returns; format quirks stay in the readers."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nh2st.errors import NH2STError
from nh2st.slide import Slide, at_paper_resolution


@dataclass
class Sample:
    """One tissue section: a lazy slide plus N spots with coordinates and raw counts.

    pixel_xy  (N, 2) float64  level-0 pixel centre, x = column, y = row
    grid_xy   (N, 2) int64    array/grid ids (x, y) used by the 3x3 smoothing stencil
    barcodes  (N,)   str      spot ids as in the source
    counts    (N, G) float32  raw counts of `genes`, in gene-list order
    Spots are kept in (grid y, grid x) order, the paper's row-major spot index.
    """

    id: str
    slide: Slide
    pixel_xy: np.ndarray
    grid_xy: np.ndarray
    barcodes: np.ndarray
    counts: np.ndarray
    genes: list[str]
    source: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.barcodes)
        self.pixel_xy = np.asarray(self.pixel_xy, dtype=np.float64).reshape(-1, 2)
        self.grid_xy = np.asarray(self.grid_xy, dtype=np.int64).reshape(-1, 2)
        self.barcodes = np.asarray(self.barcodes, dtype=str)
        self.counts = np.asarray(self.counts, dtype=np.float32)
        if n == 0:
            raise NH2STError(f"{self.source}: sample {self.id} has no spots with both coordinates and counts")
        shapes = {"pixel_xy": len(self.pixel_xy), "grid_xy": len(self.grid_xy), "counts": len(self.counts)}
        for name, rows in shapes.items():
            if rows != n:
                raise NH2STError(f"{self.source}: {name} has {rows} rows but there are {n} barcodes")
        if self.counts.shape[1] != len(self.genes):
            raise NH2STError(f"{self.source}: counts have {self.counts.shape[1]} columns for {len(self.genes)} genes")
        if not np.isfinite(self.pixel_xy).all():
            raise NH2STError(f"{self.source}: sample {self.id} has spots without pixel coordinates (NaN)")
        validate_counts(self.counts, self.source, self.id)
        order = np.lexsort((self.grid_xy[:, 0], self.grid_xy[:, 1]))
        if not np.array_equal(order, np.arange(n)):
            self.pixel_xy, self.grid_xy = self.pixel_xy[order], self.grid_xy[order]
            self.barcodes, self.counts = self.barcodes[order], self.counts[order]

    @property
    def n_spots(self) -> int:
        return len(self.barcodes)


def validate_counts(counts: np.ndarray, source: str, sample_id: str) -> None:
    """Raise NH2STError naming the file if counts hold NaN/inf or negative values."""
    bad_rows = ~np.isfinite(counts).all(axis=1)
    if bad_rows.any():
        raise NH2STError(f"{source}: sample {sample_id} has NaN/inf counts in {int(bad_rows.sum())} spots; "
                         "raw counts must be finite, fix or drop those spots")
    neg_rows = (counts < 0).any(axis=1)
    if neg_rows.any():
        raise NH2STError(f"{source}: sample {sample_id} has negative counts in {int(neg_rows.sum())} spots; "
                         "nh2st needs raw (non-negative) counts, not normalised values")


def find_data_folder(root: Path, candidates: list[Path], folders: tuple[str, ...], what: str, hint: str) -> Path:
    """The first of `candidates` holding all `folders`; else an error listing every path looked for."""
    for folder in candidates:
        found = [name for name in folders if (folder / name).is_dir()]
        if len(found) == len(folders):
            return folder
        if found:
            missing = [name for name in folders if name not in found]
            raise NH2STError(f"{folder}: has {', '.join(found)} but not {', '.join(missing)}; "
                             f"{what} needs all of {', '.join(folders)}")
    looked = ", ".join(str(folder / name) for folder in candidates for name in folders)
    raise NH2STError(f"{root}: no data found; looked for {looked}; pass --data-root pointing at {hint}")


def check_inside(slide, pixel_xy: np.ndarray, image: Path, spot_path: Path) -> None:
    """Every spot centre must lie on the image, else the image is not the one the spots were placed on."""
    outside = ((pixel_xy < 0) | (pixel_xy >= np.array([slide.width, slide.height]))).any(axis=1)
    if outside.any():
        reach = pixel_xy.max(axis=0)
        raise NH2STError(f"{image}: image is {slide.width}x{slide.height} px but {int(outside.sum())} spot centre(s) "
                         f"of {spot_path.name} lie outside it (up to x={reach[0]:.0f}, y={reach[1]:.0f}); "
                         "use the full-resolution image the spot coordinates were made for")


def patch_rule(spec, slide: Slide, mpp: float | None = None) -> tuple[Slide, dict]:
    """(slide to crop, the field-of-view rule as recorded in the store's sample info).

    The paper's datasets are cropped at native resolution, as the paper does; the user's own
    (visium, hest) crop the paper's 112 µm field (nh2st.slide.at_paper_resolution). `mpp`
    overrides the slide's own µm per pixel. The slide is closed if the rule cannot be applied.
    """
    if spec.paper:
        used = mpp or slide.mpp
        return slide, {"rule": "native", "slide_mpp": used, "reason": "a paper dataset, cropped as in the paper"}
    try:
        return at_paper_resolution(slide, mpp)
    except NH2STError:
        slide.close()
        raise
