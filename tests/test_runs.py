"""The run folder: never overwritten without asking, interrupted folds resume, failures say so,
early stopping and the schedule do what the config says."""

import json
from pathlib import Path

import pytest
import torch

from nh2st.errors import NH2STError
from nh2st.evaluate import evaluate
from nh2st.model import NH2ST
from nh2st.runs import resolve_run
from nh2st.training import fit, train_fold, train_folds
from nh2st.training import loop
from test_training import SHAPE, build_store, small_config, tiny_spots

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("stores") / "synth.zarr", grid=(8, 6))


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read(path):
    return json.loads(path.read_text())


def test_a_finished_fold_is_never_retrained_without_overwrite(store_path, tmp_path):
    cfg = small_config("TRAINING.num_epochs=1")
    train_fold(store_path, 0, cfg, tmp_path, show_progress=False)
    before = snapshot(tmp_path)
    with pytest.raises(NH2STError, match=r"fold 0 already finished .*pass --overwrite"):
        train_fold(store_path, 0, cfg, tmp_path, show_progress=False)
    with pytest.raises(NH2STError, match=r"fold 0 already finished"):   # checked for every fold before training any
        train_folds(store_path, [1, 0], cfg, tmp_path, show_progress=False)
    assert snapshot(tmp_path) == before and not (tmp_path / "synth" / "fold-1").exists()
    skipped = train_fold(store_path, 0, cfg, tmp_path, show_progress=False, resume=True)
    assert skipped["skipped"] and snapshot(tmp_path) == before
    with pytest.raises(NH2STError, match="choose one"):
        train_fold(store_path, 0, cfg, tmp_path, show_progress=False, resume=True, overwrite=True)

    # an all-fold summary describes the folds it saw: retraining one removes it
    evaluate(tmp_path / "synth", "all", show_progress=False, allow_missing_folds=True)
    assert (tmp_path / "synth" / "metrics.json").is_file()
    train_fold(store_path, 0, small_config("TRAINING.num_epochs=1", "GENERAL.seed=5"), tmp_path,
               show_progress=False, overwrite=True)
    assert not (tmp_path / "synth" / "metrics.json").exists()
    assert read(tmp_path / "synth" / "fold-0" / "run.json")["seed"] == 5


def interrupt_at_epoch(monkeypatch, epoch: int, error=KeyboardInterrupt):
    calls = {"n": 0}
    original = loop.train_epoch

    def train_epoch(*args, **kwargs):
        if calls["n"] == epoch:
            raise error
        calls["n"] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "train_epoch", train_epoch)


