"""Several folds, several processes.

`train_folds(..., devices=["cuda:0", "cuda:1"])` runs folds concurrently, one process per device
(["cpu", "cpu"] runs two CPU processes). Under torchrun (`python -m nh2st.training`) one fold
trains with DDP: gradients are averaged, each rank scores a fixed set of evaluation chunks and the
predictions are gathered (nh2st.predictor), so metrics do not depend on the number of processes.
`spawn_ddp` does what torchrun does without a launcher, for tests and CPU machines.
"""

import os
import queue as queue_module
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nh2st.config import Config
from nh2st.errors import NH2STError
from nh2st.progress import make_progress
from nh2st.runs import plan_fold, run_root
from nh2st.training.data import store_folds
from nh2st.training.fold import check_choices, check_config_fits_store, open_store, train_fold


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_folds(store, folds, split: str = "paper", patients: dict | None = None) -> list[int]:
    """"all" / [ints or digit strings] -> sorted unique fold indices of the store's `split` folds."""
    store = open_store(store)
    available = [f.index for f in store_folds(store, split, patients)]
    if folds == "all" or list(folds) == ["all"]:
        return available
    out = []
    for item in folds:
        if not str(item).isdigit() or int(item) not in available:
            raise NH2STError(f"--folds {item}: {store.path} ({store.meta.dataset}, {split} split) has folds "
                             f"{', '.join(map(str, available))}, or use all")
        out.append(int(item))
    return sorted(set(out))


def _fold_worker(messages, store_path, fold_list, cfg, runs_dir, protocol, model_kind, device, n_workers, options):
    if str(device).startswith("cpu"):
        torch.set_num_threads(max(1, cpu_count() // n_workers))
    for fold in fold_list:
        try:
            result = train_fold(store_path, fold, cfg, runs_dir, protocol, model_kind, device, show_progress=False,
                                **options)
            messages.put(("done", fold, result))
        except KeyboardInterrupt:
            messages.put(("error", fold, "interrupted"))
            return
        except Exception as exc:  # reported by the parent, which raises NH2STError
            messages.put(("error", fold, f"{type(exc).__name__}: {exc}"))


def train_folds(store, folds="all", cfg: Config | None = None, runs_dir="runs", protocol: str = "default",
                model_kind: str = "nh2st", devices=("auto",), show_progress: bool = True, split: str | None = None,
                patients: dict | None = None, overwrite: bool = False, resume: bool = False) -> list[dict]:
    """Train `folds` ("all" or indices) of the store's `split` folds; returns each fold's test summary in order.

    Every fold's folder is checked before anything is trained: a finished fold needs `overwrite`
    (with `resume` it is skipped and an unfinished one continued). With several devices one
    process per device runs folds concurrently.
    """
    check_choices(model_kind, protocol)
    cfg = cfg or Config()
    opened = open_store(store)
    check_config_fits_store(cfg, opened)
    split = split or cfg.DATASET.fold_scheme
    store_path = Path(opened.path)
    indices = resolve_folds(opened, folds, split, patients)
    root = run_root(runs_dir, store_path, model_kind)
    for k in indices:
        plan_fold(root, k, overwrite, resume)
    options = {"split": split, "patients": patients, "overwrite": overwrite, "resume": resume}
    devices = list(devices) or ["auto"]
    if len(devices) == 1 or len(indices) == 1:
        return [train_fold(store_path, k, cfg, runs_dir, protocol, model_kind, devices[0], show_progress, **options)
                for k in indices]

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    workers = []
    for i, device in enumerate(devices):
        assigned = indices[i::len(devices)]
        if assigned:
            workers.append(ctx.Process(target=_fold_worker, args=(messages, str(store_path), assigned, cfg,
                                                                  str(runs_dir), protocol, model_kind, device,
                                                                  min(len(devices), len(indices)), options)))
    results, errors = {}, {}
    progress = make_progress() if show_progress else None
    try:
        for worker in workers:
            worker.start()
        with progress or nullcontext():
            task = progress.add_task(f"{len(indices)} folds on {len(workers)} processes", total=len(indices)) \
                if progress else None
            while len(results) + len(errors) < len(indices):
                try:
                    status, fold, payload = messages.get(timeout=1.0)
                except queue_module.Empty:
                    if not any(w.is_alive() for w in workers) and messages.empty():
                        for k in indices:
                            if k not in results and k not in errors:
                                errors[k] = "its worker process died without a result (out of memory?)"
                    continue
                (results if status == "done" else errors)[fold] = payload
                if progress:
                    progress.advance(task)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
    if errors:
        shown = "; ".join(f"fold {k}: {msg}" for k, msg in sorted(errors.items()))
        raise NH2STError(f"{len(errors)} of {len(indices)} folds failed ({shown}); the others finished in "
                         f"{root}; `nh2st train ... --resume` trains the rest")
    return [results[k] for k in indices]


def _ddp_entry(rank: int, world_size: int, init_method: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn_ddp(fn, world_size: int, *args) -> None:
    """Run fn(*args) in `world_size` CPU processes joined by a gloo group (file:// rendezvous). fn must be importable."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_entry, args=(world_size, f"file://{tmp}/rendezvous", fn, args), nprocs=world_size, join=True)
