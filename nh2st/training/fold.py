"""One fold end to end: load its spots, train (NH²2ST or a baseline), score the test samples once.

Protocol. "default": the validation split is whole training slides (TRAINING.val_fraction,
seeded); early stopping and checkpoint selection look only at it; the test fold is scored once,
at the end, with the selected checkpoint. "paper": the released code's choice, selection on the
test fold itself (run.json says so; test scores are then optimistic).

The fold trains in runs/<store>/fold-<k>.partial/ and becomes fold-<k>/ when it finishes
(nh2st.runs); run.json records running, then finished, interrupted (Ctrl-C) or failed (any
other error, with the message).
"""

import time
from pathlib import Path

import torch

from nh2st import __version__, metrics, now
from nh2st.baselines import fit_baseline, pool
from nh2st.config import Config, save_config
from nh2st.devices import resolve_device
from nh2st.errors import NH2STError
from nh2st.model import NH2ST
from nh2st.predictor import Predictor
from nh2st.runs import (CHECKPOINT, CONFIG, LOG_JSON, METRICS, MODEL_KINDS, PROTOCOLS, RunInfo, begin_partial,
                        fold_path, partial_path, plan_fold, promote, read_info, read_json, run_root, save_checkpoint,
                        write_info, write_json)
from nh2st.store import EmbeddingStore
from nh2st.training.data import FoldSpots, fold_split_ids, store_folds
from nh2st.training.loop import checkpoint_state, fit, rank_world, write_log



def open_store(store) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)


def check_choices(model_kind: str, protocol: str) -> None:
    if model_kind not in MODEL_KINDS:
        raise NH2STError(f"--model {model_kind!r}: use one of {', '.join(MODEL_KINDS)}")
    if protocol not in PROTOCOLS:
        raise NH2STError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")


def check_config_fits_store(cfg: Config, store: EmbeddingStore) -> None:
    """DATASET keys describe the store; a config that disagrees with it is refused, not ignored."""
    if cfg.DATASET.num_neighbors != store.meta.neighbors_k:
        raise NH2STError(f"DATASET.num_neighbors={cfg.DATASET.num_neighbors} but {store.path} holds "
                         f"{store.meta.neighbors_k} neighbours per spot; set DATASET.num_neighbors="
                         f"{store.meta.neighbors_k} or extract a store with that many")
    if cfg.DATASET.radius != store.meta.patch_size:
        raise NH2STError(f"DATASET.radius={cfg.DATASET.radius} but {store.path} was extracted with "
                         f"{store.meta.patch_size}-px patches; set DATASET.radius={store.meta.patch_size} "
                         "or extract a store with that patch size")


def selection_note(protocol: str, select: str | None) -> str:
    if select is None:
        return "none: TRAINING.val_fraction=0, the last epoch is kept"
    if protocol == "paper":
        return "test fold (paper protocol, the released code's choice: test scores are optimistic)"
    return "validation samples carved from the training fold"


def train_fold(store, fold: int, cfg: Config | None = None, runs_dir="runs", protocol: str = "default",
               model_kind: str = "nh2st", device="auto", show_progress: bool = True, split: str | None = None,
               patients: dict | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """Train and test one fold; writes its run folder and returns the test metrics summary.

    split: the fold scheme (default cfg.DATASET.fold_scheme); patients: sample -> patient for
    split "patient" (default: what extraction recorded). A finished fold is refused unless
    `overwrite` (skipped with `resume`, returning its recorded metrics). Under an initialised
    torch.distributed process group this is one DDP rank of the fold.
    """
    check_choices(model_kind, protocol)
    cfg = cfg or Config()
    store = open_store(store)
    check_config_fits_store(cfg, store)
    split = split or cfg.DATASET.fold_scheme
    all_folds = store_folds(store, split, patients)
    by_index = {f.index: f for f in all_folds}
    if fold not in by_index:
        raise NH2STError(f"--folds {fold}: {store.path} ({store.meta.dataset}, {split} split) has folds "
                         f"{', '.join(map(str, by_index))}")
    root = run_root(runs_dir, store.path, model_kind)
    action = plan_fold(root, fold, overwrite, resume)
    if action == "skip":
        return {**read_json(fold_path(root, fold) / METRICS, METRICS), "run_dir": str(fold_path(root, fold)),
                "skipped": True}
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    split_ids, select = fold_split_ids(by_index[fold], cfg, protocol)
    genes = list(store.meta.genes)
    rank, world = rank_world()
    run_dir = partial_path(root, fold)
    info = RunInfo(store=str(Path(store.path).resolve()),
                   store_meta={k: store.meta.to_dict()[k] for k in
                               ("dataset", "genes", "backbone", "weights", "weights_sha256", "patch_size",
                                "feature_shape", "neighbors_k", "normalisation", "views")},
                   fold=fold, **{f"{name}_samples": ids for name, ids in split_ids.items()},
                   split=split, n_folds=len(all_folds), protocol=protocol,
                   selected_on=selection_note(protocol, select), selection_split=select or "last epoch",
                   model_kind=model_kind, seed=cfg.GENERAL.seed, device=str(device), world_size=world,
                   nh2st_version=__version__, started=now())
    if world > 1:
        torch.distributed.barrier()    # every rank has planned before rank 0 touches the folder
    if rank == 0:
        begin_partial(root, fold, resume=action == "resume")
        save_config(cfg, run_dir / CONFIG)
        write_info(run_dir, info)
    if world > 1:
        torch.distributed.barrier()

    def finish(status: str, **fields) -> None:
        if rank == 0:
            if (run_dir / LOG_JSON).is_file() and "epochs_run" not in fields:
                fields["epochs_run"] = len(read_json(run_dir / LOG_JSON, LOG_JSON))
            for key, value in {"status": status, "finished": now(), **fields}.items():
                setattr(info, key, value)
            write_info(run_dir, info)

    try:
        torch.manual_seed(cfg.GENERAL.seed)
        with_operator = model_kind == "nh2st" and cfg.MODEL.neighbor_branch
        spots = FoldSpots.load(store, split_ids, device, cfg.MODEL.hyperedge_k if with_operator else None,
                               views=model_kind == "nh2st" and cfg.TRAINING.augment)
        if model_kind == "nh2st":
            summary = train_nh2st(spots, cfg, run_dir, genes, store.meta.feature_shape, select, show_progress,
                                  f"fold {fold}", resume=action == "resume")
        else:
            summary = train_baseline(model_kind, spots, cfg, run_dir, genes, store.meta.feature_shape, select)
        test_rows = spots.split["test"]
        hvg = metrics.hvg_indices(spots.targets[spots.split["train"]].cpu().numpy())
        test_scores = metrics.score(summary.pop("test_predictions"), spots.targets[test_rows].cpu().numpy(),
                                    genes, hvg)
    except KeyboardInterrupt:
        finish("interrupted")
        raise
    except Exception as exc:
        finish("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    result = {"fold": fold, "model_kind": model_kind, "protocol": protocol, "split": split,
              "test_samples": split_ids["test"], "selected_on": info.selected_on, "selection_split": info.selection_split,
              "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"], **test_scores}
    if rank == 0:
        write_json(run_dir / METRICS, result)
        finish("finished", best_epoch=summary["best_epoch"], epochs_run=summary["epochs_run"])
        final = promote(root, fold)
    if world > 1:
        torch.distributed.barrier()    # the fold folder is in place before any rank returns
    if rank != 0:
        final = fold_path(root, fold)
    return {**result, "run_dir": str(final)}


