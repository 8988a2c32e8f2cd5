"""The Space Ranger reader (--dataset visium) on generated outs/ folders in the real formats."""

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from hest_fixtures import expected_crop
from nh2st.datasets import get_dataset
from nh2st.datasets.visium import read_10x_h5, read_positions
from nh2st.errors import NH2STError
from nh2st.slide import RescaledSlide, TiffSlide
from visium_fixtures import SHARED_SVS, make_visium_sample, write_10x_h5

GENES = ["EPCAM", "KRT8", "VIM", "PTPRC", "CD74", "ACTB"]
VISIUM = get_dataset("visium")


def test_10x_h5_round_trip_drops_other_feature_types(tmp_path):
    counts = np.array([[1, 0, 5], [0, 2, 7], [3, 0, 9]])
    write_10x_h5(tmp_path / "m.h5", ["A-1", "B-1", "C-1"], ["E1", "E2", "AB"], ["G1", "G2", "CD3"], counts,
                 ["Gene Expression", "Gene Expression", "Antibody Capture"])
    with h5py.File(tmp_path / "m.h5") as f:   # the spec's layout: features x barcodes
        assert list(f["matrix/shape"][()]) == [3, 3] and f["matrix/barcodes"].dtype.kind == "S"
    m = read_10x_h5(tmp_path / "m.h5")
    assert list(m["barcodes"]) == ["A-1", "B-1", "C-1"] and m["names"] == ["G1", "G2"] and m["ids"] == ["E1", "E2"]
    np.testing.assert_array_equal(m["counts"].toarray(), counts[:, :2])
    assert m["n_other_features"] == 1


@pytest.mark.parametrize("positions", ["csv", "list", "parquet"])
def test_load_sample_joins_barcodes_and_keeps_in_tissue_spots(tmp_path, positions):
    exp = make_visium_sample(tmp_path, "S1", GENES, positions=positions, seed=3)
    assert VISIUM.find_samples(tmp_path) == ["S1"]
    sample = VISIUM.load_sample(tmp_path, "S1", GENES)
    np.testing.assert_array_equal(sample.barcodes, exp.barcodes)
    np.testing.assert_array_equal(sample.pixel_xy, exp.pixel_xy)
    np.testing.assert_array_equal(sample.grid_xy, exp.grid_xy)
    np.testing.assert_array_equal(sample.counts, exp.counts)
    assert isinstance(sample.slide, TiffSlide) and (sample.slide.width, sample.slide.height) == (exp.width, exp.height)
    with tifffile.TiffFile(exp.image) as tif:
        assert tif.is_bigtiff
    assert sample.meta["patch"]["rule"] == "native" and sample.meta["patch"]["slide_mpp"] == pytest.approx(0.5)
    assert sample.meta["spots_in_positions"] == len(exp.barcodes) + 2 and sample.meta["genes_matched_on"] == "name"
    x, y = sample.pixel_xy[4]   # the patch is centred on (pxl_col, pxl_row) = (x, y), not swapped
    np.testing.assert_array_equal(sample.slide.crop(x, y), expected_crop(x, y, exp.width, exp.height))
    sample.slide.close()


def test_positions_versions_read_the_same(tmp_path):
    tables = {}
    for kind in ("csv", "list", "parquet"):
        exp = make_visium_sample(tmp_path / kind, "S", GENES, positions=kind, seed=1)
        path = next((exp.outs / "spatial").glob("tissue_positions*"))
        tables[kind] = read_positions(path).sort_values("barcode").reset_index(drop=True)
    pd.testing.assert_frame_equal(tables["csv"], tables["list"], check_dtype=False)
    pd.testing.assert_frame_equal(tables["csv"], tables["parquet"], check_dtype=False)
    assert tables["csv"].columns[-1] == "pxl_col_in_fullres"   # row before col, as Space Ranger writes them


