"""Score trained runs on their test samples: `nh2st eval`.

    fold = evaluate_fold("runs/demo/fold-0")                 # metrics dict; writes files below
    summary = evaluate("runs/demo", folds="all")             # + mean ± std over folds, baselines

For a fold directory (runs/<store-name>/fold-<k>/, layout in docs/internals.md) this loads the
run's checkpoint (`nh2st.training.load_trained`), predicts every test sample listed in run.json
from its cached feature maps (neighbour index included, expression never), and writes

    predictions.zarr/<sample id>/{predictions, targets, pixel_xy, barcodes}   (atomically replaced)
    metrics.json    pooled metrics at the top level (as training writes them), plus per_sample,
                    per_sample_mean, hvg_genes and provenance

Metrics are nh2st.metrics: pooled over the fold's test slides, and per slide. HVG-50 genes come
from the fold's *training* samples' targets (as the training loop chooses them). `evaluate` adds
mean ± std over folds (population std), for NH²2ST and for the mean / ridge baselines trained
under runs/<store-name>/baselines/<model>/fold-<k>/, and writes runs/<store-name>/metrics.json.
"""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

from nh2st import __version__, metrics
from nh2st.errors import NH2STError
from nh2st.progress import make_progress
from nh2st.store import EmbeddingStore
from nh2st.training import load_trained, write_json

PREDICTIONS = "predictions.zarr"
METRICS = "metrics.json"
BASELINE_KINDS = ("mean", "ridge")
VALUE_SPACE = ("normalised to 10,000 over the run's genes, log10(x+1), 3x3 grid-smoothed (the training "
               "targets); NOT counts")


