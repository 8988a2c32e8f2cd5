"""nh2st eval / predict / plot on small generated stores and slides with known signal."""

import json
import os
import time

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nh2st import metrics
from nh2st.config import load_config
from nh2st.errors import NH2STError
from nh2st.evaluate import evaluate, evaluate_fold, load_predictions
from nh2st.runs import resolve_run
from nh2st.neighbors import knn_index
from nh2st.store import EmbeddingStore, StoreMeta
from store_fixtures import smooth_latent, write_spots
from nh2st.training import train_fold

torch.set_num_threads(2)

SAMPLES = [f"DEMO{i}" for i in range(1, 7)]   # the demo's 3 folds: 2 test samples each
N_GENES = 60                                   # > 50, so R and HVG-50 pick subsets
SMALL = ["MODEL.emb_dim=32", "MODEL.num_heads1=4", "MODEL.hypergraph_dim=32", "MODEL.decoder_dim=32",
         "TRAINING.batch_size=32", "TRAINING.num_epochs=2", "TRAINING.eval_batch_size=64"]


def build_store(path, shape=(16, 4, 4), genes=None, weights_sha256="0" * 64, grid=(8, 6), seed=0):
    """A 'demo' store whose pooled features determine expression linearly (ridge recovers it):
    counts ~ Poisson(exp(3 + 0.6 * z M)), pooled channel means = z A + small noise; z varies smoothly
    over the grid, so the 3x3-smoothed targets keep the signal."""
    rng = np.random.default_rng(seed)
    genes = genes or [f"GENE{g:03d}" for g in range(N_GENES)]
    latent = 3
    mixing = rng.normal(size=(latent, len(genes))) * np.linspace(1.0, 0.1, len(genes))  # PCC falls with gene index
    loading = rng.normal(size=(latent, shape[0]))
    meta = StoreMeta(dataset="demo", genes=genes, backbone="resnet18", weights="random:seed=0",
                     weights_sha256=weights_sha256, feature_shape=shape, neighbors_k=9)
    with EmbeddingStore.open_for_writing(path, meta) as store:
        for sample in SAMPLES:
            grid_xy, z = smooth_latent(rng, grid, latent, 0.2)
            channel = z @ loading
            maps = channel[:, :, None, None] + 0.05 * rng.normal(size=(len(z), *shape))
            counts = rng.poisson(np.exp(3.0 + 0.6 * z @ mixing)).astype(np.float32)
            pixel_xy = grid_xy * 200.0 + 300.0
            write_spots(store, sample, maps, counts, grid_xy, pixel_xy, np.full((60, 60, 3), 200, np.uint8))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """runs/synth/fold-{0,1} (NH²2ST, 2 epochs) and baselines mean/ridge for folds 0 and 1."""
    root = tmp_path_factory.mktemp("eval")
    store = build_store(root / "synth.zarr")
    cfg = load_config(None, SMALL)
    runs = root / "runs"
    for k in (0, 1):
        train_fold(store, k, cfg, runs, show_progress=False)
        for kind in ("mean", "ridge"):
            train_fold(store, k, cfg, runs, model_kind=kind, show_progress=False)
    return {"store": store, "runs": runs, "run": runs / "synth"}


