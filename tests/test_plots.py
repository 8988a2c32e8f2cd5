"""Plots that cannot hide miscalibration: one colour scale for truth and prediction, PCC and MSE in titles."""

import numpy as np
import pytest
from matplotlib.collections import EllipseCollection

from nh2st.errors import NH2STError
from nh2st.plots import VALUE_LABEL, SamplePanel, gene_figure, prediction_figure, resolve_genes


def _panels():
    rng = np.random.default_rng(0)
    panels = []
    for sid, n, offset in (("A", 30, 0.0), ("B", 20, 2.0)):
        xy = np.stack(np.meshgrid(np.arange(6) * 100.0, np.arange(n // 6 + 1) * 100.0), -1).reshape(-1, 2)[:n]
        true = rng.normal(2.0 + offset, 1.0, (n, 2))
        pred = 0.2 * true + 1.5            # compressed toward the mean and off in level: must show
        panels.append(SamplePanel(sid, xy, true, pred))
    return panels


def test_truth_and_prediction_share_one_labelled_scale_and_titles_name_the_samples():
    panels = _panels()
    fig = gene_figure("GENE1", 1, panels)
    collections = [c for ax in fig.axes for c in ax.collections if isinstance(c, EllipseCollection)]
    assert len(collections) == 4
    values = np.concatenate([np.r_[p.targets[:, 1], p.predictions[:, 1]] for p in panels])
    for c in collections:
        assert c.get_clim() == pytest.approx((values.min(), values.max()))   # one scale for every panel
    bars = [ax for ax in fig.axes if ax.get_ylabel()]
    assert len(fig.axes) == 5 and len(bars) == 1 and VALUE_LABEL in bars[0].get_ylabel()

    true = np.concatenate([p.targets[:, 1] for p in panels])
    pred = np.concatenate([p.predictions[:, 1] for p in panels])
    title = fig.get_suptitle()
    assert f"PCC {np.corrcoef(true, pred)[0, 1]:.3f}" in title and f"MSE {np.mean((pred - true) ** 2):.3f}" in title
    assert "over all 50 spots of test samples A, B" in title
    row_b = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("B: predicted")][0]
    t, p = panels[1].targets[:, 1], panels[1].predictions[:, 1]
    assert f"PCC {np.corrcoef(t, p)[0, 1]:.3f}, MSE {np.mean((p - t) ** 2):.3f}" in row_b and "20 spots" in row_b


def test_constant_prediction_and_predicted_only_figure():
    panel = _panels()[0]
    panel.predictions[:, 0] = 1.0
    fig = gene_figure("GENE0", 0, [panel])
    assert "PCC undefined" in fig.get_suptitle() and "test sample A" in fig.get_suptitle()
    alone = prediction_figure("GENE0", panel.targets[:, 0], panel.pixel_xy, "slide7",
                              {"model_kind": "nh2st", "folds": np.array([0, 2])})
    (title,) = [ax.get_title() for ax in alone.axes if ax.get_title()]
    assert "slide7: predicted GENE0 (30 spots, no ground truth)" in title and "fold(s) 0, 2" in title
    assert any(VALUE_LABEL in ax.get_ylabel() for ax in alone.axes)


def test_resolve_genes_by_another_score():
    genes = ["A", "B", "C"]
    assert resolve_genes(genes, np.array([0.1, 0.5, np.nan]), top=2, ranked_by="spread") == ["B", "A"]
    with pytest.raises(NH2STError, match="every gene has an undefined spread of predictions"):
        resolve_genes(genes, np.full(3, np.nan), ranked_by="spread of predictions")
