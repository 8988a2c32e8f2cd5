"""Several processes on CPU (gloo): DDP training, DDP scoring, fold-parallel training."""

import json

import pytest
import torch
import torch.distributed as dist

from nh2st.model import NH2ST
from nh2st.store import EmbeddingStore
from nh2st.training import FoldSpots, fit, fold_split_ids, score_run, spawn_ddp, store_folds, train_fold, train_folds
from test_training import build_store, small_config

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("stores") / "synth.zarr", seed=5)


def _score_worker(run_dir, out_path):
    result = score_run(run_dir, "test")
    if dist.get_rank() == 0:
        out_path.write_text(json.dumps(result))


def _fit_worker(store_path, out_dir, overrides):
    cfg = small_config(*overrides)
    store = EmbeddingStore.open(store_path)
    split_ids, select = fold_split_ids(store_folds(store)[0], cfg, "default")
    spots = FoldSpots.load(store, split_ids, "cpu", cfg.MODEL.hyperedge_k)
    torch.manual_seed(dist.get_rank())                 # different init per rank: DDP must broadcast rank 0's
    model = NH2ST.from_config(cfg.MODEL, spots.targets.shape[1], store.meta.feature_shape)
    result = fit(model, spots, cfg, out_dir, list(store.meta.genes), select, show_progress=False)
    torch.save({"final": model.state_dict(), "best": result["state"]}, out_dir / f"rank{dist.get_rank()}.pt")


def test_same_checkpoint_scores_identically_with_one_and_two_processes(store_path, tmp_path):
    cfg = small_config("TRAINING.num_epochs=2", "TRAINING.eval_batch_size=16", "MODEL.predict_from=query+neighbors")
    trained = train_fold(store_path, 0, cfg, tmp_path, show_progress=False)
    run_dir = tmp_path / "synth" / "fold-0"
    spawn_ddp(_score_worker, 1, run_dir, tmp_path / "one.json")
    spawn_ddp(_score_worker, 2, run_dir, tmp_path / "two.json")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["n_spots"] == trained["n_spots"] > 16 * 2         # several chunks, split over the ranks
    assert one == two
    assert one["R"] == pytest.approx(trained["R"], abs=1e-5)


def test_ddp_training_keeps_ranks_in_step(store_path, tmp_path):
    spawn_ddp(_fit_worker, 2, store_path, tmp_path, ["TRAINING.num_epochs=3"])
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in states[0]["final"]:
        assert torch.equal(states[0]["final"][key], states[1]["final"][key]), key
        assert torch.equal(states[0]["best"][key], states[1]["best"][key]), key
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], states[0]["best"][k]) for k in saved)
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log) == 3 and log[-1]["train_loss"] < log[0]["train_loss"]


def test_fold_parallel_processes_collect_every_fold(store_path, tmp_path):
    cfg = small_config()
    parallel = train_folds(store_path, "all", cfg, tmp_path, model_kind="ridge", devices=["cpu", "cpu"],
                           show_progress=False)
    sequential = train_folds(store_path, "all", cfg, tmp_path / "seq", model_kind="ridge", show_progress=False)
    assert [r["fold"] for r in parallel] == [0, 1, 2]
    for r, s in zip(parallel, sequential):
        run_dir = tmp_path / "synth" / "baselines" / "ridge" / f"fold-{r['fold']}"
        assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
        assert json.loads((run_dir / "metrics.json").read_text())["R"] == pytest.approx(r["R"])
        assert r["R"] == pytest.approx(s["R"], abs=1e-6) and r["mse"] == pytest.approx(s["mse"], abs=1e-6)
