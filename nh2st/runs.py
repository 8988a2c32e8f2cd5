"""The run folder: where training writes and eval, predict and plot read.

    runs/<store-name>/fold-<k>/                  a finished fold (NH²2ST)
    runs/<store-name>/fold-<k>.partial/          a fold being trained, interrupted or failed (resumable)
    runs/<store-name>/baselines/<kind>/fold-<k>/ the same for the mean and ridge baselines
    runs/<store-name>/metrics.json               the all-fold summary written by `nh2st eval --fold all`

A fold folder holds config.yaml, run.json (`RunInfo`, versioned), checkpoint.pt (the selected
model), log.csv / log.json and metrics.json; a partial one also last.pt (the last saved epoch's
full training state, for `--resume`; removed when the fold finishes). Training always writes into `fold-<k>.partial/` and renames it onto `fold-<k>/`
only when the fold has finished, so a finished fold is never replaced by a half-trained one:
an interrupted or failed retraining leaves the previous result in place and its own state in
the partial folder, where `nh2st train --resume` continues it.
"""

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nh2st import __version__
from nh2st.atomic import atomic_write
from nh2st.errors import NH2STError

BASELINE_KINDS = ("mean", "ridge", "mlp")      # fitted by nh2st.baselines
MODEL_KINDS = ("nh2st", *BASELINE_KINDS)
PROTOCOLS = ("default", "paper")        # selection on carved validation slides, or on the test fold (released code)
RUN_FORMAT = 2            # 1: the first build's run.json (no format_version, split, n_folds, error)
STATUSES = ("running", "finished", "interrupted", "failed")
RUN_JSON, CONFIG, CHECKPOINT, LAST = "run.json", "config.yaml", "checkpoint.pt", "last.pt"
LOG_CSV, LOG_JSON, METRICS = "log.csv", "log.json", "metrics.json"
PARTIAL = ".partial"
@dataclass
class RunInfo:
    """run.json: what a fold was trained on and how, and where it stands."""

    store: str                                 # resolved path of the store
    store_meta: dict                           # dataset, genes, backbone, weights, weights_sha256, patch_size, ...
    fold: int
    train_samples: list
    val_samples: list
    test_samples: list
    split: str = "paper"                       # the fold scheme (nh2st.splits)
    n_folds: int | None = None                 # how many folds the scheme made over the store
    protocol: str = "default"
    selected_on: str = ""                      # which split chose the checkpoint, in words
    selection_split: str = "val"               # val | test | last epoch
    model_kind: str = "nh2st"
    seed: int = 0
    device: str = "cpu"
    world_size: int = 1
    nh2st_version: str = __version__
    started: str = ""
    finished: str | None = None
    status: str = "running"
    error: str | None = None                   # the failure, for status "failed"
    best_epoch: int | None = None
    epochs_run: int | None = None
    format_version: int = RUN_FORMAT

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source="run.json") -> "RunInfo":
        """Tolerates the first build's files (no format_version: 1) and ignores keys of newer ones."""
        data = dict(data)
        data.setdefault("format_version", 1)
        data.setdefault("status", "finished")          # format 1 wrote no status before it finished
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data]
        if missing:
            raise NH2STError(f"{source}: lacks {', '.join(missing)}; it was not written by `nh2st train` — retrain the fold")
        return cls(**{k: v for k, v in data.items() if k in names})


# ---- paths ----------------------------------------------------------------------------------------------
def store_name(store_path) -> str:
    name = Path(store_path).name
    return name[:-5] if name.endswith(".zarr") else name


def run_root(runs_dir, store_path, model_kind: str = "nh2st") -> Path:
    """runs/<store-name>, or runs/<store-name>/baselines/<kind> for a baseline."""
    base = Path(runs_dir) / store_name(store_path)
    return base if model_kind == "nh2st" else base / "baselines" / model_kind


def fold_path(root, fold: int) -> Path:
    return Path(root) / f"fold-{fold}"


def partial_path(root, fold: int) -> Path:
    return Path(root) / f"fold-{fold}{PARTIAL}"


# ---- files ----------------------------------------------------------------------------------------------
def write_json(path: Path, data) -> None:
    from nh2st.metrics import to_json   # numpy-aware; metrics imports numpy only

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(to_json(data), indent=2) + "\n"))


def read_json(path: Path, what: str = "file"):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NH2STError(f"{path}: no such {what}") from None
    except json.JSONDecodeError:
        raise NH2STError(f"{path}: not valid JSON; the {what} is damaged — retrain the fold") from None


