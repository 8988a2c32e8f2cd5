"""The whole user path on CPU through the CLI: demo data -> extract -> train -> eval -> predict -> plot."""

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from nh2st.store import EmbeddingStore

torch.set_num_threads(2)

SMALL_MODEL = ["MODEL.emb_dim=64", "MODEL.num_heads1=4", "MODEL.hypergraph_dim=64", "MODEL.decoder_dim=64",
               "TRAINING.num_epochs=2", "TRAINING.batch_size=64"]


def _invoke(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_extract_train_eval_predict_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    data, store = tmp_path / "data" / "demo", tmp_path / "stores" / "demo.zarr"

    _invoke(["extract", "--dataset", "demo", "--data-root", data, "--store", store, "--samples",
             "DEMO1,DEMO2,DEMO3", "--weights", "random", "--device", "cpu", "--batch-size", "32"])
    assert EmbeddingStore.open(store).sample_ids() == ["DEMO1", "DEMO2", "DEMO3"]

    train_args = ["train", "--store", store, "--folds", "0", "--device", "cpu", "--runs-dir", "runs"]
    for override in SMALL_MODEL:
        train_args += ["--set", override]
    _invoke(train_args)
    fold_dir = tmp_path / "runs" / "demo" / "fold-0"
    assert (fold_dir / "checkpoint.pt").is_file()
    trained = json.loads((fold_dir / "metrics.json").read_text())        # written by training, before eval

    # eval with no flags but --json: finds the run itself, prints only JSON on stdout
    result = _invoke(["eval", "--json", "--allow-missing-folds"])
    report = json.loads(result.stdout)
    fold = report["models"]["nh2st"]["folds"]["0"]
    test_ids = json.loads((fold_dir / "run.json").read_text())["test_samples"]
    assert fold["test_samples"] == test_ids and fold["n_genes"] == 250
    assert fold["n_spots"] == sum(EmbeddingStore.open(store).n_spots(s) for s in test_ids)
    assert report["missing_folds"] == [1, 2]
    training_log = json.loads((fold_dir / "log.json").read_text())
    assert len(training_log) == trained["epochs_run"] and fold["R"] == pytest.approx(trained["R"], abs=1e-6)
    assert (fold_dir / "predictions.zarr" / test_ids[0]).is_dir() and (fold_dir / "metrics.json").is_file()

    # predict on a slide the run never saw (DEMO4, not extracted); spots from a cut of its HEST h5ad
    # (45 spots, some off tissue, to keep the test quick) and from a CSV
    slide = data / "wsis" / "DEMO4.tif"
    full = anndata.read_h5ad(data / "st" / "DEMO4.h5ad")
    off = np.flatnonzero(full.obs["in_tissue"].to_numpy() == 0)[:5]
    assert len(off) == 5   # the demo marks glass spots in_tissue = 0; predict must skip them
    source = full[np.sort(np.concatenate([np.flatnonzero(full.obs["in_tissue"].to_numpy() > 0)[:40], off]))].copy()
    h5ad = tmp_path / "DEMO4_cut.h5ad"
    source.write_h5ad(h5ad)
    out = tmp_path / "DEMO4_pred.h5ad"
    _invoke(["predict", "--run", "runs/demo", "--wsi", slide, "--spots", h5ad, "--out", out,
             "--weights", "random", "--device", "cpu", "--allow-missing-folds"])
    in_tissue = source.obs["in_tissue"].to_numpy() > 0
    pred = anndata.read_h5ad(out)
    assert pred.shape == (40, 250) and pred.X.dtype == np.float32
    assert np.isfinite(pred.X).all() and pred.X.std(axis=0).max() > 0
    assert list(pred.obs_names) == list(source.obs_names[in_tissue])
    np.testing.assert_array_equal(pred.obsm["spatial"][:, 0], source.obs["pxl_col_in_fullres"].to_numpy()[in_tissue])
    np.testing.assert_array_equal(pred.obsm["spatial"][:, 1], source.obs["pxl_row_in_fullres"].to_numpy()[in_tissue])
    assert list(pred.var_names) == list(EmbeddingStore.open(store).meta.genes)
    assert "NOT counts" in pred.uns["nh2st"]["value_space"]

    csv = tmp_path / "spots.csv"
    pd.DataFrame({"barcode": pred.obs_names, "x": pred.obsm["spatial"][:, 0],
                  "y": pred.obsm["spatial"][:, 1]}).to_csv(csv, index=False)
    out_csv = tmp_path / "DEMO4_csv.h5ad"
    _invoke(["predict", "--run", "runs/demo", "--wsi", slide, "--spots", csv, "--out", out_csv,
             "--fold", "0", "--weights", "random", "--device", "cpu"])
    # the same spots from a CSV: the same neighbourhoods, so the same predictions (the demo's
    # configuration also predicts from the neighbours)
    np.testing.assert_allclose(anndata.read_h5ad(out_csv).X, pred.X, rtol=1e-4, atol=1e-4)

    # plot: named gene plus the best one, drawn over the thumbnail extraction stored
    result = _invoke(["plot", "--run", "runs/demo", "--fold", "0", "--genes", "GENE001", "--top", "1",
                      "--out", "plots"])
    paths = [tmp_path / line.strip() for line in result.stdout.splitlines() if line.strip().endswith(".png")]
    assert len(paths) == 2 and paths[0].name == "demo_fold-0_GENE001.png"
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape[0] > 200 and image.std() > 10 and len(np.unique(image.reshape(-1, 3), axis=0)) > 100
