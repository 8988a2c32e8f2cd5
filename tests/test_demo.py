"""The shipped demo dataset: HEST layout read back by the HEST reader, determinism, real signal."""

import json
import shutil

import anndata
import numpy as np
import pytest
import tifffile

from nh2st.datasets import demo, get_dataset
from nh2st.expression import process_expression
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


def test_signal_figures_are_recorded_once_and_ordered(demo_root):
    """demo.json holds the ceiling and what each kind of model can reach; the sample metadata
    does not repeat them."""
    manifest = json.loads((demo_root / "demo.json").read_text())
    ceilings = [manifest["samples"][sid]["noise_ceiling_pcc"] for sid in DEMO_IDS]
    assert all(0.3 < c < 1.0 for c in ceilings)
    assert manifest["noise_ceiling_pcc"] == pytest.approx(np.mean(ceilings), abs=1e-3)
    assert manifest["seed"] == demo.SEED and manifest["generator_version"] == demo.GENERATOR_VERSION
    best = manifest["achievable_pcc"]
    assert best["pooled"] + 0.03 < best["map"] and best["map"] + 0.05 < best["neighbourhood"]
    assert best["neighbourhood"] <= manifest["noise_ceiling_pcc"] + 0.01
    assert best["pooled"] == pytest.approx(np.mean([manifest["samples"][s]["achievable_pcc"]["pooled"] for s in DEMO_IDS]),
                                           abs=1e-3)
    assert sum(p["genes"] for p in manifest["by_programme"].values()) == 250
    counts = manifest["counts"]
    assert 1000 < counts["median_counts_per_spot"] < 10000 and counts["zero_fraction_lowest_tenth_of_genes"] > 0.6
    block = json.loads((demo_root / "metadata" / "DEMO3.json").read_text())["nh2st_demo"]
    assert block["generator_version"] == demo.GENERATOR_VERSION and "noise_ceiling_pcc" not in block


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


@pytest.fixture(scope="module")
def unrendered():
    """Three slides without images: enough for leave-one-slide-out figures, and quick."""
    return [demo.simulate_sample(sid, render=False) for sid in ("DEMO1", "DEMO2", "DEMO3")]


def test_counts_are_the_written_ones_and_the_ceiling_is_reproduced(simulated, demo_root):
    """Layout, counts and draws have their own random streams: rendering changes none of them."""
    quick = demo.simulate_sample("DEMO4", render=False)
    assert quick.image is None
    np.testing.assert_array_equal(quick.counts, simulated.counts)
    assert quick.ceiling == simulated.ceiling
    written = anndata.read_h5ad(demo_root / "st" / "DEMO4.h5ad")
    np.testing.assert_array_equal(written.X.toarray(), simulated.counts)
    assert list(written.obs_names) == list(simulated.barcodes)
    recorded = json.loads((demo_root / "demo.json").read_text())["samples"]["DEMO4"]["noise_ceiling_pcc"]
    assert recorded == pytest.approx(simulated.ceiling, abs=1e-4)
    # the targets are the reader's: same processing, same spots
    sample = DEMO.load_sample(demo_root, "DEMO4")
    order = {tuple(g): i for i, g in enumerate(simulated.grid_xy)}
    rows = [order[tuple(g)] for g in sample.grid_xy]
    np.testing.assert_allclose(process_expression(sample.counts, sample.grid_xy), simulated.targets[rows], atol=1e-6)
    sample.slide.close()


def test_aggregates_make_the_disc_differ_from_the_rim(unrendered):
    """Evenly spaced aggregates: the disc's lymphoid share is unrelated to the rim's, while the
    regions' shares are shared by both (the reason a patch average can see regions, not aggregates)."""
    disc = np.vstack([s.disc[s.in_tissue == 1] for s in unrendered])
    rim = np.vstack([s.rim[s.in_tissue == 1] for s in unrendered])
    assert abs(np.corrcoef(disc[:, 3], rim[:, 3])[0, 1]) < 0.25 and disc[:, 3].std() > 0.1
    assert np.corrcoef(disc[:, 1], rim[:, 1])[0, 1] > 0.8


