"""Score trained runs on their test samples: `nh2st eval`.

    fold = evaluate_fold("runs/demo/fold-0")                 # metrics dict; writes files below
    summary = evaluate("runs/demo", folds="all")             # + mean ± std over folds, baselines

For a fold directory (runs/<store-name>/fold-<k>/, layout in nh2st.runs) this loads the
run's checkpoint (`Predictor.load`), predicts every test sample listed in run.json
from its cached feature maps (neighbour index included, expression never), and writes

    predictions.zarr/<sample id>/{predictions, targets, pixel_xy, barcodes}   (atomically replaced)
    metrics.json    pooled metrics at the top level (as training writes them), plus per_sample,
                    per_sample_mean, hvg_genes and provenance

Metrics are nh2st.metrics: pooled over the fold's test slides, and per slide. HVG-50 genes come
from the fold's *training* samples' targets (as the training loop chooses them). `evaluate` adds
mean ± std over folds (population std), for NH²2ST and for the mean / ridge baselines trained
under runs/<store-name>/baselines/<model>/fold-<k>/. Only an evaluation of every fold writes the
all-fold summary runs/<store-name>/metrics.json; one fold's evaluation writes that fold's files only.
Folds that have not finished are an error unless allowed, and are then named in the result.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from nh2st import __version__, metrics, now
from nh2st.baselines import BASELINES
from nh2st.errors import NH2STError
from nh2st.predictor import Predictor
from nh2st.progress import make_progress
from nh2st.runs import METRICS, expected_folds, finished_folds, read_info, resolve_run, write_json
from nh2st.store import EmbeddingStore

PREDICTIONS = "predictions.zarr"
VALUE_SPACE = ("normalised to 10,000 over the run's genes, log10(x+1), 3x3 grid-smoothed (the training "
               "targets); NOT counts")


# ---- store checks --------------------------------------------------------------------------------------
def open_run_store(run: dict, fold_dir: Path, store=None) -> EmbeddingStore:
    # run: the fold's run.json as a dict
    """The store a run was trained on (or `store`), refused if its genes or backbone differ from the run's."""
    if isinstance(store, EmbeddingStore):
        opened = store
    else:
        path = Path(store) if store is not None else Path(run.get("store", ""))
        if store is None and not (path / "zarr.json").is_file():
            raise NH2STError(f"{fold_dir}/run.json: the store it was trained on ({path}) is gone; pass --store")
        opened = EmbeddingStore.open(path)
    check_store_matches(opened, run, fold_dir)
    return opened


def check_store_matches(store: EmbeddingStore, run: dict, fold_dir: Path) -> None:
    recorded = run.get("store_meta", {})
    if list(store.meta.genes) != list(recorded.get("genes", [])):
        theirs = list(recorded.get("genes", []))
        diff = sorted(set(store.meta.genes) ^ set(theirs))[:5]
        detail = f"e.g. {', '.join(diff)}" if diff else "same genes, other order"
        raise NH2STError(f"{store.path}: store genes differ from run {fold_dir}'s ({len(store.meta.genes)} vs "
                         f"{len(theirs)} genes, {detail}); pass the --store the run was trained on ({run.get('store')})")
    for field in ("weights_sha256", "backbone"):
        if field in recorded and getattr(store.meta, field) != recorded[field]:
            raise NH2STError(f"{store.path}: store {field} {str(getattr(store.meta, field))[:16]} differs from run "
                             f"{fold_dir}'s {str(recorded[field])[:16]}: its features come from another backbone; "
                             f"pass the --store the run was trained on ({run.get('store')})")


# ---- one fold ------------------------------------------------------------------------------------------
def _write_predictions(fold_dir: Path, per_sample: dict, attrs: dict) -> Path:
    """predictions.zarr written beside, then swapped in, so a reader never sees a half-written group."""
    final = fold_dir / PREDICTIONS
    tmp = fold_dir / f".{PREDICTIONS}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update(metrics.to_json(attrs))
        for sample_id, arrays in per_sample.items():
            group = root.create_group(sample_id)
            for name, values in arrays.items():
                values = np.asarray(values)
                dtype = str if values.dtype.kind in "UO" else values.dtype
                group.create_array(name, shape=values.shape, dtype=dtype)[...] = values
        old = fold_dir / f".{PREDICTIONS}.{os.getpid()}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_predictions(fold_dir) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(attributes, {sample id: {predictions, targets, pixel_xy, barcodes}}) of a fold's predictions.zarr."""
    path = Path(fold_dir) / PREDICTIONS
    if not (path / "zarr.json").is_file():
        raise NH2STError(f"{fold_dir}: no {PREDICTIONS}; run `nh2st eval --run {Path(fold_dir).parent}` first")
    root = zarr.open_group(str(path), mode="r")
    attrs = root.attrs.asdict()
    samples = {}
    for sample_id in attrs.get("test_samples", sorted(root.group_keys())):
        group = root[sample_id]
        samples[sample_id] = {name: np.asarray(group[name][...]) for name in group.array_keys()}
    return attrs, samples