def test_evaluate_fold_writes_predictions_and_metrics_matching_training(trained):
    fold_dir = trained["run"] / "fold-0"
    trained_metrics = json.loads((fold_dir / "metrics.json").read_text())
    result = evaluate_fold(fold_dir)
    # the same checkpoint scored on the same spots as at the end of training
    for key in ("R", "pcc_mean", "hvg50_pcc", "mse", "mae"):
        assert result[key] == pytest.approx(trained_metrics[key], rel=1e-4, abs=1e-6)
    on_disk = json.loads((fold_dir / "metrics.json").read_text())
    assert on_disk["per_sample"].keys() == set(result["test_samples"]) and len(on_disk["hvg_genes"]) == 50
    assert "NOT counts" in on_disk["value_space"]

    attrs, samples = load_predictions(fold_dir)
    store = EmbeddingStore.open(trained["store"])
    assert list(samples) == result["test_samples"] and attrs["genes"] == list(store.meta.genes)
    for sample_id, arrays in samples.items():
        stored = store.read_sample(sample_id, ("targets", "pixel_xy", "barcodes"))
        np.testing.assert_array_equal(arrays["targets"], stored["targets"])
        np.testing.assert_array_equal(arrays["pixel_xy"], stored["pixel_xy"])
        np.testing.assert_array_equal(arrays["barcodes"], stored["barcodes"])
        assert arrays["predictions"].shape == stored["targets"].shape and arrays["predictions"].dtype == np.float32
        pcc = metrics.pcc_per_gene(arrays["predictions"], arrays["targets"])
        assert on_disk["per_sample"][sample_id]["pcc_mean"] == pytest.approx(np.nanmean(pcc))
    pooled_pred = np.concatenate([a["predictions"] for a in samples.values()])
    pooled_true = np.concatenate([a["targets"] for a in samples.values()])
    assert result["R"] == pytest.approx(metrics.r_top_k(metrics.pcc_per_gene(pooled_pred, pooled_true)))
    # predictions.zarr is replaced whole on re-evaluation: no temporary folders are left behind
    evaluate_fold(fold_dir)
    assert sorted(p.name for p in fold_dir.iterdir() if "predictions" in p.name) == ["predictions.zarr"]


def test_evaluate_all_folds_mean_std_and_baselines(trained):
    # fold 2 of the demo's 3 was never trained: "all" refuses, naming it, unless told otherwise
    with pytest.raises(NH2STError, match=r"1 of 3 folds have no finished result \(fold 2: not trained"):
        evaluate(trained["run"], "all", show_progress=False)
    assert not (trained["run"] / "metrics.json").exists()
    result = evaluate(trained["run"], "all", show_progress=False, allow_missing_folds=True)
    assert result["missing_folds"] == [2]
    assert result["folds"] == [0, 1] and list(result["models"]) == ["nh2st", "mean", "ridge"]
    for kind, entry in result["models"].items():
        values = [entry["folds"][str(k)]["pcc_mean"] for k in (0, 1)]
        if kind == "mean":   # a constant prediction has no PCC: reported, not crashing
            assert all(f["n_nan_genes"] == N_GENES and f["pcc_mean"] is None for f in entry["folds"].values())
            assert entry["summary"]["pcc_mean"] == {"mean": None, "std": None, "n": 0}
            continue
        assert entry["summary"]["pcc_mean"]["mean"] == pytest.approx(np.mean(values))
        assert entry["summary"]["pcc_mean"]["std"] == pytest.approx(np.std(values))
    # the features carry the signal linearly: ridge recovers it, and the top-50 R exceeds the all-gene mean
    ridge = result["models"]["ridge"]["summary"]
    assert ridge["R"]["mean"] > 0.6 and ridge["R"]["mean"] >= ridge["pcc_mean"]["mean"]
    assert result["models"]["mean"]["summary"]["mse"]["mean"] > ridge["mse"]["mean"]
    summary = (trained["run"] / "metrics.json").read_bytes()
    assert json.loads(summary)["folds"] == [0, 1]
    evaluate(trained["run"], [1], show_progress=False)           # one fold never clobbers the all-fold summary
    assert (trained["run"] / "metrics.json").read_bytes() == summary


def test_most_recent_run_with_the_fold_and_error_listing_runs(tmp_path):
    runs = tmp_path / "runs"
    cfg = load_config(None, [*SMALL, "TRAINING.num_epochs=1"])
    older = build_store(tmp_path / "older.zarr", seed=1)
    newer = build_store(tmp_path / "newer.zarr", seed=2)
    for k in (0, 1):
        train_fold(older, k, cfg, runs, show_progress=False)
    train_fold(newer, 0, cfg, runs, show_progress=False)
    now = time.time()
    os.utime(runs / "older" / "fold-0" / "run.json", (now - 100, now - 100))
    os.utime(runs / "older" / "fold-1" / "run.json", (now - 100, now - 100))
    assert resolve_run(None, 0, runs) == (runs / "newer", [0])
    assert resolve_run(None, 1, runs) == (runs / "older", [1])
    assert resolve_run(None, "all", runs, allow_missing=True) == (runs / "newer", [0])
    with pytest.raises(NH2STError, match=r"2 of 3 folds have no finished result"):
        resolve_run(None, "all", runs)
    assert resolve_run(runs / "older" / "fold-1", "all", runs) == (runs / "older", [1])
    with pytest.raises(NH2STError, match=r"has fold 2; runs found: .*newer \(folds 0\); .*older \(folds 0, 1\)"):
        resolve_run(None, 2, runs)
    with pytest.raises(NH2STError, match="fold 2: not trained"):
        resolve_run(runs / "older", 2, runs)


