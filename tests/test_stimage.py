"""STimage-1K4M reader (PCW, Mouse) on tiny downloads in the real layout (tests/legacy_fixtures.py)."""

import numpy as np
import pandas as pd
import pytest

from legacy_fixtures import (assert_sample_matches, extract_and_compare, mouse_slide, pcw_slide,
                             write_stimage_slide)
from nh2st.datasets import get_dataset
from nh2st.errors import NH2STError

PCW = get_dataset("pcw")
MOUSE = get_dataset("mouse")


@pytest.mark.parametrize("image_bytes, tolerance", [("PNG", 0), ("JPEG", 12), ("TIFF", 0)])
def test_pcw_slide_with_y_before_x_and_image_read_by_content(tmp_path, image_bytes, tolerance):
    genes = PCW.genes()
    expected = write_stimage_slide(tmp_path, "pcw", pcw_slide("6.5PCW", 3), genes, n_without_counts=2,
                                   image_bytes=image_bytes)
    with pytest.warns(UserWarning, match=r"6.5PCW_3_coord.csv: 2 of 12 spots have no counts"):
        sample = PCW.load_sample(tmp_path, pcw_slide("6.5PCW", 3))
    assert sample.id == pcw_slide("6.5PCW", 3) and sample.genes == genes and sample.n_spots == 10
    assert sample.barcodes[0].startswith(pcw_slide("6.5PCW", 3) + "_1x")
    assert_sample_matches(sample, expected, colour_tolerance=tolerance)
    assert sample.meta["spot_radius_px"] == 9.5
    assert sample.meta["counts_without_spot"] == 1


def test_mouse_decimal_ids_round_and_rep1_is_not_rep10(tmp_path):
    genes = MOUSE.genes()
    rep1 = write_stimage_slide(tmp_path, "mouse", mouse_slide(1), genes, seed=5, n_without_counts=0)
    write_stimage_slide(tmp_path, "mouse", mouse_slide(10), genes, seed=6, image_bytes="JPEG")
    write_stimage_slide(tmp_path, "pcw", pcw_slide("9PCW", 2), PCW.genes(), seed=7)
    assert MOUSE.find_samples(tmp_path) == [mouse_slide(1), mouse_slide(10)]
    assert PCW.find_samples(tmp_path / "ST") == [pcw_slide("9PCW", 2)]       # root may be ST/ itself
    sample = MOUSE.load_sample(tmp_path / "ST", mouse_slide(1))
    assert sample.barcodes[0] == rep1.ids[0] and "." in sample.barcodes[0].rsplit("_", 1)[1]
    assert sample.meta["image"].endswith(f"{mouse_slide(1)}.png")
    assert_sample_matches(sample, rep1)


def test_mouse_ids_colliding_after_rounding_are_an_error(tmp_path):
    write_stimage_slide(tmp_path, "mouse", mouse_slide(2), MOUSE.genes(), n_without_counts=0)
    path = tmp_path / "ST" / "coord" / f"{mouse_slide(2)}_coord.csv"
    coords = pd.read_csv(path, index_col=0)
    first = coords.index[0].rsplit("_", 1)[1]
    x, y = (float(v) for v in first.split("x"))
    coords.index = [coords.index[0], f"{mouse_slide(2)}_{round(x) + 0.4:.2f}x{round(y) - 0.3:.3f}",
                    *coords.index[2:]]
    coords.to_csv(path)
    with pytest.raises(NH2STError, match=rf"{mouse_slide(2)}_coord.csv: spot ids .* all give grid id "
                                         rf"{round(x)}x{round(y)} \(after rounding\)"):
        MOUSE.load_sample(tmp_path, mouse_slide(2))


