"""Training on a generated store whose feature maps' spatial pattern determines expression."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nh2st.baselines import fit_ridge
from nh2st.config import load_config
from nh2st.errors import NH2STError
from nh2st.splits import folds
from nh2st.store import EmbeddingStore, StoreMeta, load_spots
from nh2st.config import default_config_path
from nh2st.predictor import Predictor
from nh2st.training import FoldSpots, carve_validation, fit, train_fold
from nh2st.training.__main__ import main
from store_fixtures import smooth_latent, write_spots

torch.set_num_threads(2)

SHAPE = (16, 4, 4)
N_GENES = 24
SAMPLES = [f"DEMO{i}" for i in range(1, 7)]
SMALL = ["MODEL.emb_dim=32", "MODEL.num_heads1=4", "MODEL.hypergraph_dim=32", "MODEL.decoder_dim=32",
         "MODEL.dropout1=0.1", "TRAINING.batch_size=64", "TRAINING.learning_rate=0.003", "TRAINING.num_epochs=12",
         "TRAINING.early_stopping.patience=30", "TRAINING.eval_batch_size=64"]


def build_store(path, seed=0, grid=(10, 8), shape=SHAPE, n_genes=N_GENES, latent=4, changed_samples=()):
    """A 'demo' store of 6 samples. Each spot has a smooth latent state z; its map is
    noise + sum_l z_l * pattern_l with spatial patterns of (almost) zero mean per channel, so the
    flattened map predicts expression well and the pooled vector barely; counts ~ Poisson(exp(z M)).
    `changed_samples` get their expression replaced by unrelated values (features untouched)."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(latent, *shape))
    patterns -= 0.9 * patterns.mean(axis=(2, 3), keepdims=True)        # keep 10 % of the signal in the channel means
    mixing = rng.normal(scale=0.8, size=(latent, n_genes))
    genes = [f"GENE{g}" for g in range(n_genes)]
    meta = StoreMeta(dataset="demo", genes=genes, backbone="synthetic", weights="none", weights_sha256="0" * 64,
                     feature_shape=shape, neighbors_k=9)
    with EmbeddingStore.open_for_writing(path, meta) as store:
        for sample in SAMPLES:
            grid_xy, z = smooth_latent(rng, grid, latent, 0.3)
            maps = 0.5 + np.einsum("nl,lchw->nchw", z, patterns) + 0.5 * rng.normal(size=(len(z), *shape))
            counts = rng.poisson(np.exp(1.5 + z @ mixing)).astype(np.float32)
            if sample in changed_samples:
                counts = np.random.default_rng(99).poisson(20, size=counts.shape).astype(np.float32)
            pixel_xy = grid_xy * 100.0 + 50.0
            write_spots(store, sample, maps, counts, grid_xy, pixel_xy)
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("stores") / "synth.zarr")


def small_config(*extra):
    return load_config(None, [*SMALL, *extra])


def read(path):
    return json.loads(path.read_text())


def test_nh2st_beats_mean_and_ridge_and_loss_decreases(store_path, tmp_path):
    cfg = small_config()
    nh2st = train_fold(store_path, 0, cfg, tmp_path, show_progress=False)
    ridge = train_fold(store_path, 0, cfg, tmp_path, model_kind="ridge", show_progress=False)
    mean = train_fold(store_path, 0, cfg, tmp_path, model_kind="mean", show_progress=False)
    assert nh2st["pcc_mean"] > ridge["pcc_mean"] + 0.15, (nh2st["pcc_mean"], ridge["pcc_mean"])
    assert nh2st["R"] > ridge["R"]
    assert nh2st["mse"] < ridge["mse"] < mean["mse"] * 1.05 and nh2st["mse"] < 0.8 * mean["mse"]
    assert mean["pcc_mean"] is None and mean["n_nan_genes"] == N_GENES    # a constant has no PCC

    run_dir = tmp_path / "synth" / "fold-0"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "run.json", "checkpoint.pt", "log.csv",
                                                    "log.json", "metrics.json"}
    assert (tmp_path / "synth" / "baselines" / "ridge" / "fold-0" / "metrics.json").is_file()
    log = read(run_dir / "log.json")
    losses = [row["train_loss"] for row in log]
    assert losses[-1] < 0.7 * losses[0]
    assert len((run_dir / "log.csv").read_text().splitlines()) == len(log) + 1

    run = read(run_dir / "run.json")
    fold = folds("demo", SAMPLES)[0]
    assert run["status"] == "finished" and run["protocol"] == "default"
    assert sorted(run["train_samples"] + run["val_samples"]) == fold.train and run["test_samples"] == fold.test
    assert len(run["val_samples"]) == 1 and "validation" in run["selected_on"]
    assert run["best_epoch"] == max(range(len(log)), key=lambda e: log[e]["val_R"])

    # the saved checkpoint, through the public Predictor, reproduces the test metrics
    predictor = Predictor.load(run_dir)
    assert predictor.genes == [f"GENE{g}" for g in range(N_GENES)] and predictor.meta["fold"] == 0
    test = load_spots(EmbeddingStore.open(store_path), fold.test)
    pred = predictor.predict(torch.from_numpy(test["features"]), torch.from_numpy(test["neighbors"]))
    from nh2st.metrics import score
    assert score(pred, test["targets"], predictor.genes)["pcc_mean"] == pytest.approx(nh2st["pcc_mean"], abs=1e-5)
    ridge_pred = Predictor.load(run_dir.parent / "baselines" / "ridge" / "fold-0").predict(test["features"], test["neighbors"])
    assert score(ridge_pred, test["targets"], predictor.genes)["R"] == pytest.approx(ridge["R"], abs=1e-5)


