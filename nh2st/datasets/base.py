"""The common Sample every dataset reader returns; format quirks stay in the readers."""

from dataclasses import dataclass, field

import numpy as np

from nh2st.errors import NH2STError
from nh2st.slide import Slide


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
