"""Expression targets exactly as the paper computes them.

1. keep the dataset's genes, in list order (:func:`select_genes`);
2. per spot, divide by its sum over those genes and multiply by 10,000; ``log10(x + 1)``
   (:func:`normalize_log`, scprep 1.2.3 defaults);
3. replace each spot by the mean of itself and whichever of its 8 grid neighbours
   (x±1, y±1) exist (:func:`smooth_grid`). On a Visium hex grid only the 4 diagonal ids exist, as
   in the paper's code.
"""

import warnings

import numpy as np

from nh2st.errors import NH2STError

LIBRARY_SIZE = 10_000.0

# Every target lies in [0, log10(LIBRARY_SIZE + 1)]: log10(x + 1) of non-negative shares of
# LIBRARY_SIZE, and the grid smoothing averages such values. Predictions can be clipped to it.
TARGET_RANGE = (0.0, float(np.log10(LIBRARY_SIZE + 1.0)))

NORMALISATION = {
    "library_size": LIBRARY_SIZE,
    "library_over": "selected genes",
    "log": "log10(x+1)",
    "smoothing": "mean over existing grid ids x±1, y±1 (3x3 stencil incl. self)",
}


def select_genes(var_names, genes: list[str], sample_id: str, source: str,
                 allow_missing_genes: bool = False) -> tuple[np.ndarray, list[str]]:
    """Column index of each gene of `genes` in `var_names` (exact match), -1 where missing.

    A missing gene is an error naming it and the sample, unless `allow_missing_genes`, where
    the caller fills zeros and a warning names the genes.
    """
    position = {}
    for i, name in enumerate(map(str, var_names)):
        position.setdefault(name, i)
    index = np.array([position.get(g, -1) for g in genes], dtype=np.int64)
    missing = [g for g, i in zip(genes, index) if i < 0]
    if missing and not allow_missing_genes:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise NH2STError(f"{source}: sample {sample_id} lacks {len(missing)} of the {len(genes)} genes "
                         f"({shown}); pass --allow-missing-genes to fill them with zeros")
    if missing:
        warnings.warn(f"{source}: sample {sample_id}: {len(missing)} genes missing, filled with zeros: "
                      + ", ".join(missing[:10]), stacklevel=2)
    return index, missing


def take_genes(matrix, index: np.ndarray) -> np.ndarray:
    """Dense float32 (N, G) of the columns `index` of a dense or scipy-sparse matrix; -1 gives zeros."""
    present = index >= 0
    out = np.zeros((matrix.shape[0], len(index)), dtype=np.float32)
    if present.any():
        cols = matrix[:, index[present]]
        cols = cols.toarray() if hasattr(cols, "toarray") else np.asarray(cols)
        out[:, present] = cols
    return out


def normalize_log(counts: np.ndarray) -> np.ndarray:
    """(N, G) raw counts -> log10(counts / spot total * 10,000 + 1), float32; zero-sum spots stay 0."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    scale = np.divide(LIBRARY_SIZE, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log10(counts * scale + 1.0).astype(np.float32)


def smooth_grid(values: np.ndarray, grid_xy: np.ndarray) -> np.ndarray:
    """Mean of each spot and the spots at grid offsets (±1, ±1) that exist, float32.

    `grid_xy` (N, 2) integer grid ids (x, y); ids must be unique within a sample.
    """
    values = np.asarray(values, dtype=np.float64)
    grid_xy = np.asarray(grid_xy, dtype=np.int64)
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(grid_xy)}
    if len(lookup) != len(grid_xy):
        raise NH2STError("duplicate grid coordinates in one sample; each spot needs its own (x, y)")
    total = np.zeros_like(values)
    count = np.zeros((len(values), 1))
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            src = np.array([lookup.get((int(x) + dx, int(y) + dy), -1) for x, y in grid_xy])
            hit = src >= 0
            total[hit] += values[src[hit]]
            count[hit] += 1
    return (total / count).astype(np.float32)


def process_expression(counts: np.ndarray, grid_xy: np.ndarray) -> np.ndarray:
    """Raw counts -> the regression targets (normalised, log10, grid-smoothed)."""
    return smooth_grid(normalize_log(counts), grid_xy)
