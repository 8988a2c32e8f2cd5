"""The shipped demo dataset: HEST layout read back by the HEST reader, determinism, real signal."""

import json
import shutil

import anndata
import numpy as np
import pytest
import tifffile
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, cross_val_predict

from nh2st.datasets import demo, get_dataset
from nh2st.expression import process_expression, smooth_grid
from nh2st.splits import DEMO_IDS

DEMO = get_dataset("demo")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert DEMO.find_samples(root) == DEMO_IDS  # generates on first use
    return root


def test_layout_reads_back_through_the_hest_reader(demo_root):
    manifest = json.loads((demo_root / "demo.json").read_text())
    for sid in DEMO.find_samples(demo_root):
        sample = DEMO.load_sample(demo_root, sid)
        assert 200 <= sample.n_spots <= 300 and sample.genes == DEMO.genes() and len(sample.genes) == 250
        assert np.array_equal(sample.counts, np.round(sample.counts)) and sample.counts.sum(1).min() > 0
        assert sample.n_spots == manifest["samples"][sid]["spots_in_tissue"]
        # Visium hex grid: array_col of one row 2 apart, parity of array_col follows array_row
        col, row = sample.grid_xy[:, 0], sample.grid_xy[:, 1]
        assert ((col - row) % 2 == 0).all()
        same_row = (row[1:] == row[:-1]) & (col[1:] == col[:-1] + 2)
        pitch = np.linalg.norm(sample.pixel_xy[1:][same_row] - sample.pixel_xy[:-1][same_row], axis=1)
        assert np.allclose(pitch, demo.PITCH_PX, atol=1.5)
        assert sample.slide.mpp == pytest.approx(demo.MPP) and sample.meta["mpp"] == demo.MPP
        crop = sample.slide.crop(*sample.pixel_xy[0])
        assert crop.shape == (224, 224, 3) and crop.std() > 10  # tissue, not blank glass
        thumb, scale = sample.slide.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and scale < 0.1
        sample.slide.close()
    text = (demo_root / "metadata" / "DEMO1.json").read_text()
    assert ": NaN" in text  # HEST's bare NaN tokens, read leniently
    assert (demo_root / "HEST_v1_1_0.csv").read_text().splitlines()[0].startswith("dataset_title,id,")
    assert not list(demo_root.rglob("*.tmp*"))


def test_noise_ceiling_is_recorded_and_sane(demo_root):
    manifest = json.loads((demo_root / "demo.json").read_text())
    ceilings = [manifest["samples"][sid]["noise_ceiling_pcc"] for sid in DEMO_IDS]
    assert all(0.3 < c < 1.0 for c in ceilings)
    assert manifest["noise_ceiling_pcc"] == pytest.approx(np.mean(ceilings))
    assert manifest["seed"] == demo.SEED and manifest["generator_version"] == demo.GENERATOR_VERSION
    meta = json.loads((demo_root / "metadata" / "DEMO3.json").read_text())
    assert meta["nh2st_demo"]["noise_ceiling_pcc"] == manifest["samples"]["DEMO3"]["noise_ceiling_pcc"]


def test_regeneration_is_deterministic_and_resumes(demo_root, tmp_path):
    """A second, independent generation of DEMO2 gives identical counts and pixels; the other
    samples, already complete, are not regenerated."""
    copy = tmp_path / "demo"
    shutil.copytree(demo_root, copy)
    for path in (copy / "metadata" / "DEMO2.json", copy / "wsis" / "DEMO2.tif", copy / "demo.json"):
        path.unlink()
    manifest = demo.ensure_demo(copy)
    assert manifest["generated_now"] == ["DEMO2"]
    a, b = (anndata.read_h5ad(root / "st" / "DEMO2.h5ad") for root in (demo_root, copy))
    assert a.X.dtype == np.float32 and (a.X != b.X).nnz == 0
    assert list(a.obs_names) == list(b.obs_names) and a.obs.equals(b.obs)
    np.testing.assert_array_equal(tifffile.imread(demo_root / "wsis" / "DEMO2.tif"),
                                  tifffile.imread(copy / "wsis" / "DEMO2.tif"))
    assert demo.ensure_demo(copy)["samples"] == manifest["samples"]


@pytest.fixture(scope="module")
def simulated():
    return demo.simulate_sample("DEMO4")


def _targets_and_features(sim):
    kept = sim.in_tissue == 1
    grid = np.stack([sim.array_col[kept], sim.array_row[kept]], axis=1)
    counts = sim.counts[kept][:, demo.list_columns(sim.var_names)].astype(np.float32)
    return process_expression(counts, grid), grid, kept


def _cv_pcc(features, targets, grid):
    """Mean per-gene PCC of a 5-fold ridge regression on features and their grid-smoothed copy."""
    features = np.hstack([features, smooth_grid(features, grid)])
    pred = cross_val_predict(Ridge(alpha=1e-2), features, targets, cv=KFold(5, shuffle=True, random_state=0))
    return float(np.nanmean(demo.pcc_per_gene(pred, targets)))


def test_expression_is_a_learnable_function_of_the_tissue(simulated, demo_root):
    sim = simulated
    targets, grid, kept = _targets_and_features(sim)
    recorded = json.loads((demo_root / "demo.json").read_text())["samples"]["DEMO4"]["noise_ceiling_pcc"]
    assert sim.ceiling == recorded  # the simulation is the generated sample
    truth = np.hstack([sim.own[kept], sim.neighbourhood[kept]])
    full = _cv_pcc(truth, targets, grid)
    assert 0.9 * sim.ceiling < full <= sim.ceiling + 0.02
    shuffled = _cv_pcc(truth[np.random.default_rng(0).permutation(len(truth))], targets, grid)
    assert abs(shuffled) < 0.1
    # both the spot's own tissue and its neighbourhood carry signal of their own
    assert _cv_pcc(sim.own[kept], targets, grid) < full - 0.01
    assert _cv_pcc(sim.neighbourhood[kept], targets, grid) < full - 0.01


def test_image_shows_the_tissue_types(simulated):
    """Nuclear (haematoxylin-dark) pixels are densest in lymphoid tissue, rarest in fat, glass is bright."""
    sim = simulated
    tissue = np.repeat(np.repeat(sim.tissue_map, 4, 0), 4, 1)[:sim.image.shape[0], :sim.image.shape[1]]
    dark = sim.image.astype(np.int16).sum(axis=2) < 330
    share = {t: dark[tissue == t].mean() for t in range(5) if (tissue == t).any()}
    assert share[3] > share[1] > share[2] > share.get(4, 0.0)
    assert share[0] < 0.01 and sim.image[tissue == 0].mean() > 220
