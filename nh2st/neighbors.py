"""Spatial neighbour index: the k nearest spots by pixel distance, the spot itself first."""

import numpy as np


def knn_index(pixel_xy: np.ndarray, k: int = 9, block: int = 2048) -> np.ndarray:
    """(N, 2) pixel centres -> (N, k) int32 indices of the k nearest spots, self first.

    Ties are broken by spot index (stable sort), as `argsort(dist)[:k]` in the paper's code
    but deterministic. With fewer than k spots, rows are padded with the spot itself.
    Computed in blocks so memory stays O(block * N).
    """
    xy = np.asarray(pixel_xy, dtype=np.float64)
    n = len(xy)
    out = np.empty((n, k), dtype=np.int32)
    take = min(k, n)
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        d2 = ((xy[rows, None, :] - xy[None, :, :]) ** 2).sum(-1)
        d2[np.arange(len(rows)), rows] = -1.0  # self first even if another spot shares its centre
        order = np.argsort(d2, axis=1, kind="stable")[:, :take]
        out[rows, :take] = order
        out[rows, take:] = rows[:, None]
    return out