def test_outs_folder_layouts_and_image_dir(tmp_path):
    make_visium_sample(tmp_path / "runs", "A", GENES, seed=1)
    make_visium_sample(tmp_path / "runs", "B", GENES, seed=2, outs=False)   # the sample folder is outs itself
    assert VISIUM.find_samples(tmp_path / "runs") == ["A", "B"]
    assert VISIUM.load_sample(tmp_path / "runs", "B", GENES).n_spots == 20
    # --data-root pointing at one outs folder: one sample, named after the folder above outs
    assert VISIUM.find_samples(tmp_path / "runs" / "A" / "outs") == ["A"]
    # --image-dir: <dir>/<sample>.<ext>
    images = tmp_path / "images"
    images.mkdir()
    shutil.move(tmp_path / "runs" / "A" / "A.tif", images / "A.tif")
    with pytest.raises(NH2STError, match=r"no full-resolution image for sample A next to .*pass --image-dir"):
        VISIUM.load_sample(tmp_path / "runs", "A", GENES)
    spec = VISIUM.with_options(image_dir=images)
    assert spec.load_sample(tmp_path / "runs", "A", GENES).meta["image"] == str(images / "A.tif")
    (tmp_path / "runs" / "A" / "copy.tif").write_bytes((images / "A.tif").read_bytes())
    (tmp_path / "runs" / "A" / "other.svs").write_bytes(b"x")
    with pytest.raises(NH2STError, match=r"several images for sample A .*copy.tif, other.svs"):
        VISIUM.load_sample(tmp_path / "runs", "A", GENES)


def test_genes_matched_on_ensembl_ids_when_the_list_is_in_ids(tmp_path):
    exp = make_visium_sample(tmp_path, "S", GENES, seed=4)
    ids = [exp.ids[exp.names.index(g)] for g in GENES]
    sample = VISIUM.load_sample(tmp_path, "S", ids)
    np.testing.assert_array_equal(sample.counts, exp.counts)
    assert sample.meta["genes_matched_on"] == "id"


def test_shared_svs_slide_through_tiffslide(tmp_path):
    if not SHARED_SVS.is_file():
        pytest.skip(f"{SHARED_SVS} not present")
    import tiffslide

    make_visium_sample(tmp_path, "CMU", GENES, image="svs", mpp=0.499, pitch=400, origin=(300.0, 400.0))
    sample = VISIUM.load_sample(tmp_path, "CMU", GENES)
    assert type(sample.slide).__name__ == "ScannerSlide" and sample.slide.mpp == pytest.approx(0.499)
    assert sample.meta["patch"] == {"slide_mpp": 0.499, "mpp_from": "slide file", "target_mpp": 0.5,
                                    "tolerance": 0.1, "patch_size": 224, "rule": "native", "field_px": 224}
    x, y = sample.pixel_xy[0]
    ref = tiffslide.TiffSlide(SHARED_SVS).read_region((int(x) - 112, int(y) - 112), 0, (224, 224), as_array=True)
    np.testing.assert_array_equal(sample.slide.crop(x, y), ref)
    sample.slide.close()