def _residual_corr(y, x, z):
    """Correlation of y and z after both are regressed on x (with intercept)."""
    design = np.hstack([np.ones((len(x), 1)), x])
    resid = [v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (y, z)]
    return np.corrcoef(*resid)[0, 1]


def test_rates_have_a_centre_part_and_a_neighbourhood_part(unrendered):
    """Given the rest of the patch, spot genes still follow the disc, niche genes the surround;
    given the disc and the surround, nothing in the rim moves a rate."""
    sim = unrendered[0]
    model = demo.gene_model()
    share = np.log(sim.rates / sim.library_size[:, None])
    spot_gene = int(np.argmax(np.where(model.programme == 1, model.disc_loadings[:, 3], -np.inf)))
    niche_gene = int(np.argmax(np.where(model.programme == 2, model.surround_loadings[:, 3], -np.inf)))
    assert _residual_corr(share[:, spot_gene], sim.rim, sim.disc[:, 3]) > 0.8
    assert _residual_corr(share[:, niche_gene], sim.patch, sim.surround[:, 3]) > 0.5
    again = demo.expected_counts(model, sim.disc, sim.surround, sim.library_size)
    np.testing.assert_allclose(again, sim.rates)  # rates take the disc and the surround, not the rim


def test_each_kind_of_model_can_reach_more(unrendered):
    """On 3 slides (leave one out): pooled < map-aware < neighbourhood-aware <= noise ceiling, and
    the gains come from the programme each kind of model is meant to see."""
    summary = demo.signal_summary(unrendered)
    best, ceiling = summary["achievable_pcc"], summary["noise_ceiling_pcc"]
    assert best["pooled"] + 0.02 < best["map"] < best["neighbourhood"] - 0.05
    assert best["neighbourhood"] <= ceiling + 0.02
    spot, region = summary["by_programme"]["spot"]["achievable_pcc"], summary["by_programme"]["region"]["achievable_pcc"]
    assert spot["map"] - spot["pooled"] > 2 * (region["map"] - region["pooled"])
    niche = summary["by_programme"]["niche"]["achievable_pcc"]
    assert niche["neighbourhood"] - niche["map"] > 0.05
    # a model given shuffled tissue reaches nothing
    shuffled = [demo.DemoSimulation(**{**vars(s), "disc": s.disc[::-1], "rim": s.rim[::-1], "patch": s.patch[::-1],
                                       "surround": s.surround[::-1]}) for s in unrendered]
    assert abs(demo.signal_summary(shuffled)["achievable_pcc"]["neighbourhood"]) < 0.1


def test_counts_are_sparse_where_genes_are_low(unrendered):
    counts = np.vstack([s.counts[s.in_tissue == 1] for s in unrendered])
    per_spot = counts.sum(1)
    assert 1000 < np.median(per_spot) < 10000 and per_spot.max() / np.median(per_spot) < 10
    mean = counts.mean(0)
    zeros = (counts == 0).mean(0)
    assert zeros[mean < 0.5].mean() > 0.6 and zeros[mean > 20].mean() < 0.05
    # overdispersed: variance above the Poisson's for well-expressed genes
    rates = np.vstack([s.rates[s.in_tissue == 1] for s in unrendered])
    assert (((counts - rates) ** 2).mean(0)[mean > 20] > 1.5 * rates.mean(0)[mean > 20]).mean() > 0.8


def test_patch_matches_the_extracted_patch():
    from nh2st.encoder import PATCH_SIZE
    assert demo.PATCH_PX == PATCH_SIZE


def test_image_shows_the_tissue_types(simulated):
    """Nuclear (haematoxylin-dark) pixels are densest in lymphoid tissue, rarest in fat, glass is bright."""
    sim = simulated
    tissue = np.repeat(np.repeat(sim.tissue_map, 4, 0), 4, 1)[:sim.image.shape[0], :sim.image.shape[1]]
    dark = sim.image.astype(np.int16).sum(axis=2) < 330
    share = {t: dark[tissue == t].mean() for t in range(5) if (tissue == t).any()}
    assert share[3] > share[1] > share[2] > share.get(4, 0.0)
    assert share[0] < 0.01 and sim.image[tissue == 0].mean() > 220
