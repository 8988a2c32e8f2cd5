"""STNet and Skin reader on tiny downloads in TRIPLEX's real layout (tests/legacy_fixtures.py)."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from legacy_fixtures import assert_sample_matches, extract_and_compare, write_legacy_sample
from nh2st.datasets import get_dataset
from nh2st.errors import NH2STError

STNET = get_dataset("stnet")
SKIN = get_dataset("skin")


def test_stnet_sample_joins_by_grid_id_and_drops_spots_without_counts(tmp_path):
    genes = STNET.genes()
    expected = write_legacy_sample(tmp_path, "stnet", "BC23209_C1", genes, n_without_counts=2)
    write_legacy_sample(tmp_path, "stnet", "BC23209_C2", genes, seed=1)
    assert STNET.find_samples(tmp_path) == ["BC23209_C1", "BC23209_C2"]
    with pytest.warns(UserWarning, match=r"BC23209_C1_selection.tsv: 2 of 12 spots have no counts"):
        sample = STNET.load_sample(tmp_path, "BC23209_C1")
    assert sample.id == "BC23209_C1" and sample.genes == genes and sample.n_spots == 10
    assert_sample_matches(sample, expected)
    assert sample.meta["image"].endswith("HE_BC23209_C1.tif")
    assert sample.meta["counts_without_spot"] == 1
    assert list(map(tuple, sample.grid_xy)) == sorted(map(tuple, sample.grid_xy), key=lambda p: (p[1], p[0]))


def test_skin_jpeg_and_exact_image_names(tmp_path):
    genes = SKIN.genes()
    rep1 = write_legacy_sample(tmp_path, "skin", "P2_ST_rep1", genes, seed=3, n_without_counts=0)
    write_legacy_sample(tmp_path, "skin", "P2_ST_rep10", genes, seed=4)   # a name that extends rep1's
    sample = SKIN.load_sample(tmp_path, "P2_ST_rep1")
    assert sample.meta["image"].endswith("GSM4284316_P2_ST_rep1.jpg")
    assert_sample_matches(sample, rep1, colour_tolerance=12)


def test_root_may_be_the_parent_folder(tmp_path):
    write_legacy_sample(tmp_path / "skin", "skin", "P5_ST_rep2", SKIN.genes(), n_without_counts=0)
    assert SKIN.find_samples(tmp_path) == ["P5_ST_rep2"]
    assert SKIN.load_sample(tmp_path, "P5_ST_rep2").n_spots == 12


def test_gene_subset_in_list_order_and_missing_genes(tmp_path):
    genes = STNET.genes()
    expected = write_legacy_sample(tmp_path, "stnet", "BC23209_C1", genes[:20], n_without_counts=0)
    chosen = genes[:20][::-3]
    sample = STNET.load_sample(tmp_path, "BC23209_C1", chosen)
    np.testing.assert_array_equal(sample.counts, expected.counts[:, [genes.index(g) for g in chosen]])
    # most of the list absent: the list does not fit, zero-filling is not offered
    for allow in (False, True):
        with pytest.raises(NH2STError, match=r"BC23209_C1_sub.parquet: sample BC23209_C1 has only 20 of the 250 genes "
                                             r"of the list .*does not fit this data"):
            STNET.load_sample(tmp_path, "BC23209_C1", allow_missing_genes=allow)
    partly = genes[:20] + ["ABSENT1", "ABSENT2"]
    with pytest.raises(NH2STError, match=r"lacks 2 of the 22 genes \(ABSENT1, ABSENT2\); pass --allow-missing-genes"):
        STNET.load_sample(tmp_path, "BC23209_C1", partly)
    with pytest.warns(UserWarning, match="2 genes missing"):
        sample = STNET.load_sample(tmp_path, "BC23209_C1", partly, allow_missing_genes=True)
    assert sample.counts[:, 20:].sum() == 0 and sample.meta["missing_genes"] == ["ABSENT1", "ABSENT2"]
    np.testing.assert_array_equal(sample.counts[:, :20], expected.counts)


def test_duplicate_grid_ids_are_an_error_naming_the_file(tmp_path):
    write_legacy_sample(tmp_path, "stnet", "BC23209_C1", STNET.genes(), n_without_counts=0)
    path = tmp_path / "ST-spotfiles" / "BC23209_C1_selection.tsv"
    spots = pd.read_csv(path, sep="\t", index_col=0)
    spots.iloc[1, :2] = spots.iloc[0, :2].to_numpy() + 0.1     # rounds onto spot 0's grid id
    spots.to_csv(path, sep="\t")
    with pytest.raises(NH2STError, match=r"BC23209_C1_selection.tsv: duplicate grid id"):
        STNET.load_sample(tmp_path, "BC23209_C1")


def test_image_smaller_than_the_spots_is_an_error(tmp_path):
    write_legacy_sample(tmp_path, "stnet", "BC23209_C1", STNET.genes(), n_without_counts=0)
    image = tmp_path / "ST-imgs" / "HE_BC23209_C1.tif"
    tifffile.imwrite(image, np.zeros((40, 50, 3), np.uint8), photometric="rgb")   # e.g. a downscaled copy
    with pytest.raises(NH2STError, match=r"HE_BC23209_C1.tif: image is 50x40 px but \d+ spot centre"):
        STNET.load_sample(tmp_path, "BC23209_C1")


def test_unreadable_image_is_an_error_naming_it(tmp_path):
    write_legacy_sample(tmp_path, "skin", "P9_ST_rep3", SKIN.genes(), n_without_counts=0)
    image = tmp_path / "ST-imgs" / "GSM4284324_P9_ST_rep3.jpg"
    image.write_bytes(image.read_bytes()[:200])        # truncated download
    with pytest.raises(NH2STError, match="GSM4284324_P9_ST_rep3.jpg"):
        SKIN.load_sample(tmp_path, "P9_ST_rep3")
    image.unlink()
    with pytest.raises(NH2STError, match=r"no image for sample P9_ST_rep3; expected GSM<number>_P9_ST_rep3.jpg"):
        SKIN.load_sample(tmp_path, "P9_ST_rep3")


def test_root_without_the_folders_lists_what_it_looked_for(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(NH2STError, match=r"looked for .*ST-imgs.*ST-spotfiles.*ST-cnts"):
        STNET.find_samples(tmp_path)
    (tmp_path / "ST-imgs").mkdir()
    with pytest.raises(NH2STError, match=r"has ST-imgs but not ST-spotfiles, ST-cnts"):
        STNET.find_samples(tmp_path)


def test_counts_indexed_by_something_else_is_an_error(tmp_path):
    write_legacy_sample(tmp_path, "stnet", "BC23209_C1", STNET.genes(), n_without_counts=0)
    path = tmp_path / "ST-cnts" / "BC23209_C1_sub.parquet"
    pd.read_parquet(path).reset_index(drop=True).to_parquet(path)
    with pytest.raises(NH2STError, match=r"BC23209_C1_sub.parquet: none of its spot ids"):
        STNET.load_sample(tmp_path, "BC23209_C1")


def test_extract_end_to_end_stnet_and_skin(tmp_path):
    stnet = {sid: write_legacy_sample(tmp_path / "stnet", "stnet", sid, STNET.genes(), nx=3, ny=2, seed=i)
             for i, sid in enumerate(["BC23209_C1", "BC23209_C2"])}
    skin = {sid: write_legacy_sample(tmp_path / "skin", "skin", sid, SKIN.genes(), nx=3, ny=2, seed=i)
            for i, sid in enumerate(["P2_ST_rep1", "P2_ST_rep10"])}
    extract_and_compare("stnet", tmp_path / "stnet", tmp_path / "stnet.zarr", stnet)
    extract_and_compare("skin", tmp_path, tmp_path / "skin.zarr", skin)   # root = the parent of skin/
