"""HEST-1k reader on small samples in the real format (h5ad + pyramidal TIFF + metadata JSON)."""

import json
import warnings

import h5py
import numpy as np
import pytest

from hest_fixtures import expected_crop, make_hest_sample
from nh2st.datasets import get_dataset
from nh2st.datasets.hest import find_samples, load_sample, read_metadata
from nh2st.errors import NH2STError

ZEN = get_dataset("zen")
INT = get_dataset("int")
GENES = ZEN.genes()


@pytest.fixture(scope="module")
def sparse_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    return root, make_hest_sample(root, "ZEN42", GENES, seed=1, patches=True)


def _check(sample, expected):
    np.testing.assert_array_equal(sample.barcodes, expected.barcodes)
    np.testing.assert_array_equal(sample.pixel_xy, expected.pixel_xy)
    np.testing.assert_array_equal(sample.grid_xy, expected.grid_xy)
    np.testing.assert_array_equal(sample.counts, expected.counts)
    assert sample.counts.dtype == np.float32 and sample.genes == GENES


def test_load_sample_sparse(sparse_root):
    root, expected = sparse_root
    sample = load_sample(ZEN, root, "ZEN42", GENES)
    _check(sample, expected)
    assert sample.n_spots == 30 - 3 and sample.meta["spots_off_tissue_dropped"] == 3
    assert sample.id == "ZEN42" and sample.source.endswith("st/ZEN42.h5ad")
    # the spots are in the paper's row-major (grid y, grid x) order
    assert np.array_equal(np.lexsort((sample.grid_xy[:, 0], sample.grid_xy[:, 1])), np.arange(sample.n_spots))
    assert sample.meta["mpp"] == 0.5 and sample.meta["hest_metadata"]["oncotree_code"] is None
    json.dumps(sample.meta, allow_nan=False)  # NaN from the metadata file does not leak
    sample.slide.close()


def test_patch_is_centred_on_the_true_spot_centre(sparse_root):
    """x = pxl_col_in_fullres is the column, y = pxl_row_in_fullres the row (the paper swaps them)."""
    root, expected = sparse_root
    sample = load_sample(ZEN, root, "ZEN42", GENES)
    for (x, y) in sample.pixel_xy[:5]:
        crop = sample.slide.crop(x, y)
        np.testing.assert_array_equal(crop, expected_crop(x, y, expected.width, expected.height))
        assert not np.array_equal(crop, expected_crop(y, x, expected.width, expected.height))
    # HEST's own patches of the same spots agree with our crops (its coords are the top-left corner)
    with h5py.File(expected.paths["patches"]) as f:
        img, coords = f["img"][:], f["coords"][:]
        barcodes = [b[0].decode() if isinstance(b[0], bytes) else b[0] for b in f["barcode"][:]]
    row_of = {b: i for i, b in enumerate(sample.barcodes)}
    checked = 0
    for patch, (left, top), barcode in zip(img, coords, barcodes):
        if barcode in row_of:
            x, y = sample.pixel_xy[row_of[barcode]]
            assert (left, top) == (int(np.floor(x)) - 16, int(np.floor(y)) - 16)
            np.testing.assert_array_equal(sample.slide.crop(x, y, size=32), patch)
            checked += 1
    assert checked > 10
    sample.slide.close()


def test_dense_x_and_page_pyramid(tmp_path):
    expected = make_hest_sample(tmp_path, "INT7", GENES, seed=2, dense=True, pyramid="pages", compression="lzw")
    sample = load_sample(INT, tmp_path, "INT7", GENES)
    _check(sample, expected)
    assert sample.slide.mpp == pytest.approx(0.5)


def test_in_tissue_as_bool_and_no_in_tissue_column(tmp_path):
    def as_bool(obs):
        obs["in_tissue"] = obs["in_tissue"].astype(bool)
        return obs

    expected = make_hest_sample(tmp_path, "ZEN40", GENES, obs_hook=as_bool)
    _check(load_sample(ZEN, tmp_path, "ZEN40", GENES), expected)
    make_hest_sample(tmp_path, "ZEN41", GENES, drop_columns=["in_tissue"])
    assert load_sample(ZEN, tmp_path, "ZEN41", GENES).n_spots == 30  # no column: every spot kept