# ---- finding runs ----------------------------------------------------------------------------------------
def read_run_json(fold_dir: Path) -> dict:
    path = Path(fold_dir) / "run.json"
    if not path.is_file():
        raise NH2STError(f"{fold_dir}: no run.json; give a run folder written by `nh2st train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise NH2STError(f"{path}: not valid JSON; retrain the fold") from None


def is_trained(fold_dir: Path) -> bool:
    """A fold counts once its checkpoint exists and training finished (an older run.json without status counts too)."""
    fold_dir = Path(fold_dir)
    if not (fold_dir / "checkpoint.pt").is_file() or not (fold_dir / "run.json").is_file():
        return False
    try:
        status = json.loads((fold_dir / "run.json").read_text()).get("status", "finished")
    except json.JSONDecodeError:
        return False
    return status == "finished"


def fold_dirs(run_dir: Path) -> dict[int, Path]:
    """{k: run_dir/fold-k} for every trained fold of a run directory."""
    out = {}
    for child in Path(run_dir).glob("fold-*"):
        suffix = child.name.removeprefix("fold-")
        if suffix.isdigit() and is_trained(child):
            out[int(suffix)] = child
    return dict(sorted(out.items()))


def find_runs(runs_root="runs") -> list[Path]:
    """Run directories under `runs_root` (those holding fold-<k>/ with run.json), most recent first.

    Recency is the latest modification time of a trained fold's run.json (rewritten when training ends).
    """
    root = Path(runs_root)
    if not root.is_dir():
        return []
    candidates = [root] + [d for d in root.iterdir() if d.is_dir()]
    runs = [d for d in candidates if any(d.glob("fold-*/run.json"))]

    def latest(run: Path) -> float:
        times = [(f / "run.json").stat().st_mtime for f in fold_dirs(run).values()]
        return max(times, default=0.0)
    return sorted(runs, key=latest, reverse=True)


def _describe_runs(runs_root) -> str:
    parts = []
    for run in find_runs(runs_root):
        trained = list(fold_dirs(run))
        untrained = sorted(int(p.name.removeprefix("fold-")) for p in run.glob("fold-*")
                           if p.name.removeprefix("fold-").isdigit() and not is_trained(p))
        text = f"{run} (folds {', '.join(map(str, trained)) or 'none finished'}"
        text += f"; unfinished {', '.join(map(str, untrained))})" if untrained else ")"
        parts.append(text)
    return "; ".join(parts) if parts else f"none under {runs_root}/"


def resolve_run(run=None, fold: int | str = "all", runs_root="runs") -> tuple[Path, list[int]]:
    """(run directory, fold indices) for `nh2st eval`.

    run: a run directory (runs/<store-name>), a fold directory (…/fold-<k>), or None for the most
    recent run under `runs_root` that has `fold` (any trained fold for "all").
    A fold without a finished training is an NH2STError that lists the runs and folds that exist.
    """
    if run is not None:
        run = Path(run)
        if (run / "run.json").is_file():  # a fold directory
            k = int(read_run_json(run).get("fold", run.name.removeprefix("fold-")))
            if fold not in ("all", None) and int(fold) != k:
                raise NH2STError(f"--run {run} is fold {k} but --fold {fold} was asked; drop --fold or pass the run folder")
            if not is_trained(run):
                raise NH2STError(f"{run}: training has not finished (no checkpoint.pt or status not finished); "
                                 "train it with `nh2st train`")
            return run.parent, [k]
        if not run.is_dir():
            raise NH2STError(f"--run {run}: no such folder; runs found: {_describe_runs(runs_root)}")
        trained = fold_dirs(run)
        if not trained:
            raise NH2STError(f"--run {run}: no trained fold (fold-<k>/ with checkpoint.pt); runs found: "
                             f"{_describe_runs(runs_root)}")
        if fold in ("all", None):
            return run, list(trained)
        if int(fold) not in trained:
            raise NH2STError(f"--run {run} has no trained fold {fold} (trained: "
                             f"{', '.join(map(str, trained))}); train it with `nh2st train --folds {fold}`")
        return run, [int(fold)]
    for candidate in find_runs(runs_root):
        trained = fold_dirs(candidate)
        if fold in ("all", None) and trained:
            return candidate, list(trained)
        if fold not in ("all", None) and int(fold) in trained:
            return candidate, [int(fold)]
    wanted = "any trained fold" if fold in ("all", None) else f"fold {fold}"
    raise NH2STError(f"no run under {runs_root}/ has {wanted}; runs found: {_describe_runs(runs_root)}; "
                     "train with `nh2st train --store STORE`, or pass --run")


# ---- store checks --------------------------------------------------------------------------------------
def open_run_store(run: dict, fold_dir: Path, store=None) -> EmbeddingStore:
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
    run = read_run_json(fold_dir)
    opened = open_run_store(run, fold_dir, store)
    predictor = load_trained(fold_dir, device)
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
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nh2st_version": __version__,
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


def evaluate(run=None, folds="all", store=None, runs_root="runs", device="cpu", show_progress: bool = True) -> dict:
    """Evaluate folds of a run and the baselines trained beside it; returns and writes <run>/metrics.json.

    folds: "all" (every trained fold), an int, or a list of ints. run: see :func:`resolve_run`.
    Result: {"run", "folds", "models": {kind: {"folds": {k: fold metrics}, "summary": {metric:
    {mean, std, n}}}}}, NH²2ST first, then each baseline trained for any of those folds.
    """
    if isinstance(folds, (list, tuple)):
        run_dir, available = resolve_run(run, "all", runs_root)
        missing = [int(k) for k in folds if int(k) not in available]
        if missing:
            raise NH2STError(f"{run_dir}: no trained fold {', '.join(map(str, missing))} (trained: "
                             f"{', '.join(map(str, available)) or 'none'})")
        indices = sorted(int(k) for k in folds)
    else:
        run_dir, indices = resolve_run(run, folds, runs_root)
    jobs = [("nh2st", k, run_dir / f"fold-{k}") for k in indices]
    for kind in BASELINE_KINDS:
        trained = fold_dirs(run_dir / "baselines" / kind)
        jobs += [(kind, k, trained[k]) for k in indices if k in trained]
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
    result = metrics.to_json({"run": str(run_dir), "folds": indices, "value_space": VALUE_SPACE,
                              "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": models})
    write_json(run_dir / METRICS, result)
    return result