def test_mpp_far_from_the_papers_crops_the_equivalent_field(tmp_path):
    make_visium_sample(tmp_path, "HI", GENES, mpp=0.25, pitch=120, origin=(250.0, 250.0))
    sample = VISIUM.load_sample(tmp_path, "HI", GENES)
    assert isinstance(sample.slide, RescaledSlide)
    assert sample.meta["patch"]["rule"] == "rescaled" and sample.meta["patch"]["field_px"] == 448
    x, y = sample.pixel_xy[7]
    from PIL import Image
    field = sample.slide.base.read_region(int(x) - 224, int(y) - 224, 448, 448)
    expected = np.asarray(Image.fromarray(field).resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(sample.slide.crop(x, y), expected)
    # --mpp overrides the file: 0.48 is within the tolerance, so the crop is native again
    native = VISIUM.with_options(mpp=0.48).load_sample(tmp_path, "HI", GENES)
    assert native.meta["patch"]["rule"] == "native" and native.meta["patch"]["mpp_from"] == "given"


# ---- bad input ------------------------------------------------------------------------------------------
def test_missing_file_lists_found_and_missing(tmp_path):
    exp = make_visium_sample(tmp_path, "S", GENES)
    (exp.outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(NH2STError, match=r"outs: Space Ranger output is incomplete: missing spatial/scalefactors_json.json "
                                         r"\(found: filtered_feature_bc_matrix.h5, spatial/tissue_hires_image.png, "
                                         r"spatial/tissue_lowres_image.png, spatial/tissue_positions.csv\)"):
        VISIUM.load_sample(tmp_path, "S", GENES)
    (exp.outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(NH2STError, match=r"missing spatial/tissue_positions.csv or spatial/tissue_positions_list.csv; "
                                         r"spatial/scalefactors_json.json"):
        VISIUM.load_sample(tmp_path, "S", GENES)
    with pytest.raises(NH2STError, match=r"no Space Ranger output found; expected <sample>/outs/"):
        VISIUM.find_samples(tmp_path / "S" / "outs" / "spatial")


def test_positions_barcodes_not_in_the_matrix(tmp_path):
    exp = make_visium_sample(tmp_path, "S", GENES)
    path = exp.outs / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(path)
    table["barcode"] = table["barcode"].str.replace("-1", "-2")
    table.to_csv(path, index=False)
    with pytest.raises(NH2STError, match=r"matrix barcode\(s\) have no row in tissue_positions.csv"):
        VISIUM.load_sample(tmp_path, "S", GENES)
    # positions of another run: its in-tissue spots are not in this matrix
    table = pd.read_csv(path)
    table["barcode"] = table["barcode"].str.replace("-2", "-1")
    extra = table.iloc[:1].assign(barcode="TTTTTTTTTTTTTTTT-1", in_tissue=1, array_row=40)
    pd.concat([table, extra]).to_csv(path, index=False)
    with pytest.raises(NH2STError, match=r"1 in-tissue barcode\(s\) are not in filtered_feature_bc_matrix.h5 "
                                         r"\(e.g. TTTTTTTTTTTTTTTT-1\); positions and matrix must come from the same"):
        VISIUM.load_sample(tmp_path, "S", GENES)


def test_image_size_disagreeing_with_the_scale_factors(tmp_path):
    exp = make_visium_sample(tmp_path, "S", GENES)
    factors = json.loads((exp.outs / "spatial" / "scalefactors_json.json").read_text())
    factors["tissue_hires_scalef"] = 0.125   # the hires PNG now says the full image is twice this size
    (exp.outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    with pytest.raises(NH2STError, match=rf"S.tif: image is {exp.width}x{exp.height} px but spatial/tissue_hires_image.png "
                                         rf"\(.*\) with tissue_hires_scalef 0.125 says .* about {8 * round(exp.width / 4)}x"):
        VISIUM.load_sample(tmp_path, "S", GENES)
    # the hires PNG given as the image: spots fall off it (no PNG to compare with)
    for png in (exp.outs / "spatial").glob("*.png"):
        png.unlink()
    from PIL import Image
    exp.image.unlink()
    Image.new("RGB", (exp.width // 4, exp.height // 4)).save(tmp_path / "S" / "S.png")
    with pytest.raises(NH2STError, match=r"S.png: image is .* spot centre\(s\) of tissue_positions.csv lie outside"):
        VISIUM.load_sample(tmp_path, "S", GENES)


def test_slide_without_resolution_asks_for_mpp(tmp_path):
    make_visium_sample(tmp_path, "S", GENES, mpp=None)
    with pytest.raises(NH2STError, match=r"S.tif: the image records no microns per pixel.*pass --mpp .*suggests about 0.50"):
        VISIUM.load_sample(tmp_path, "S", GENES)
    sample = VISIUM.with_options(mpp=0.5).load_sample(tmp_path, "S", GENES)
    assert sample.meta["patch"]["mpp_from"] == "given"


def test_other_bad_inputs(tmp_path):
    exp = make_visium_sample(tmp_path, "S", GENES)
    with pytest.raises(NH2STError, match=r"has only 2 of the 5 genes of the list .*does not fit this data.*--genes hvg:N"):
        VISIUM.load_sample(tmp_path, "S", ["EPCAM", "VIM", "NOPE1", "NOPE2", "NOPE3"], allow_missing_genes=True)
    (exp.outs / "filtered_feature_bc_matrix.h5").write_bytes(b"not hdf5")
    with pytest.raises(NH2STError, match=r"filtered_feature_bc_matrix.h5: cannot read the 10x HDF5 matrix"):
        VISIUM.load_sample(tmp_path, "S", GENES)
    with pytest.raises(NH2STError, match="--image-dir is for --dataset visium"):
        get_dataset("zen").with_options(image_dir=tmp_path)
    with pytest.raises(NH2STError, match="--mpp is for your own slides"):
        get_dataset("stnet").with_options(mpp=0.5)
    with pytest.raises(NH2STError, match="has no shipped gene list; choose one with --genes hvg:250"):
        VISIUM.genes()