def read_info(fold_dir) -> RunInfo:
    fold_dir = Path(fold_dir)
    if not (fold_dir / RUN_JSON).is_file():
        raise NH2STError(f"{fold_dir}: no {RUN_JSON}; give a run folder written by `nh2st train`")
    return RunInfo.from_dict(read_json(fold_dir / RUN_JSON, RUN_JSON), fold_dir / RUN_JSON)


def write_info(fold_dir, info: RunInfo) -> None:
    write_json(Path(fold_dir) / RUN_JSON, info.to_dict())


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save, atomically; a failed write (torch reports a full disk as a stream error) names the folder."""
    import torch

    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(Path(path).parent).free
        raise NH2STError(f"{path}: could not be written ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                         f"{free / 2**20:,.0f} MiB free there: free some space or choose another --runs-dir, then "
                         "run again with --resume") from None


def load_checkpoint(path: Path) -> dict:
    import torch

    if not Path(path).is_file():
        raise NH2STError(f"{Path(path).parent}: no {Path(path).name}; train this fold with `nh2st train` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on damaged files
        raise NH2STError(f"{path}: not a readable nh2st checkpoint ({type(exc).__name__}); retrain the fold") from None


# ---- state of a fold --------------------------------------------------------------------------------------
def is_finished(fold_dir) -> bool:
    """A fold counts once its checkpoint exists and its run.json says finished."""
    fold_dir = Path(fold_dir)
    if not (fold_dir / CHECKPOINT).is_file() or not (fold_dir / RUN_JSON).is_file():
        return False
    try:
        return read_info(fold_dir).status == "finished"
    except NH2STError:
        return False


def fold_state(root, fold: int) -> dict:
    """{"finished": Path | None, "partial": RunInfo | None, "partial_dir": Path} of fold `fold` under `root`."""
    done, partial = fold_path(root, fold), partial_path(root, fold)
    info = None
    if (partial / RUN_JSON).is_file():
        try:
            info = read_info(partial)
        except NH2STError:
            info = None
    return {"finished": done if is_finished(done) else None, "partial": info, "partial_dir": partial}


def finished_folds(root) -> dict[int, Path]:
    """{k: root/fold-k} for every finished fold of a run directory."""
    out = {}
    for child in Path(root).glob("fold-*"):
        suffix = child.name.removeprefix("fold-")
        if suffix.isdigit() and is_finished(child):
            out[int(suffix)] = child
    return dict(sorted(out.items()))


def expected_folds(root) -> int | None:
    """How many folds the run's fold scheme has (from any fold's run.json), None if unknown."""
    for child in sorted(Path(root).glob("fold-*")):
        try:
            n = read_info(child).n_folds
        except NH2STError:
            continue
        if n:
            return int(n)
    return None


def unfinished_note(root, fold: int) -> str:
    """Why fold `fold` has no finished result, in words, with what to do."""
    state = fold_state(root, fold)
    info = state["partial"]
    if info is None:
        return f"fold {fold}: not trained (run `nh2st train --folds {fold}`)"
    where = f"after {info.epochs_run} epochs" if info.epochs_run else "before its first epoch ended"
    what = {"failed": f"failed ({info.error})", "interrupted": "interrupted",
            "running": "running or killed"}.get(info.status, info.status)
    return f"fold {fold}: {what} {where} (continue with `nh2st train --folds {fold} --resume`)"


def check_complete(root, folds: list[int], allow_missing: bool, what: str = "eval") -> list[int]:
    """The finished folds among `folds`; an NH2STError naming the others unless `allow_missing`."""
    done = finished_folds(root)
    missing = [k for k in folds if k not in done]
    if missing and not allow_missing:
        notes = "; ".join(unfinished_note(root, k) for k in missing)
        raise NH2STError(f"{root}: {len(missing)} of {len(folds)} folds have no finished result ({notes}); "
                         f"finish them, or pass --allow-missing-folds to {what} the others")
    return [k for k in folds if k in done]


def begin_partial(root, fold: int, resume: bool) -> Path:
    """The folder a fold trains in: a fresh fold-<k>.partial/, or the existing one when resuming."""
    partial = partial_path(root, fold)
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def promote(root, fold: int) -> Path:
    """Swap a finished fold-<k>.partial/ onto fold-<k>/ (the previous result is removed only after).

    last.pt goes first: a finished fold is never resumed, and the resume state (the model with its
    optimizer moments) is the largest file of a run, ~3x the checkpoint.
    """
    partial, final = partial_path(root, fold), fold_path(root, fold)
    (partial / LAST).unlink(missing_ok=True)
    old = Path(root) / f".fold-{fold}.{os.getpid()}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)
    (Path(root) / METRICS).unlink(missing_ok=True)   # the all-fold summary no longer describes this fold
    return final


# ---- finding runs -----------------------------------------------------------------------------------------
def find_runs(runs_dir="runs") -> list[Path]:
    """Run directories under `runs_dir` (holding fold-<k>/ with run.json), most recently finished first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    candidates = [root] + [d for d in root.iterdir() if d.is_dir()]
    runs = [d for d in candidates if any(d.glob("fold-*/run.json"))]

    def latest(run: Path) -> float:
        return max(((f / RUN_JSON).stat().st_mtime for f in finished_folds(run).values()), default=0.0)
    return sorted(runs, key=latest, reverse=True)