def test_test_fold_expression_never_reaches_predictions(tmp_path):
    fold = folds("demo", SAMPLES)[1]
    original = build_store(tmp_path / "a" / "synth.zarr", seed=3)
    changed = build_store(tmp_path / "b" / "synth.zarr", seed=3, changed_samples=fold.test)
    cfg = small_config("TRAINING.num_epochs=4", "MODEL.predict_from=query+neighbors")
    first = train_fold(original, 1, cfg, tmp_path / "runs-a", show_progress=False)
    second = train_fold(changed, 1, cfg, tmp_path / "runs-b", show_progress=False)
    assert first["mse"] != second["mse"]                                   # the test targets did change ...
    test = load_spots(EmbeddingStore.open(changed), fold.test)
    outputs = [Predictor.load(run / "synth" / "fold-1").predict(test["features"], test["neighbors"])
               for run in (tmp_path / "runs-a", tmp_path / "runs-b")]
    np.testing.assert_array_equal(outputs[0], outputs[1])                  # ... the predictions did not


def test_paper_protocol_selects_on_the_test_fold_and_says_so(store_path, tmp_path):
    cfg = small_config("TRAINING.num_epochs=6", "MODEL.input_norm=channel", "MODEL.predict_from=query+neighbors")
    result = train_fold(store_path, 2, cfg, tmp_path, protocol="paper", show_progress=False)
    run_dir = tmp_path / "synth" / "fold-2"
    run = read(run_dir / "run.json")
    assert run["protocol"] == "paper" and run["val_samples"] == [] and "test fold" in run["selected_on"]
    assert sorted(run["train_samples"]) == folds("demo", SAMPLES)[2].train
    log = read(run_dir / "log.json")
    assert result["R"] == pytest.approx(max(row["val_R"] for row in log), abs=1e-6)   # selected on test R
    # the Predictor (hyperedges from raw maps, channel statistics from the checkpoint) scores the same
    predictor = Predictor.load(run_dir)
    assert predictor.model.feature_std.flatten().std() > 0
    test = load_spots(EmbeddingStore.open(store_path), run["test_samples"])
    from nh2st.metrics import score
    assert score(predictor.predict(test["features"], test["neighbors"]), test["targets"],
                 predictor.genes)["R"] == pytest.approx(result["R"], abs=1e-5)