def evaluate_fold(fold_dir, store=None, device="cpu", write: bool = True) -> dict:
    """Predict and score one trained fold (NH²2ST or a baseline) on its test samples.

    store: path or EmbeddingStore overriding the one recorded in run.json (checked for the
    same genes and backbone). Returns the metrics dict also written to <fold_dir>/metrics.json.
    """
    fold_dir = Path(fold_dir)
    run = read_info(fold_dir).to_dict()
    opened = open_run_store(run, fold_dir, store)
    predictor = Predictor.load(fold_dir, device)
    genes = predictor.genes
    test_ids = list(run.get("test_samples", []))
    train_ids = list(run.get("train_samples", []))
    missing = [s for s in test_ids + train_ids if not opened.is_complete(s)]
    if missing:
        raise NH2STError(f"{opened.path}: lacks samples {', '.join(missing[:8])} of run {fold_dir}; "
                         "pass the --store the run was trained on")
    if not test_ids:
        raise NH2STError(f"{fold_dir}/run.json lists no test samples; retrain the fold")
    hvg = metrics.hvg_indices(np.concatenate([opened.read_sample(s, ("targets",))["targets"] for s in train_ids])) \
        if train_ids else None

    per_sample_arrays, per_sample_scores = {}, {}
    for sample_id in test_ids:
        arrays = opened.read_sample(sample_id, ("features", "neighbors", "targets", "pixel_xy", "barcodes"))
        prediction = predictor.predict(arrays["features"], arrays["neighbors"]).astype(np.float32)
        per_sample_arrays[sample_id] = {"predictions": prediction, "targets": arrays["targets"].astype(np.float32),
                                        "pixel_xy": arrays["pixel_xy"], "barcodes": arrays["barcodes"]}
        per_sample_scores[sample_id] = metrics.score(prediction, arrays["targets"], genes, hvg)
    pred = np.concatenate([a["predictions"] for a in per_sample_arrays.values()])
    true = np.concatenate([a["targets"] for a in per_sample_arrays.values()])
    pooled = metrics.score(pred, true, genes, hvg)

    result = {
        "fold": run.get("fold"), "model_kind": predictor.kind, "protocol": run.get("protocol"),
        "test_samples": test_ids, "selected_on": run.get("selected_on"), "best_epoch": run.get("best_epoch"),
        "epochs_run": run.get("epochs_run"),
        **pooled,
        "per_sample": per_sample_scores,
        "per_sample_mean": {k: metrics.mean_std([s[k] for s in per_sample_scores.values()])
                            for k in metrics.SUMMARY_KEYS},
        "genes": genes,
        "hvg_genes": [genes[i] for i in hvg] if hvg is not None else None,
        "value_space": VALUE_SPACE,
        "store": str(opened.path), "run_dir": str(fold_dir),
        "evaluated_at": now(), "nh2st_version": __version__,
    }
    if write:
        _write_predictions(fold_dir, per_sample_arrays,
                           {"genes": genes, "test_samples": test_ids, "fold": run.get("fold"),
                            "model_kind": predictor.kind, "run_dir": str(fold_dir), "store": str(opened.path),
                            "value_space": VALUE_SPACE, "nh2st_version": __version__})
        write_json(fold_dir / METRICS, result)
    return metrics.to_json(result)


# ---- several folds and the baselines -----------------------------------------------------------------------
def _summarise(fold_results: dict[int, dict]) -> dict:
    return {k: metrics.mean_std([r.get(k) for r in fold_results.values()]) for k in metrics.SUMMARY_KEYS}


def evaluate(run=None, folds="all", store=None, runs_root="runs", device="cpu", show_progress: bool = True,
             allow_missing_folds: bool = False) -> dict:
    """Evaluate folds of a run and the baselines trained beside it.

    folds: "all" (every fold of the run's scheme; unfinished ones are an error unless
    `allow_missing_folds`, and are then listed under "missing_folds"), an int, or a list of ints.
    run: see nh2st.runs.resolve_run. Result: {"run", "folds", "missing_folds", "models": {kind:
    {"folds": {k: fold metrics}, "summary": {metric: {mean, std, n}}}}}, NH²2ST first, then each
    baseline trained for any of those folds. Only folds="all" writes <run>/metrics.json.
    """
    if isinstance(folds, (list, tuple)):
        run_dir, _ = resolve_run(run, "all", runs_root, allow_missing=True)
        missing = [int(k) for k in folds if int(k) not in finished_folds(run_dir)]
        if missing:
            raise NH2STError(f"{run_dir}: no finished fold {', '.join(map(str, missing))} (finished: "
                             f"{', '.join(map(str, finished_folds(run_dir))) or 'none'})")
        indices = sorted(int(k) for k in folds)
    else:
        run_dir, indices = resolve_run(run, folds, runs_root, allow_missing=allow_missing_folds)
    n_folds = None
    if folds == "all":
        n_folds = expected_folds(run_dir)
    missing_folds = sorted(set(range(n_folds)) - set(indices)) if n_folds else []
    jobs = [("nh2st", k, run_dir / f"fold-{k}") for k in indices]
    for kind in BASELINES:
        finished = finished_folds(run_dir / "baselines" / kind)
        jobs += [(kind, k, finished[k]) for k in indices if k in finished]
    models: dict[str, dict] = {}
    progress = make_progress(transient=True) if show_progress else None
    if progress:
        progress.start()
    try:
        task = progress.add_task("evaluating", total=len(jobs)) if progress else None
        for kind, k, fold_dir in jobs:
            models.setdefault(kind, {"folds": {}})["folds"][k] = evaluate_fold(fold_dir, store, device)
            if progress:
                progress.advance(task)
    finally:
        if progress:
            progress.stop()
    for entry in models.values():
        entry["summary"] = _summarise(entry["folds"])
    result = metrics.to_json({"run": str(run_dir), "folds": indices, "missing_folds": missing_folds,
                              "value_space": VALUE_SPACE, "evaluated_at": now(), "models": models})
    if folds == "all":
        write_json(run_dir / METRICS, result)
    return result