def test_resume_continues_an_interrupted_fold_to_the_same_result(store_path, tmp_path, monkeypatch):
    cfg = small_config("TRAINING.num_epochs=4", "TRAINING.early_stopping.patience=10")
    reference = train_fold(store_path, 1, cfg, tmp_path / "straight", show_progress=False)

    monkeypatch.setattr(loop, "SAVE_EVERY_S", 0.0)
    with monkeypatch.context() as patch:
        interrupt_at_epoch(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train_fold(store_path, 1, cfg, tmp_path / "resumed", show_progress=False)
    partial = tmp_path / "resumed" / "synth" / "fold-1.partial"
    info = read(partial / "run.json")
    assert info["status"] == "interrupted" and info["epochs_run"] == 2 and (partial / "last.pt").is_file()
    with pytest.raises(NH2STError, match=r"fold 1: interrupted after 2 epochs .*--resume"):
        resolve_run(tmp_path / "resumed" / "synth", 1)
    with pytest.raises(NH2STError, match=r"interrupted after 2 epochs.*--overwrite to start it again"):
        train_fold(store_path, 1, cfg, tmp_path / "resumed", show_progress=False)

    resumed = train_fold(store_path, 1, cfg, tmp_path / "resumed", show_progress=False, resume=True)
    assert not partial.exists()
    finished = tmp_path / "resumed" / "synth" / "fold-1"
    assert (finished / "checkpoint.pt").is_file() and not (finished / "last.pt").exists()   # resume state dropped
    for key in ("R", "pcc_mean", "mse", "mae", "best_epoch", "epochs_run"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
    logs = [read(tmp_path / d / "synth" / "fold-1" / "log.json") for d in ("straight", "resumed")]
    assert [r["train_loss"] for r in logs[0]] == pytest.approx([r["train_loss"] for r in logs[1]], rel=1e-5)


def test_a_failure_is_recorded_with_its_error_and_keeps_the_finished_fold(store_path, tmp_path, monkeypatch):
    cfg = small_config("TRAINING.num_epochs=1")
    train_fold(store_path, 2, cfg, tmp_path, show_progress=False)
    before = snapshot(tmp_path / "synth" / "fold-2")
    interrupt_at_epoch(monkeypatch, 0, RuntimeError("out of device memory"))
    with pytest.raises(RuntimeError):
        train_fold(store_path, 2, cfg, tmp_path, show_progress=False, overwrite=True)
    info = read(tmp_path / "synth" / "fold-2.partial" / "run.json")
    assert info["status"] == "failed" and info["error"] == "RuntimeError: out of device memory"
    assert snapshot(tmp_path / "synth" / "fold-2") == before                 # the earlier result still serves
    assert resolve_run(tmp_path / "synth", 2) == (tmp_path / "synth", [2])


def test_config_that_disagrees_with_the_store_is_refused_before_writing(store_path, tmp_path):
    with pytest.raises(NH2STError, match=r"DATASET.num_neighbors=5 but .* holds 9 neighbours per spot"):
        train_folds(store_path, "all", small_config("DATASET.num_neighbors=5"), tmp_path, show_progress=False)
    with pytest.raises(NH2STError, match=r"DATASET.radius=256 but .* 224-px patches"):
        train_fold(store_path, 0, small_config("DATASET.radius=256"), tmp_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- the loop's epoch-level rules, on scripted validation scores --------------------------------------------
def scripted_fit(monkeypatch, tmp_path, values: dict, *overrides, select="val"):
    """fit() on a tiny fold whose validation scores follow `values` (lists per metric)."""
    spots = tiny_spots(10)
    epoch = {"n": 0}

    def score(*args, **kwargs):
        i = epoch["n"]
        epoch["n"] += 1
        return {"mse": values.get("loss", [1.0] * 99)[i], "R": values.get("R", [0.0] * 99)[i],
                "pcc_mean": values.get("pcc", [0.0] * 99)[i]}
    monkeypatch.setattr(loop, "validation_scores", score)
    cfg = small_config(*overrides)
    model = NH2ST.from_config(cfg.MODEL, 5, SHAPE)
    return fit(model, spots, cfg, tmp_path, [f"g{i}" for i in range(5)], select, show_progress=False)


def test_early_stopping_stops_after_patience_and_keeps_the_best(monkeypatch, tmp_path):
    out = scripted_fit(monkeypatch, tmp_path, {"R": [0.1, 0.3, 0.2, 0.25, 0.9, 0.9, 0.9, 0.9]},
                       "TRAINING.num_epochs=8", "TRAINING.early_stopping.patience=2")
    assert out["best_epoch"] == 1 and len(out["history"]) == 4          # epochs 2 and 3 did not improve
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("monitor, values, best", [("loss", {"loss": [0.5, 0.4, 0.45, 0.3, 0.35, 0.36]}, 3),
                                                   ("pcc", {"pcc": [0.1, 0.2, 0.15, 0.18, 0.19, 0.05]}, 1)])
def test_monitors_loss_and_pcc_pick_their_own_direction(monkeypatch, tmp_path, monitor, values, best):
    out = scripted_fit(monkeypatch, tmp_path, values, "TRAINING.num_epochs=6", "TRAINING.early_stopping.patience=9",
                       f"TRAINING.early_stopping.monitor={monitor}")
    assert out["best_epoch"] == best and len(out["history"]) == 6


def test_step_lr_schedule_is_logged_per_epoch(monkeypatch, tmp_path):
    out = scripted_fit(monkeypatch, tmp_path, {}, "TRAINING.num_epochs=5", "TRAINING.learning_rate=0.004",
                       "TRAINING.lr_scheduler.step_size=2", "TRAINING.lr_scheduler.gamma=0.5",
                       "TRAINING.early_stopping.patience=9")
    assert [row["lr"] for row in out["history"]] == pytest.approx([0.004, 0.004, 0.002, 0.002, 0.001])


def test_without_validation_the_last_epoch_is_kept(store_path, tmp_path):
    result = train_fold(store_path, 0, small_config("TRAINING.num_epochs=3", "TRAINING.val_fraction=0"), tmp_path,
                        show_progress=False)
    info = read(tmp_path / "synth" / "fold-0" / "run.json")
    assert result["best_epoch"] == 2 and info["selection_split"] == "last epoch" and info["val_samples"] == []


def test_a_failing_fold_worker_is_reported_and_the_others_finish(store_path, tmp_path):
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "fold-1.partial").write_text("not a folder")     # fold 1 cannot make its run folder
    with pytest.raises(NH2STError, match=r"1 of 2 folds failed \(fold 1: FileExistsError"):
        train_folds(store_path, [0, 1], small_config("TRAINING.num_epochs=1"), tmp_path, devices=["cpu", "cpu"],
                    show_progress=False)
    assert read(tmp_path / "synth" / "fold-0" / "run.json")["status"] == "finished"


def test_the_fold_scheme_reaches_training(store_path, tmp_path):
    """DATASET.fold_scheme (or --split) decides the folds training uses, and run.json records it."""
    patients = {"DEMO1": "p1", "DEMO2": "p1", "DEMO3": "p2", "DEMO4": "p2", "DEMO5": "p3", "DEMO6": "p3"}
    cfg = small_config("TRAINING.num_epochs=1", "DATASET.fold_scheme=patient")
    results = train_folds(store_path, "all", cfg, tmp_path, model_kind="ridge", patients=patients, show_progress=False)
    tested = sorted(tuple(r["test_samples"]) for r in results)
    assert tested == [("DEMO1", "DEMO2"), ("DEMO3", "DEMO4"), ("DEMO5", "DEMO6")]     # one patient out, whole
    info = read(tmp_path / "synth" / "baselines" / "ridge" / "fold-0" / "run.json")
    assert info["split"] == "patient" and info["n_folds"] == 3
    loo = train_folds(store_path, [4], small_config("TRAINING.num_epochs=1"), tmp_path / "loo", model_kind="mean",
                      split="loo", show_progress=False)
    assert loo[0]["test_samples"] == ["DEMO5"] and loo[0]["split"] == "loo"


def test_a_checkpoint_that_cannot_be_written_is_named_and_leaves_nothing(tmp_path, monkeypatch):
    from nh2st.runs import save_checkpoint

    def full_disk(state, f):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("basic_ios::clear: iostream error")      # how torch.save reports ENOSPC
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(NH2STError, match=r"last\.pt: could not be written .*MiB free there.*--resume"):
        save_checkpoint(tmp_path / "fold-0.partial" / "last.pt", {"epoch": 1})
    assert list((tmp_path / "fold-0.partial").iterdir()) == []