def test_find_samples_uses_exact_ids(tmp_path):
    (tmp_path / "st").mkdir()
    for name in ["ZEN36", "ZEN40", "ZEN49", "ZEN400", "INT1", "INT10", "INT24", "INT25", "INT1_old", "TENX95"]:
        (tmp_path / "st" / f"{name}.h5ad").touch()
    assert find_samples(ZEN, tmp_path) == ["ZEN40", "ZEN49"]
    assert find_samples(INT, tmp_path) == ["INT1", "INT10", "INT24"]
    (tmp_path / "empty" / "st").mkdir(parents=True)
    with pytest.raises(NH2STError, match=r"empty/st: none of the zen samples \(ZEN40..ZEN49\)"):
        find_samples(ZEN, tmp_path / "empty")
    with pytest.raises(NH2STError, match="nowhere/st: folder not found"):
        find_samples(ZEN, tmp_path / "nowhere")


def test_any_hest_id_loads(tmp_path):
    expected = make_hest_sample(tmp_path, "TENX95", GENES, seed=3)
    _check(load_sample(ZEN, tmp_path, "TENX95", GENES), expected)


def test_missing_files_name_what_and_where(tmp_path):
    make_hest_sample(tmp_path, "ZEN43", GENES)
    with pytest.raises(NH2STError, match=r"st/ZEN44.h5ad: not found; sample ZEN44 needs its expression"):
        load_sample(ZEN, tmp_path, "ZEN44", GENES)
    (tmp_path / "wsis" / "ZEN43.tif").unlink()
    with pytest.raises(NH2STError, match=r"wsis/ZEN43.tif: not found; sample ZEN43 needs its whole-slide image"):
        load_sample(ZEN, tmp_path, "ZEN43", GENES)


def test_h5ad_without_hest_columns(tmp_path):
    make_hest_sample(tmp_path, "ZEN45", GENES, drop_columns=["array_row", "pxl_col_in_fullres"])
    with pytest.raises(NH2STError, match=r"ZEN45.h5ad: obs lacks the HEST column\(s\) array_row, pxl_col_in_fullres"):
        load_sample(ZEN, tmp_path, "ZEN45", GENES)


def test_barcodes_without_coordinates(tmp_path):
    def blank(obs):
        inside = np.flatnonzero(obs["in_tissue"].to_numpy() == 1)[:2]
        obs.iloc[inside, obs.columns.get_loc("pxl_row_in_fullres")] = np.nan
        return obs

    make_hest_sample(tmp_path, "ZEN46", GENES, obs_hook=blank)
    with pytest.raises(NH2STError, match=r"ZEN46.h5ad: 2 barcode\(s\) without coordinates \(e.g. [ACGT]{16}-1"):
        load_sample(ZEN, tmp_path, "ZEN46", GENES)


@pytest.mark.parametrize("bad, message", [(np.nan, "NaN/inf counts"), (-2.0, "negative counts")])
def test_bad_counts(tmp_path, bad, message):
    def corrupt(counts):
        counts[4, :] = bad  # every gene of one spot
        return counts

    make_hest_sample(tmp_path, "ZEN47", GENES, counts_hook=corrupt, off_tissue=0)
    with pytest.raises(NH2STError, match=f"ZEN47.h5ad: sample ZEN47 has {message} in 1 spots"):
        load_sample(ZEN, tmp_path, "ZEN47", GENES)


def test_missing_gene_is_an_error_unless_allowed(tmp_path):
    expected = make_hest_sample(tmp_path, "ZEN48", GENES)
    genes = GENES[:5] + ["NOT_A_GENE"]
    with pytest.raises(NH2STError, match="ZEN48 lacks 1 of the 6 genes .NOT_A_GENE.; pass --allow-missing-genes"):
        load_sample(ZEN, tmp_path, "ZEN48", genes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample = load_sample(ZEN, tmp_path, "ZEN48", genes, allow_missing_genes=True)
    assert any("NOT_A_GENE" in str(w.message) for w in caught)
    assert (sample.counts[:, 5] == 0).all()
    np.testing.assert_array_equal(sample.counts[:, :5], expected.counts[:, :5])
    assert sample.meta["missing_genes"] == ["NOT_A_GENE"]


def test_metadata_parsing(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"id": "ZEN40", "oncotree_code": NaN, "pixel_size_um_estimated": 0.4585, "x": -Infinity}')
    assert read_metadata(path) == {"id": "ZEN40", "oncotree_code": None, "pixel_size_um_estimated": 0.4585, "x": None}
    path.write_text('{"id": "ZEN40", ')
    with pytest.raises(NH2STError, match="m.json: not readable JSON"):
        read_metadata(path)


def test_corrupt_h5ad(tmp_path):
    make_hest_sample(tmp_path, "ZEN49", GENES)
    path = tmp_path / "st" / "ZEN49.h5ad"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(NH2STError, match="ZEN49.h5ad: cannot read h5ad"):
        load_sample(ZEN, tmp_path, "ZEN49", GENES)
