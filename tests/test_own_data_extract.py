"""`nh2st extract` end to end on your own data: Space Ranger folders (BigTIFF, the shared Aperio SVS)
and any HEST-1k ids, with gene lists chosen from the data and the paper's field of view."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hest_fixtures import make_hest_sample
from nh2st.datasets import get_dataset
from nh2st.encoder import FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.expression import process_expression
from nh2st.extract import run_extract
from nh2st.store import EmbeddingStore
from visium_fixtures import SHARED_SVS, make_visium_sample

torch.set_num_threads(2)

GENES = ["EPCAM", "KRT8", "VIM", "PTPRC", "CD74", "ACTB", "MKI67", "COL1A1"]


def _hvg_reference(expected, n):
    """Top-n genes by pooled variance of log10(1e4 x / total + 1), totals over every gene."""
    pooled = []
    for exp in expected:
        c = exp.all_counts.astype(np.float64)
        pooled.append(np.log10(c / c.sum(1, keepdims=True) * 1e4 + 1)[:, np.argsort(exp.names)])
    names = sorted(expected[0].names)
    var = np.vstack(pooled).var(0)
    return [names[i] for i in sorted(range(len(names)), key=lambda i: (-var[i], names[i]))[:n]]


def _check_features(store, sample_id, crops, encoder):
    maps, pooled = encoder.encode(np.stack(crops))
    data = store.read_sample(sample_id, ["features", "pooled"])
    np.testing.assert_allclose(data["features"].astype(np.float32), maps.astype(np.float32), rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(data["pooled"], pooled, rtol=1e-3, atol=1e-4)


def test_visium_end_to_end_with_hvg_genes(tmp_path, monkeypatch):
    root = tmp_path / "spaceranger"
    expected = [make_visium_sample(root, "S1", GENES, positions="csv", seed=1),
                make_visium_sample(root, "S2", GENES, positions="list", seed=2, n_rows=3)]
    store_path = tmp_path / "visium.zarr"
    with pytest.raises(NH2STError, match=r"--genes hvg:11: only 10 genes are present \(in all 2 samples"):
        run_extract("visium", data_root=root, store_path=store_path, weights="random", genes="hvg:11", progress=False)
    with pytest.raises(NH2STError, match="--dataset visium has no shipped gene list"):
        run_extract("visium", data_root=root, store_path=store_path, weights="random", progress=False)
    assert not store_path.exists()   # refused before anything was written
    summary = run_extract("visium", data_root=root, store_path=store_path, weights="random", genes="hvg:5",
                          device="cpu", batch_size=16, progress=False)
    assert summary["n_extracted"] == 2
    store = EmbeddingStore.open(store_path)
    hvg = _hvg_reference(expected, 5)
    assert list(store.meta.genes) == hvg
    assert store.meta.gene_selection["spec"] == "hvg:5" and store.meta.gene_selection["samples"] == ["S1", "S2"]
    encoder = FrozenEncoder("random", "cpu")
    for exp in expected:
        data = store.read_sample(exp.sample_id, ["counts", "targets", "barcodes", "pixel_xy", "grid_xy"])
        column = [exp.names.index(g) for g in hvg]
        np.testing.assert_array_equal(data["barcodes"], exp.barcodes)
        np.testing.assert_array_equal(data["counts"], exp.all_counts[:, column])
        np.testing.assert_array_equal(data["targets"], process_expression(exp.all_counts[:, column], exp.grid_xy))
        with get_dataset("visium").load_sample(root, exp.sample_id, hvg).slide as slide:
            _check_features(store, exp.sample_id, [slide.crop(x, y) for x, y in exp.pixel_xy], encoder)
        info = store.sample_info(exp.sample_id)
        assert info["meta"]["patch"]["rule"] == "native" and info["meta"]["image"] == str(exp.image)

    # resuming (or adding samples) keeps the ranked list: the expression tables are not read again
    def no_reading(*args):
        raise AssertionError("genes re-ranked on resume")
    monkeypatch.setattr("nh2st.datasets.visium.read_gene_table", no_reading)
    again = run_extract("visium", data_root=root, store_path=store_path, weights="random", genes="hvg:5",
                        device="cpu", progress=False)
    assert again["up_to_date"]
    listed = tmp_path / "panel.txt"
    listed.write_text("\n".join(GENES[:5]) + "\n")
    with pytest.raises(NH2STError, match=r"visium.zarr: store was made with other genes; pass --overwrite"):
        run_extract("visium", data_root=root, store_path=store_path, weights="random", genes=str(listed),
                    device="cpu", progress=False)

    from cli.main import app
    monkeypatch.setenv("COLUMNS", "200")   # rich wraps narrower tables
    shown = CliRunner().invoke(app, ["info", str(store_path)])
    assert shown.exit_code == 0, shown.output
    assert "genes chosen" in shown.stdout and "the 5 most variable genes" in shown.stdout
    assert "native at 0.5 µm/px" in shown.stdout


def test_any_hest_ids_with_heg_genes_patient_and_rescaled_field(tmp_path):
    root = tmp_path / "HEST-1k"
    genes = [f"G{i}" for i in range(12)]
    make_hest_sample(root, "TENX95", genes, seed=1, metadata={"patient": "P1"})
    make_hest_sample(root, "NCBI783", genes, seed=2, n_rows=4, metadata={"patient": "P2"})
    assert get_dataset("hest").find_samples(root) == ["NCBI783", "TENX95"]
    store_path = tmp_path / "hest.zarr"
    # the fixture's slides are 0.5 µm/px; --mpp 0.25 says they are 40x scans: a 448-px field is resized to 224
    run_extract("hest", data_root=root, store_path=store_path, weights="random", genes="heg:4", mpp=0.25,
                device="cpu", batch_size=16, progress=False)
    store = EmbeddingStore.open(store_path)
    assert store.sample_ids() == ["NCBI783", "TENX95"] and len(store.meta.genes) == 4
    assert "the 4 most expressed genes" in store.meta.gene_selection["how"]
    encoder = FrozenEncoder("random", "cpu")
    for sid, patient in (("TENX95", "P1"), ("NCBI783", "P2")):
        info = store.sample_info(sid)
        assert info["meta"]["patient"] == patient
        assert info["meta"]["patch"] == {"slide_mpp": 0.25, "mpp_from": "given", "target_mpp": 0.5, "tolerance": 0.1,
                                              "patch_size": 224, "rule": "rescaled", "field_px": 448, "field_um": 112.0}
        sample = get_dataset("hest").with_options(mpp=0.25).load_sample(root, sid, list(store.meta.genes))
        with sample.slide as slide:
            base = slide.base
            crops = [np.asarray(Image.fromarray(base.read_region(int(x) - 224, int(y) - 224, 448, 448))
                                .resize((224, 224), Image.Resampling.BILINEAR)) for x, y in sample.pixel_xy]
        _check_features(store, sid, crops, encoder)


def test_visium_on_the_shared_aperio_svs(tmp_path):
    if not SHARED_SVS.is_file():
        pytest.skip(f"{SHARED_SVS} not present")
    import tiffslide

    root = tmp_path / "spaceranger"
    exp = make_visium_sample(root, "CMU1", GENES, image="svs", mpp=0.499, pitch=420, origin=(300.0, 350.0),
                             n_rows=3, per_row=4)
    store_path = tmp_path / "svs.zarr"
    listed = tmp_path / "panel.txt"
    listed.write_text("\n".join(GENES) + "\n")
    run_extract("visium", data_root=root, store_path=store_path, weights="random", genes=str(listed), device="cpu",
                batch_size=16, progress=False)
    store = EmbeddingStore.open(store_path)
    assert list(store.meta.genes) == GENES and store.meta.gene_selection["spec"] == f"file:{listed}"
    info = store.sample_info("CMU1")
    assert info["meta"]["patch"]["rule"] == "native" and info["meta"]["mpp"] == pytest.approx(0.499)
    reference = tiffslide.TiffSlide(SHARED_SVS)
    crops = [reference.read_region((int(x) - 112, int(y) - 112), 0, (224, 224), as_array=True) for x, y in exp.pixel_xy]
    _check_features(store, "CMU1", crops, FrozenEncoder("random", "cpu"))
    np.testing.assert_array_equal(store.read_sample("CMU1", ["counts"])["counts"], exp.counts)


def test_cli_extract_passes_genes_image_dir_and_mpp(tmp_path):
    from cli.main import app

    root = tmp_path / "sr"
    make_visium_sample(root, "S1", GENES, seed=1)
    runner = CliRunner()
    cases = [(["--dataset", "stnet", "--mpp", "0.5"], "--mpp is for your own slides"),
             (["--dataset", "visium", "--data-root", str(root), "--image-dir", str(tmp_path / "none")],
              "--image-dir " + str(tmp_path / "none") + ": folder not found"),
             (["--dataset", "visium", "--data-root", str(root), "--genes", "hvg:0"], "N must be a positive whole number"),
             (["--dataset", "visium", "--data-root", str(root), "--genes", "heg:99"], "--genes heg:99: only 10 genes")]
    for args, message in cases:
        result = runner.invoke(app, ["extract", *args, "--store", str(tmp_path / "s.zarr"), "--weights", "random"])
        assert isinstance(result.exception, NH2STError) and message in str(result.exception), result.output
