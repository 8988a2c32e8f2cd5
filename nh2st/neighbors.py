"""Spatial neighbour index: the k nearest spots by pixel distance, the spot itself first."""

import numpy as np

from nh2st.paper import NEIGHBORS_K


def knn_index(pixel_xy: np.ndarray, k: int = NEIGHBORS_K, block: int = 2048) -> np.ndarray:
    """(N, 2) pixel centres -> (N, k) int32 indices of the k nearest spots, self first.

    Ties are broken by spot index (stable sort), as `argsort(dist)[:k]` in the paper's code
    but deterministic. With fewer than k spots, rows are padded with the spot itself.
    Computed in blocks so memory stays O(block * N).
    """
    xy = np.asarray(pixel_xy, dtype=np.float64)
    n = len(xy)
    out = np.empty((n, k), dtype=np.int32)
    take = min(k, n)
    wide = min(n, take + 16)  # candidates per row: the nearest plus room for ties at the k-th distance
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        d2 = np.square(xy[rows, None, 0] - xy[None, :, 0])
        d2 += np.square(xy[rows, None, 1] - xy[None, :, 1])
        d2[np.arange(len(rows)), rows] = -1.0  # self first even if another spot shares its centre
        # = argsort(d2, stable)[:, :take] without sorting whole rows: sort `wide` candidates by
        # (distance, index); exact unless a row has more ties at its k-th distance than fit
        candidates = np.argpartition(d2, wide - 1, axis=1)[:, :wide] if wide < n else np.tile(np.arange(n), (len(rows), 1))
        distances = np.take_along_axis(d2, candidates, axis=1)
        order = np.take_along_axis(candidates, np.lexsort((candidates, distances), axis=1)[:, :take], axis=1)
        kth = np.take_along_axis(d2, order[:, -1:], axis=1)
        short = np.flatnonzero((d2 <= kth).sum(axis=1) > (distances <= kth).sum(axis=1))
        if len(short):
            order[short] = np.argsort(d2[short], axis=1, kind="stable")[:, :take]
        out[rows, :take] = order
        out[rows, take:] = rows[:, None]
    return out
