"""Scores of predicted against true expression, per gene, over spots.

All functions take ``pred`` and ``true`` as (N, G) arrays: N spots (rows), G genes (columns), in
the run's value space (normalised, log10, grid-smoothed targets). Everything is vectorised numpy
in float64.

Definitions (x = prediction, y = truth, i over spots, g over genes):

- per-gene PCC    r_g = sum_i (x_ig - mean_x_g)(y_ig - mean_y_g)
                        / sqrt(sum_i (x_ig - mean_x_g)^2 * sum_i (y_ig - mean_y_g)^2)
  A gene whose prediction or truth is constant over the spots (zero variance) has no PCC: r_g =
  NaN. NaN genes are reported (count and names) and left out of every mean below.
- mean PCC        mean of r_g over the genes with a finite r_g.
- R (the paper)   mean of the 50 highest finite r_g (all of them if fewer than 50 are finite).
                  The paper's code picks these 50 on the test fold itself, so R is optimistic by
                  construction; it is reported because it is the paper's headline number.
- R released      the released code's own computation, `nanmean(sorted(pcc, reverse=True)[:50])`.
                  It equals R when no gene's PCC is NaN. With a NaN (a gene constant in a test
                  fold) Python's sort, for which every comparison with NaN is false, leaves the
                  list only partly ordered, so its "top 50" may miss some of the best genes and
                  include worse ones. nh2st drops NaN first (R above); `--protocol paper` runs
                  report R_released beside it so the paper's numbers can be matched.
- HVG-50 PCC      mean of r_g over the 50 genes with the highest variance of the *training*
                  samples' targets (HEST-Bench's protocol: genes chosen without looking at the
                  test fold); NaN genes among them are left out and counted.
- MSE_g, MAE_g    mean_i (x_ig - y_ig)^2 and mean_i |x_ig - y_ig|; MSE and MAE = mean over genes
                  (equal to the mean over all N*G entries, as the paper's code computes it).

"Pooled" metrics concatenate the spots of all test slides of a fold before computing r_g (the
paper's and HEST-Bench's protocol); "per sample" metrics compute r_g within each slide.
"""

import math

import numpy as np

from nh2st.errors import NH2STError

TOP_K = 50


def _check_pair(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise NH2STError(f"predictions {pred.shape} and targets {true.shape} must both be (spots, genes)")
    return pred, true


def pcc_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (G,) Pearson r of each gene over the N spots; NaN where either side is constant.

    Constancy is tested exactly (max == min) so that a constant column never yields a PCC of
    rounding noise; fewer than 2 spots gives all NaN.
    """
    pred, true = _check_pair(pred, true)
    out = np.full(pred.shape[1], np.nan)
    if pred.shape[0] < 2:
        return out
    xc = pred - pred.mean(axis=0)
    yc = true - true.mean(axis=0)
    num = (xc * yc).sum(axis=0)
    den = np.sqrt((xc * xc).sum(axis=0) * (yc * yc).sum(axis=0))
    varying = (np.ptp(pred, axis=0) > 0) & (np.ptp(true, axis=0) > 0) & (den > 0)
    out[varying] = np.clip(num[varying] / den[varying], -1.0, 1.0)
    return out


def mse_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (G,) mean squared error of each gene over spots."""
    pred, true = _check_pair(pred, true)
    return ((pred - true) ** 2).mean(axis=0)


def mae_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, G), (N, G) -> (G,) mean absolute error of each gene over spots."""
    pred, true = _check_pair(pred, true)
    return np.abs(pred - true).mean(axis=0)


def finite_mean(values: np.ndarray) -> tuple[float, int]:
    """Mean over the finite entries and the number of non-finite ones left out (mean NaN if none finite)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    mean = float(values[finite].mean()) if finite.any() else math.nan
    return mean, int((~finite).sum())


def top_k_indices(pcc: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Indices of the k highest finite PCCs, best first (ties by gene order)."""
    pcc = np.asarray(pcc, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(pcc))
    order = finite[np.argsort(-pcc[finite], kind="stable")]
    return order[:k]


def r_top_k(pcc: np.ndarray, k: int = TOP_K) -> float:
    """The paper's R: mean of the k highest finite per-gene PCCs (NaN if no gene has a PCC)."""
    best = top_k_indices(pcc, k)
    return float(np.asarray(pcc)[best].mean()) if len(best) else math.nan


def r_released(pcc: np.ndarray, k: int = TOP_K) -> float:
    """R exactly as the released code computes it (see the module docstring): NaN-scrambled top-k."""
    values = [float(v) for v in np.asarray(pcc, dtype=np.float64)]
    top = sorted(values, reverse=True)[:k]
    finite = [v for v in top if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def hvg_indices(train_targets: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(N_train, G) training targets -> indices of the k genes of highest variance over spots, highest first.

    Ties are broken by gene order. Computed on training samples only, so the genes scored by
    HVG-50 are fixed before the test fold is seen.
    """
    train_targets = np.asarray(train_targets, dtype=np.float64)
    if train_targets.ndim != 2 or len(train_targets) == 0:
        raise NH2STError(f"HVG selection needs (spots, genes) training targets, got shape {train_targets.shape}")
    variance = train_targets.var(axis=0)
    return np.argsort(-variance, kind="stable")[:k]


def score(pred: np.ndarray, true: np.ndarray, genes: list[str], hvg: np.ndarray | None = None,
          k: int = TOP_K) -> dict:
    """Summary and per-gene metrics of one set of spots (a fold pooled, or one slide).

    Returns a JSON-ready dict (NaN as None):
      n_spots, n_genes, pcc_mean, R, R_released, hvg50_pcc (None if `hvg` is None), mse, mae,
      n_nan_genes, nan_genes, n_hvg_nan, top_genes (the k behind R, best first),
      per_gene: {pcc, mse, mae} lists in gene order.
    """
    pred, true = _check_pair(pred, true)
    if pred.shape[1] != len(genes):
        raise NH2STError(f"predictions have {pred.shape[1]} genes but the gene list has {len(genes)}")
    pcc = pcc_per_gene(pred, true)
    mse = mse_per_gene(pred, true)
    mae = mae_per_gene(pred, true)
    pcc_mean, n_nan = finite_mean(pcc)
    result = {
        "n_spots": int(pred.shape[0]),
        "n_genes": int(pred.shape[1]),
        "pcc_mean": pcc_mean,
        "R": r_top_k(pcc, k),
        "R_released": r_released(pcc, k),
        "hvg50_pcc": None,
        "mse": float(mse.mean()),
        "mae": float(mae.mean()),
        "n_nan_genes": n_nan,
        "nan_genes": [genes[i] for i in np.flatnonzero(~np.isfinite(pcc))],
        "n_hvg_nan": None,
        "top_genes": [genes[i] for i in top_k_indices(pcc, k)],
        "per_gene": {"pcc": pcc.tolist(), "mse": mse.tolist(), "mae": mae.tolist()},
    }
    if hvg is not None:
        result["hvg50_pcc"], result["n_hvg_nan"] = finite_mean(pcc[np.asarray(hvg, dtype=np.int64)])
    return to_json(result)


SUMMARY_KEYS = ("pcc_mean", "R", "hvg50_pcc", "mse", "mae")


def mean_std(values: list) -> dict:
    """{"mean", "std", "n"} over the finite values (population std, ddof=0); None where undefined."""
    arr = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if len(arr) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(len(arr))}


def to_json(obj):
    """Recursively turn NaN/inf floats into None and numpy scalars into Python ones (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