def test_interrupt_while_saving_keeps_the_finished_fold(store_path, tmp_path, monkeypatch):
    cfg = small_config("TRAINING.num_epochs=2")
    train_fold(store_path, 0, cfg, tmp_path, show_progress=False)
    run_dir = tmp_path / "synth" / "fold-0"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def interrupted_save(obj, path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train_fold(store_path, 0, small_config("TRAINING.num_epochs=2", "GENERAL.seed=7"), tmp_path,
                   show_progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before        # the finished fold is untouched
    partial = tmp_path / "synth" / "fold-0.partial"
    assert read(partial / "run.json")["status"] == "interrupted"
    assert sorted(p.name for p in partial.iterdir() if p.name.startswith(".")) == []   # no temp files left


def tiny_spots(per_sample: int = 20, n_genes: int = 5) -> FoldSpots:
    """Three samples a, b, c (train, val, test) of random maps, each spot's 4 neighbours within its sample."""
    rng = np.random.default_rng(0)
    n = 3 * per_sample
    within = np.arange(n) // per_sample * per_sample
    arrays = {"features": rng.normal(size=(n, *SHAPE)).astype(np.float16),
              "targets": rng.random((n, n_genes)).astype(np.float32),
              "neighbors": np.stack([within + (np.arange(n) + j) % per_sample for j in range(4)], 1),
              "sample_index": np.repeat(np.arange(3), per_sample).astype(np.int32)}
    return FoldSpots.from_arrays(arrays, {"train": ["a"], "val": ["b"], "test": ["c"]})


def test_fit_runs_on_tensors_without_a_store(tmp_path):
    n = 60
    spots = tiny_spots(20)
    assert [len(spots.split[s]) for s in ("train", "val", "test")] == [20, 20, 20]
    assert spots.operator.shape == (n, 4, 4) and torch.allclose(spots.operator.sum(-1), torch.ones(n, 4))
    from nh2st.model import NH2ST
    cfg = small_config("TRAINING.num_epochs=2")
    model = NH2ST.from_config(cfg.MODEL, 5, SHAPE)
    out = fit(model, spots, cfg, tmp_path, [f"g{i}" for i in range(5)], "val", show_progress=False)
    assert len(out["history"]) == 2 and (tmp_path / "checkpoint.pt").is_file()


def test_validation_is_whole_training_slides_seeded():
    train, val = carve_validation(["S1", "S2", "S3", "S4", "S5", "S6", "S7"], 0.3, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == ["S1", "S2", "S3", "S4", "S5", "S6", "S7"]
    assert carve_validation(["S1", "S2", "S3", "S4", "S5", "S6", "S7"], 0.3, seed=1) == (train, val)
    assert carve_validation(["S1", "S2"], 0.0, seed=1) == (["S1", "S2"], [])
    with pytest.raises(NH2STError, match="val_fraction"):
        carve_validation(["S1"], 0.15, seed=1)


def test_ridge_is_the_hest_pipeline_folded_into_one_affine_map():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 40)) * rng.uniform(0.1, 5, 40), rng.normal(size=(300, 6)) + 3
    x_new = rng.normal(size=(50, 40))
    pipeline = make_pipeline(StandardScaler(), PCA(20, random_state=0),
                             Ridge(alpha=100 / (20 * 6), solver="lsqr", random_state=0)).fit(x, y)
    folded = fit_ridge(x, y, n_components=20)
    np.testing.assert_allclose(folded.predict(torch.tensor(x_new)).numpy(), pipeline.predict(x_new), rtol=1e-4, atol=1e-4)


def test_cli_trains_chosen_folds_and_prints_the_table(store_path, tmp_path):
    import typer
    from cli import train as train_cli
    app = typer.Typer()
    app.callback()(lambda: None)                  # a group, so the command is invoked as `train`
    train_cli.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--store", str(store_path), "--folds", "0", "2", "--model", "ridge",
                                 "--runs-dir", str(tmp_path), "--set", *SMALL[:2]], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "R top-50" in result.stdout and "mean" in result.stdout
    assert sorted(p.name for p in (tmp_path / "synth" / "baselines" / "ridge").iterdir()) == ["fold-0", "fold-2"]
    bad = runner.invoke(app, ["train", "--store", str(store_path), "--folds", "7", "--runs-dir", str(tmp_path)])
    assert bad.exit_code != 0 and isinstance(bad.exception, NH2STError) and "has folds 0, 1, 2" in str(bad.exception)


def test_demo_config_is_found_and_valid():
    path = default_config_path("demo")
    assert path is not None and path.name == "demo.yaml"
    cfg = load_config(path)
    assert cfg.TRAINING.num_epochs > 0 and cfg.MODEL.preset == "nh2st+"       # the recommended configuration
    assert math.isclose(cfg.MODEL.loss_ratio2, 0.5)
    paper = load_config(path.with_name("demo-paper.yaml"))                       # paper mode on the demo
    assert paper.MODEL.preset == "paper" and paper.MODEL.predict_from == "query"


def test_module_entry_point_trains_a_fold(store_path, tmp_path):
    code = main(["--store", str(store_path), "--folds", "1", "--runs-dir", str(tmp_path), "--device", "cpu",
                 "--set", *SMALL, "TRAINING.num_epochs=2"])
    assert code == 0
    assert read(tmp_path / "synth" / "fold-1" / "run.json")["world_size"] == 1
    assert main(["--store", str(tmp_path / "missing.zarr"), "--folds", "0"]) == 1
