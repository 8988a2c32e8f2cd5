import json
import math

import numpy as np
import pytest
from scipy import stats

from nh2st import metrics
from nh2st.errors import NH2STError


def _pair(n=60, g=12, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, g))
    pred = 0.6 * true + rng.normal(size=(n, g)) * np.linspace(0.2, 3.0, g)  # decreasing PCC over genes
    return pred.astype(np.float32), true.astype(np.float32)


def test_pcc_matches_scipy_per_gene():
    pred, true = _pair()
    ours = metrics.pcc_per_gene(pred, true)
    ref = [stats.pearsonr(pred[:, g].astype(np.float64), true[:, g].astype(np.float64)).statistic
           for g in range(pred.shape[1])]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_mse_mae_match_numpy():
    pred, true = _pair(seed=1)
    p, t = pred.astype(np.float64), true.astype(np.float64)
    np.testing.assert_allclose(metrics.mse_per_gene(pred, true), ((p - t) ** 2).mean(0))
    np.testing.assert_allclose(metrics.mae_per_gene(pred, true), np.abs(p - t).mean(0))
    s = metrics.score(pred, true, [f"G{i}" for i in range(pred.shape[1])])
    assert s["mse"] == pytest.approx(((p - t) ** 2).mean())  # mean over genes == mean over all entries
    assert s["mae"] == pytest.approx(np.abs(p - t).mean())


def test_zero_variance_genes_are_nan_reported_and_excluded():
    pred, true = _pair(seed=2)
    true[:, 3] = 1.7           # constant truth
    pred[:, 5] = 0.1           # constant prediction (float rounding must not produce a fake PCC)
    genes = [f"G{i}" for i in range(pred.shape[1])]
    pcc = metrics.pcc_per_gene(pred, true)
    assert math.isnan(pcc[3]) and math.isnan(pcc[5])
    assert np.isfinite(np.delete(pcc, [3, 5])).all()
    s = metrics.score(pred, true, genes, hvg=np.array([3, 0, 1]))
    assert s["n_nan_genes"] == 2 and s["nan_genes"] == ["G3", "G5"]
    assert s["pcc_mean"] == pytest.approx(np.delete(pcc, [3, 5]).mean())
    assert s["hvg50_pcc"] == pytest.approx((pcc[0] + pcc[1]) / 2) and s["n_hvg_nan"] == 1
    assert s["per_gene"]["pcc"][3] is None
    json.dumps(s, allow_nan=False)  # strict JSON: NaN written as null


def test_all_constant_gives_nan_summary_without_crash():
    pred = np.zeros((10, 4), np.float32)
    true = np.random.default_rng(0).normal(size=(10, 4))
    s = metrics.score(pred, true, list("ABCD"))
    assert s["pcc_mean"] is None and s["R"] is None and s["n_nan_genes"] == 4
    assert metrics.pcc_per_gene(pred[:1], true[:1]).shape == (4,)


def test_r_is_mean_of_50_best_and_ordered():
    rng = np.random.default_rng(3)
    n, g = 200, 80
    true = rng.normal(size=(n, g))
    pred = true * np.linspace(1, 0, g) + rng.normal(size=(n, g))
    pcc = metrics.pcc_per_gene(pred, true)
    pcc[7] = np.nan
    best = metrics.top_k_indices(pcc, 50)
    assert len(best) == 50 and 7 not in best
    assert np.all(np.diff(pcc[best]) <= 0)  # best first
    assert pcc[best].min() >= np.nanmax(np.delete(pcc, np.append(best, 7)))
    assert metrics.r_top_k(pcc) == pytest.approx(np.sort(pcc[np.isfinite(pcc)])[::-1][:50].mean())
    # fewer than 50 finite genes: R is the mean of those that exist
    assert metrics.r_top_k(pcc[:10]) == pytest.approx(np.nanmean(pcc[:10]))


def test_hvg_from_training_variance():
    rng = np.random.default_rng(4)
    scale = rng.permutation(1.25 ** np.arange(60))  # well-separated variances
    train = rng.normal(size=(500, 60)) * scale
    hvg = metrics.hvg_indices(train, 50)
    np.testing.assert_array_equal(hvg, np.argsort(-scale)[:50])
    with pytest.raises(NH2STError):
        metrics.hvg_indices(np.zeros((0, 5)))


def test_shape_mismatch_is_user_error():
    with pytest.raises(NH2STError, match="predictions"):
        metrics.pcc_per_gene(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(NH2STError, match="gene list"):
        metrics.score(np.zeros((3, 2)), np.ones((3, 2)), ["A"])


def test_mean_std_over_folds_skips_missing():
    out = metrics.mean_std([0.2, None, 0.4, float("nan")])
    assert out == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1), "n": 2}
    assert metrics.mean_std([None]) == {"mean": None, "std": None, "n": 0}


def test_r_released_is_the_released_codes_nan_scrambled_top_k():
    pcc = np.array([0.9, np.nan, 0.1, 0.8, 0.7, 0.2])
    # Python's sort compares NaN as neither larger nor smaller, so the list stays partly unordered
    expected = np.nanmean(sorted(pcc.tolist(), reverse=True)[:3])
    assert metrics.r_released(pcc, 3) == pytest.approx(expected)
    assert metrics.r_top_k(pcc, 3) == pytest.approx(np.mean([0.9, 0.8, 0.7]))
    assert metrics.r_released(pcc, 3) != pytest.approx(metrics.r_top_k(pcc, 3))
    clean = np.array([0.9, 0.1, 0.8, 0.7, 0.2])
    assert metrics.r_released(clean, 3) == pytest.approx(metrics.r_top_k(clean, 3))
    scored = metrics.score(np.random.default_rng(0).random((20, 6)), np.random.default_rng(1).random((20, 6)),
                           [f"g{i}" for i in range(6)], k=3)
    assert scored["R_released"] == pytest.approx(scored["R"])