def test_bad_spot_ids_and_missing_files(tmp_path):
    write_stimage_slide(tmp_path, "pcw", pcw_slide("9PCW", 1), PCW.genes(), n_without_counts=0)
    with pytest.raises(NH2STError, match=r"Sample_9PCW_1_coord.csv: spot id .* does not end in _<x>x<y>"):
        MOUSE.load_sample(tmp_path, pcw_slide("9PCW", 1))     # PCW's 3-token ids are not Mouse ids
    image = tmp_path / "ST" / "image" / f"{pcw_slide('9PCW', 1)}.png"
    image.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(NH2STError, match=r"Sample_9PCW_1.png: not a TIFF, JPEG or PNG"):
        PCW.load_sample(tmp_path, pcw_slide("9PCW", 1))
    image.unlink()
    with pytest.raises(NH2STError, match=r"Sample_9PCW_1.png: not found"):
        PCW.load_sample(tmp_path, pcw_slide("9PCW", 1))
    with pytest.raises(NH2STError, match=r"Sample_9PCW_2_coord.csv: not found"):
        PCW.load_sample(tmp_path, pcw_slide("9PCW", 2))


def test_image_smaller_than_the_spots_is_an_error(tmp_path):
    write_stimage_slide(tmp_path, "pcw", pcw_slide("4.5-5PCW", 1), PCW.genes(), n_without_counts=0)
    path = tmp_path / "ST" / "coord" / f"{pcw_slide('4.5-5PCW', 1)}_coord.csv"
    coords = pd.read_csv(path, index_col=0)
    coords[["yaxis", "xaxis"]] *= 4           # coordinates of the full-resolution image
    coords.to_csv(path)
    with pytest.raises(NH2STError, match=r"4.5-5PCW_1.png: image is \d+x\d+ px but \d+ spot centre"):
        PCW.load_sample(tmp_path, pcw_slide("4.5-5PCW", 1))


def test_root_without_the_folders_lists_what_it_looked_for(tmp_path):
    with pytest.raises(NH2STError, match=r"looked for .*ST/coord.*gene_exp.*image"):
        PCW.find_samples(tmp_path)
    (tmp_path / "ST" / "coord").mkdir(parents=True)
    with pytest.raises(NH2STError, match=r"has coord but not gene_exp, image"):
        PCW.find_samples(tmp_path)


def test_counts_read_only_the_listed_genes_in_list_order(tmp_path):
    genes = PCW.genes()
    expected = write_stimage_slide(tmp_path, "pcw", pcw_slide("9PCW", 4), genes, n_without_counts=0)
    chosen = [genes[7], genes[2], genes[100]]
    sample = PCW.load_sample(tmp_path, pcw_slide("9PCW", 4), chosen)
    np.testing.assert_array_equal(sample.counts, expected.counts[:, [7, 2, 100]])
    with pytest.raises(NH2STError, match=r"9PCW_4_count.csv: sample .* lacks 1 of the 2 genes \(NOT_A_GENE\)"):
        PCW.load_sample(tmp_path, pcw_slide("9PCW", 4), [genes[0], "NOT_A_GENE"])


def test_extract_end_to_end_pcw_and_mouse(tmp_path):
    root = tmp_path / "STimage-1K4M"
    pcw = {pcw_slide("4.5-5PCW", 1): write_stimage_slide(root, "pcw", pcw_slide("4.5-5PCW", 1), PCW.genes(),
                                                         nx=3, ny=2, image_bytes="JPEG"),
           pcw_slide("9PCW", 1): write_stimage_slide(root, "pcw", pcw_slide("9PCW", 1), PCW.genes(), nx=3, ny=2,
                                                     seed=1, image_bytes="TIFF")}
    mouse = {mouse_slide(r): write_stimage_slide(root, "mouse", mouse_slide(r), MOUSE.genes(), nx=3, ny=2, seed=r)
             for r in (1, 10)}
    extract_and_compare("pcw", root, tmp_path / "pcw.zarr", pcw)
    extract_and_compare("mouse", root / "ST", tmp_path / "mouse.zarr", mouse)