def test_store_with_other_genes_or_backbone_is_refused(trained, tmp_path):
    fold_dir = trained["run"] / "fold-0"
    before = (fold_dir / "metrics.json").read_bytes()
    other_genes = build_store(tmp_path / "genes.zarr", genes=[f"OTHER{g}" for g in range(N_GENES)])
    with pytest.raises(NH2STError, match="store genes differ"):
        evaluate_fold(fold_dir, store=other_genes)
    other_backbone = build_store(tmp_path / "backbone.zarr", weights_sha256="f" * 64)
    with pytest.raises(NH2STError, match="weights_sha256.*another backbone"):
        evaluate_fold(fold_dir, store=other_backbone)
    assert (fold_dir / "metrics.json").read_bytes() == before  # nothing written on refusal


def test_cli_eval_json_and_table(trained, monkeypatch):
    from cli.main import app

    runner = CliRunner()
    monkeypatch.chdir(trained["run"].parent.parent)   # the default --runs-dir is ./runs
    monkeypatch.setenv("COLUMNS", "200")
    result = runner.invoke(app, ["eval", "--fold", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["folds"] == [1] and data["models"]["nh2st"]["folds"]["1"]["n_genes"] == N_GENES
    refused = runner.invoke(app, ["eval", "--run", "runs/synth", "--fold", "all"])
    assert isinstance(refused.exception, NH2STError) and "--allow-missing-folds" in str(refused.exception)
    table = runner.invoke(app, ["eval", "--run", "runs/synth", "--fold", "all", "--allow-missing-folds"])
    assert table.exit_code == 0, table.output
    assert "folds 2 have not finished" in table.output
    assert "mean ± std" in table.stdout and "ridge" in table.stdout
    missing = runner.invoke(app, ["eval", "--fold", "2"])
    assert isinstance(missing.exception, NH2STError)   # cli.main.main prints it and exits 1
    assert "no run under runs/ has fold 2; runs found: runs/synth (folds 0, 1)" in str(missing.exception)


def test_plot_unknown_gene_lists_close_matches_and_pngs_are_drawn(trained, tmp_path):
    from nh2st.plots import plot_fold

    fold_dir = trained["run"] / "baselines" / "ridge" / "fold-0"
    with pytest.raises(NH2STError, match=r"'gene01' is not one of the run's 60 genes \(close matches: GENE010, GENE011, GENE012, GENE013, GENE014\)"):
        plot_fold(fold_dir, genes=["gene01"], out_dir=tmp_path)
    paths = plot_fold(fold_dir, genes=["GENE059"], top=2, out_dir=tmp_path / "plots")
    assert [p.name for p in paths][0] == "ridge_fold-0_GENE059.png" and len(paths) == 3
    attrs, samples = load_predictions(fold_dir)
    pred = np.concatenate([a["predictions"] for a in samples.values()])
    true = np.concatenate([a["targets"] for a in samples.values()])
    best = [attrs["genes"][i] for i in metrics.top_k_indices(metrics.pcc_per_gene(pred, true), 2)]
    assert [p.stem.split("_")[-1] for p in paths[1:]] == best
    image = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert image.shape[0] > 300 and len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # spots and colour bars


# ---- predict ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predict_setup(tmp_path_factory):
    """A ridge run on a store made with `random:seed=0` ResNet18 maps, and a small TIFF slide."""
    from nh2st.encoder import FrozenEncoder
    from nh2st.slide import write_pyramid_tiff

    root = tmp_path_factory.mktemp("predict")
    sha = FrozenEncoder("random:seed=0", "cpu").weights_sha256
    store = build_store(root / "rn.zarr", shape=(512, 7, 7), weights_sha256=sha, grid=(4, 4))
    cfg = load_config(None, SMALL)
    for k in (0, 1):
        train_fold(store, k, cfg, root / "runs", model_kind="ridge", show_progress=False)
    rng = np.random.default_rng(0)
    image = (rng.random((40, 50, 3)) * 255).astype(np.uint8).repeat(16, 0).repeat(16, 1)  # 640 x 800
    slide = write_pyramid_tiff(root / "slide.tif", image, mpp=0.5, compression="lzw")
    spots = pd.DataFrame({"barcode": ["a", "b", "c", "d", "edge"], "x": [150.0, 400.5, 650, 300, 900],
                          "y": [120.0, 320, 500, 600, -50]})
    spots.to_csv(root / "spots.csv", index=False)
    return {"run": root / "runs" / "rn" / "baselines" / "ridge", "slide": slide, "spots": root / "spots.csv",
            "root": root, "spots_table": spots}


def test_predict_writes_h5ad_with_provenance_and_warns_outside(predict_setup, tmp_path):
    from nh2st.encoder import FrozenEncoder
    from nh2st.predict import predict_slide
    from nh2st.slide import open_slide
    from nh2st.predictor import Predictor

    s = predict_setup
    out = tmp_path / "pred.h5ad"
    with pytest.raises(NH2STError, match=r"fold 2: not trained.*--allow-missing-folds to predict with the others"):
        predict_slide(s["run"], s["slide"], s["spots"], out, weights="random:seed=0", device="cpu",
                      show_progress=False)
    with pytest.warns(UserWarning, match=r"1 of 5 spot centres lie outside the slide .*edge"), \
            pytest.warns(UserWarning, match=r"folds 2 have not finished; the prediction is the mean of folds 0, 1 only"):
        summary = predict_slide(s["run"], s["slide"], s["spots"], out, weights="random:seed=0", device="cpu",
                                show_progress=False, allow_missing_folds=True)
    assert summary["folds"] == [0, 1] and summary["n_outside"] == 1
    adata = anndata.read_h5ad(out)
    table = s["spots_table"]
    assert adata.shape == (5, N_GENES) and adata.X.dtype == np.float32
    assert list(adata.obs_names) == list(table.barcode) and list(adata.var_names)[:2] == ["GENE000", "GENE001"]
    np.testing.assert_array_equal(adata.obsm["spatial"], table[["x", "y"]].to_numpy())
    assert adata.obs["outside_slide"].tolist() == [False, False, False, False, True]
    prov = adata.uns["nh2st"]
    assert list(prov["folds"]) == [0, 1] and "NOT counts" in prov["value_space"] and prov["model_kind"] == "ridge"
    assert prov["weights_sha256"] == FrozenEncoder("random:seed=0", "cpu").weights_sha256
    library = adata.uns["spatial"]["slide"]
    assert library["images"]["hires"].shape[2] == 3 and library["scalefactors"]["tissue_hires_scalef"] == 1.0

    # the ensemble is the mean of the folds' predictions from the same crops (white padding for the outside spot)
    encoder = FrozenEncoder("random:seed=0", "cpu")
    with open_slide(s["slide"]) as slide:
        patches = np.stack([slide.crop(x, y) for x, y in table[["x", "y"]].to_numpy()])
    assert (patches[-1][:100] == 255).all()
    maps, _ = encoder.encode(patches)
    neighbors = knn_index(table[["x", "y"]].to_numpy(), 9)
    expected = np.mean([Predictor.load(s["run"] / f"fold-{k}").predict(maps, neighbors) for k in (0, 1)], axis=0)
    np.testing.assert_allclose(adata.X, expected, rtol=1e-5, atol=1e-5)

    single = tmp_path / "fold1.h5ad"
    with pytest.warns(UserWarning):
        predict_slide(s["run"], s["slide"], s["spots"], single, fold=1, weights="random:seed=0", device="cpu",
                      show_progress=False)
    assert list(anndata.read_h5ad(single).uns["nh2st"]["folds"]) == [1]


def test_predict_bad_inputs(predict_setup, tmp_path):
    from nh2st.predict import predict_slide, read_spots

    s = predict_setup
    bad_csv = tmp_path / "bad.csv"
    pd.DataFrame({"barcode": ["a"], "pxl_x": [1.0], "y": [2.0]}).to_csv(bad_csv, index=False)
    with pytest.raises(NH2STError, match=r"bad.csv: missing column\(s\) x \(found: barcode, pxl_x, y\)"):
        read_spots(bad_csv)
    out = tmp_path / "p.h5ad"
    out.write_bytes(b"previous result")
    with pytest.raises(NH2STError, match=r"--weights random:seed=1: sha256 .* is not the backbone"):
        predict_slide(s["run"], s["slide"], s["spots"], out, weights="random:seed=1", device="cpu",
                      show_progress=False, allow_missing_folds=True)
    with pytest.raises(NH2STError, match="missing column"):
        predict_slide(s["run"], s["slide"], bad_csv, out, weights="random:seed=0", device="cpu", show_progress=False,
                      allow_missing_folds=True)
    assert out.read_bytes() == b"previous result"   # nothing written on refusal
    with pytest.raises(NH2STError, match="fold 5: not trained"):
        predict_slide(s["run"], s["slide"], s["spots"], out, fold=5, device="cpu", show_progress=False)


def test_spots_from_hest_h5ad(tmp_path):
    from nh2st.predict import read_spots

    obs = pd.DataFrame({"in_tissue": [1, 0, 1], "array_row": [0, 0, 1], "array_col": [0, 2, 1],
                        "pxl_col_in_fullres": [10.0, 20.0, 30.0], "pxl_row_in_fullres": [100.0, 200.0, 300.0]},
                       index=["AAAC-1", "AAAG-1", "AAAT-1"])
    adata = anndata.AnnData(X=np.zeros((3, 2), np.float32), obs=obs)
    adata.obsm["spatial"] = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    adata.write_h5ad(tmp_path / "s.h5ad")
    barcodes, xy = read_spots(tmp_path / "s.h5ad")
    assert list(barcodes) == ["AAAC-1", "AAAT-1"]
    np.testing.assert_array_equal(xy, [[10.0, 100.0], [30.0, 300.0]])   # x = column, y = row
    only_obsm = anndata.AnnData(X=np.zeros((2, 1), np.float32), obs=pd.DataFrame(index=["p", "q"]))
    only_obsm.obsm["spatial"] = np.array([[5.0, 6.0], [7.0, 8.0]])
    only_obsm.write_h5ad(tmp_path / "o.h5ad")
    np.testing.assert_array_equal(read_spots(tmp_path / "o.h5ad")[1], [[5.0, 6.0], [7.0, 8.0]])


def _space_ranger_positions(table: pd.DataFrame, off_tissue: int = 2) -> pd.DataFrame:
    """Space Ranger's columns for spots (barcode, x, y), plus off-tissue rows the reader must drop."""
    rows = pd.DataFrame({"barcode": table.barcode, "in_tissue": 1, "array_row": range(len(table)),
                         "array_col": range(len(table)), "pxl_row_in_fullres": table.y, "pxl_col_in_fullres": table.x})
    off = pd.DataFrame({"barcode": [f"OFF{i}-1" for i in range(off_tissue)], "in_tissue": 0, "array_row": 50,
                        "array_col": range(off_tissue), "pxl_row_in_fullres": 1.0, "pxl_col_in_fullres": 2.0})
    return pd.concat([off, rows], ignore_index=True)


def test_spots_from_space_ranger_positions_both_versions_and_tsv(tmp_path):
    from nh2st.predict import read_spots

    table = pd.DataFrame({"barcode": ["AAAC-1", "AAAG-1", "AAAT-1"], "x": [10.5, 20.0, 30.0], "y": [100.0, 200.0, 300.25]})
    positions = _space_ranger_positions(table)
    positions.to_csv(tmp_path / "tissue_positions.csv", index=False)                    # Space Ranger >= 2.0
    positions.to_csv(tmp_path / "tissue_positions_list.csv", index=False, header=False)  # 1.x, no header
    positions.to_parquet(tmp_path / "tissue_positions.parquet", index=False)
    table.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    for name in ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet", "spots.tsv"):
        barcodes, xy = read_spots(tmp_path / name)
        assert list(barcodes) == list(table.barcode), name                      # in-tissue spots only
        np.testing.assert_array_equal(xy, table[["x", "y"]].to_numpy())          # x = pxl_col, y = pxl_row
    pd.DataFrame({"barcode": ["a"], "col": [1.0], "row": [2.0]}).to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(NH2STError, match=r"bad.tsv: missing column\(s\) x, y \(found: barcode, col, row\)"):
        read_spots(tmp_path / "bad.tsv")


def test_predict_from_space_ranger_positions_equals_the_csv(predict_setup, tmp_path):
    from nh2st.predict import predict_slide

    s = predict_setup
    inside = s["spots_table"].iloc[:4]                           # the spots on the slide
    inside.to_csv(tmp_path / "spots.csv", index=False)
    _space_ranger_positions(inside).to_csv(tmp_path / "tissue_positions.csv", index=False)
    outs = {}
    for name in ("spots.csv", "tissue_positions.csv"):
        outs[name] = predict_slide(s["run"], s["slide"], tmp_path / name, tmp_path / f"{name}.h5ad", fold=0,
                                   weights="random:seed=0", device="cpu", show_progress=False)
    from_csv, from_positions = (anndata.read_h5ad(tmp_path / f"{n}.h5ad") for n in ("spots.csv", "tissue_positions.csv"))
    assert list(from_positions.obs_names) == list(inside.barcode)                 # off-tissue spots dropped
    np.testing.assert_array_equal(from_positions.obsm["spatial"], inside[["x", "y"]].to_numpy())
    np.testing.assert_allclose(from_positions.X, from_csv.X, rtol=1e-6)


def test_predict_crops_the_field_of_view_of_the_runs_store(tmp_path):
    from nh2st.predict import _store_field_of_view
    from nh2st.slide import RescaledSlide, open_slide, write_pyramid_tiff

    image = np.full((64, 64, 3), 200, np.uint8)
    for mpp, name in ((0.25, "40x.tif"), (None, "bare.tif")):
        write_pyramid_tiff(tmp_path / name, image, mpp=mpp, compression="lzw")
    own, paper = {"store_meta": {"dataset": "visium"}}, {"store_meta": {"dataset": "demo"}}
    slide = _store_field_of_view(open_slide(tmp_path / "40x.tif"), own, None)
    assert isinstance(slide, RescaledSlide) and slide.field() == 448
    assert not isinstance(_store_field_of_view(open_slide(tmp_path / "40x.tif"), paper, None), RescaledSlide)
    with pytest.raises(NH2STError, match=r"bare.tif: the slide records no microns per pixel.*pass --mpp"):
        _store_field_of_view(open_slide(tmp_path / "bare.tif"), own, None)
    assert not isinstance(_store_field_of_view(open_slide(tmp_path / "bare.tif"), own, 0.52), RescaledSlide)


def test_plot_predictions_of_a_new_slide(predict_setup, tmp_path):
    from cli.main import app
    from nh2st.predict import predict_slide

    s = predict_setup
    out = tmp_path / "pred.h5ad"
    with pytest.warns(UserWarning):   # the off-slide spot, the untrained fold
        predict_slide(s["run"], s["slide"], s["spots"], out, weights="random:seed=0", device="cpu", show_progress=False,
                      allow_missing_folds=True)
    runner = CliRunner()
    result = runner.invoke(app, ["plot", "--predictions", str(out), "--genes", "GENE003", "--top", "1",
                                 "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    adata = anndata.read_h5ad(out)
    most_varying = adata.var_names[int(np.argmax(np.asarray(adata.X).var(0)))]
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == sorted({"pred_GENE003.png", f"pred_{most_varying}.png"})
    image = np.asarray(Image.open(tmp_path / "plots" / "pred_GENE003.png").convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50          # slide thumbnail, spots and colour bar
    refused = runner.invoke(app, ["plot", "--predictions", str(out), "--fold", "0"])
    assert isinstance(refused.exception, NH2STError) and "drop --fold" in str(refused.exception)
    missing = runner.invoke(app, ["plot", "--predictions", str(tmp_path / "none.h5ad")])
    assert "file not found" in str(missing.exception)