def describe_runs(runs_dir) -> str:
    parts = []
    for run in find_runs(runs_dir):
        finished = list(finished_folds(run))
        partial = sorted(int(p.name.removeprefix("fold-").removesuffix(PARTIAL)) for p in run.glob(f"fold-*{PARTIAL}"))
        text = f"{run} (folds {', '.join(map(str, finished)) or 'none finished'}"
        text += f"; unfinished {', '.join(map(str, partial))})" if partial else ")"
        parts.append(text)
    return "; ".join(parts) if parts else f"none under {runs_dir}/"


def resolve_run(run=None, fold: int | str = "all", runs_dir="runs", allow_missing: bool = False,
                what: str = "eval") -> tuple[Path, list[int]]:
    """(run directory, fold indices) for eval, predict and plot.

    run: a run directory (runs/<store-name>), one fold directory (…/fold-<k>), or None for the most
    recent run under `runs_dir` that has `fold`. With fold="all" every fold of the run's scheme must
    have finished unless `allow_missing` (then the finished ones are used).
    """
    if run is not None:
        run = Path(run)
        if (run / RUN_JSON).is_file():  # a fold directory
            k = read_info(run).fold
            if fold not in ("all", None) and int(fold) != k:
                raise NH2STError(f"--run {run} is fold {k} but --fold {fold} was asked; drop --fold or pass the run folder")
            if not is_finished(run):
                raise NH2STError(f"{run}: training has not finished; {unfinished_note(run.parent, k)}")
            return run.parent, [k]
        if not run.is_dir():
            raise NH2STError(f"--run {run}: no such folder; runs found: {describe_runs(runs_dir)}")
    else:
        run = next((c for c in find_runs(runs_dir)
                    if (finished_folds(c) if fold in ("all", None) else int(fold) in finished_folds(c))), None)
        if run is None:
            wanted = "any finished fold" if fold in ("all", None) else f"fold {fold}"
            raise NH2STError(f"no run under {runs_dir}/ has {wanted}; runs found: {describe_runs(runs_dir)}; "
                             "train with `nh2st train --store STORE`, or pass --run")
    finished = finished_folds(run)
    if fold not in ("all", None):
        return run, check_complete(run, [int(fold)], allow_missing=False)
    n = expected_folds(run)
    wanted = list(range(n)) if n else sorted(set(finished) | _partial_folds(run))
    done = check_complete(run, wanted, allow_missing, what)
    if not done:
        raise NH2STError(f"--run {run}: no finished fold; runs found: {describe_runs(runs_dir)}")
    return run, done


def _partial_folds(run: Path) -> set[int]:
    return {int(p.name.removeprefix("fold-").removesuffix(PARTIAL)) for p in run.glob(f"fold-*{PARTIAL}")
            if p.name.removeprefix("fold-").removesuffix(PARTIAL).isdigit()}


# ---- what `nh2st train` may do with a fold folder ---------------------------------------------------------------
def plan_fold(root, fold: int, overwrite: bool = False, resume: bool = False) -> str:
    """"train", "resume" or "skip" for fold `fold` under `root`; an NH2STError where the user must choose.

    A finished fold is retrained only with `overwrite` (its result stays until the new one finishes)
    and skipped with `resume`; an unfinished one is continued with `resume` or restarted with `overwrite`.
    """
    if overwrite and resume:
        raise NH2STError("--overwrite and --resume: choose one (retrain from scratch, or continue unfinished folds)")
    state = fold_state(root, fold)
    if overwrite:
        return "train"
    if state["partial"] is not None or state["partial_dir"].is_dir():
        if resume:
            return "resume"
        raise NH2STError(f"{root}: {unfinished_note(root, fold)}; or pass --overwrite to start it again")
    if state["finished"] is not None:
        if resume:
            return "skip"
        when = read_info(state["finished"]).finished or "earlier"
        raise NH2STError(f"{state['finished']}: fold {fold} already finished ({when}); pass --overwrite to retrain it "
                         "(the old result stays until the new one finishes) or --runs-dir for a new run folder")
    return "train"