def train_nh2st(spots, cfg, run_dir, genes, feature_shape, select, show_progress, label, resume=False) -> dict:
    model = NH2ST.from_config(cfg.MODEL, len(genes), feature_shape)
    rank, _ = rank_world()
    torch.manual_seed(cfg.GENERAL.seed + rank)     # dropout masks differ per rank; init is broadcast by DDP
    model.to(spots.features.device)
    if model.input_norm != "none":
        model.set_feature_stats(spots.features[spots.split["train"]])
    fitted = fit(model, spots, cfg, run_dir, genes, select, show_progress, label, resume=resume)
    model.load_state_dict(fitted["state"])
    predictor = Predictor("nh2st", genes, cfg, feature_shape, model=model, device=spots.features.device)
    predictions = predictor.predict(spots.features, spots.neighbors, spots.split["test"], spots.operator)
    return {"best_epoch": fitted["best_epoch"], "epochs_run": len(fitted["history"]), "test_predictions": predictions}


def train_baseline(kind, spots, cfg, run_dir, genes, feature_shape, select) -> dict:
    """Baselines have nothing to select: fit on the training spots, log validation once."""
    started = time.perf_counter()
    train_rows = spots.split["train"]
    pooled = pool(spots.features).cpu()
    baseline = fit_baseline(kind, pooled[train_rows.cpu()].numpy(), spots.targets[train_rows].cpu().numpy(),
                            seed=cfg.GENERAL.seed)
    row = {"epoch": 0, "train_loss": None, "lr": None}
    if select is not None:
        rows = spots.split[select]
        hvg = metrics.hvg_indices(spots.targets[train_rows].cpu().numpy())
        scores = metrics.score(baseline.predict(pooled[rows.cpu()]).numpy(), spots.targets[rows].cpu().numpy(),
                               genes, hvg)
        row.update(val_loss=scores["mse"], val_R=scores["R"], val_pcc=scores["pcc_mean"])
    row["seconds"] = time.perf_counter() - started
    if rank_world()[0] == 0:
        write_log(run_dir, [row])
        save_checkpoint(run_dir / CHECKPOINT, checkpoint_state(kind, baseline.state_dict(), cfg, genes, feature_shape, 0))
    return {"best_epoch": 0, "epochs_run": 1,
            "test_predictions": baseline.predict(pooled[spots.split["test"].cpu()]).numpy()}


def score_run(fold_dir, split: str = "test", device="cpu") -> dict:
    """Re-score a finished NH²2ST fold's checkpoint on one of its splits (DDP-aware, see Predictor)."""
    fold_dir = Path(fold_dir)
    predictor = Predictor.load(fold_dir, device)
    if predictor.model is None:
        raise NH2STError(f"{fold_dir}: score_run re-scores NH²2ST runs; baselines are scored by `nh2st eval`")
    info = read_info(fold_dir)
    ids = {"train": info.train_samples, split: getattr(info, f"{split}_samples")}
    model = predictor.model
    spots = FoldSpots.load(EmbeddingStore.open(info.store), ids, predictor.device,
                           model.hyperedge_k if model.neighbors_at_inference else None)
    rows = spots.split[split]
    hvg = metrics.hvg_indices(spots.targets[spots.split["train"]].cpu().numpy())
    return metrics.score(predictor.predict(spots.features, spots.neighbors, rows, spots.operator),
                         spots.targets[rows].cpu().numpy(), predictor.genes, hvg)
