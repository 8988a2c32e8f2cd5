"""Several folds, several processes.

`train_folds(..., devices=["cuda:0", "cuda:1"])` runs folds concurrently in one process per fold
slot: a CUDA device gets as many slots as its free memory holds folds (`fold_footprint`, the
largest fold's estimated bytes; `folds_per_device` overrides), a CPU device one (["cpu", "cpu"]
runs two CPU processes). So `--folds all` on one GPU trains the folds side by side, each process
with its own CUDA context, RNG and graphs, hence the same numbers as one fold at a time.
Under torchrun (`python -m nh2st.training`) one fold trains with DDP: gradients are averaged,
each rank scores a fixed set of evaluation chunks and the predictions are gathered
(nh2st.predictor), so metrics do not depend on the number of processes.
`spawn_ddp` does what torchrun does without a launcher, for tests and CPU machines.
"""

import queue as queue_module
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nh2st.config import Config
from nh2st.devices import cpu_count, resolve_device
from nh2st.errors import NH2STError
from nh2st.progress import make_progress
from nh2st.runs import plan_fold, run_root
from nh2st.training.data import fold_split_ids, store_folds
from nh2st.training.fold import check_choices, check_config_fits_store, open_store, train_fold

CUDA_PROCESS_BYTES = 1 << 30    # a process's CUDA context, cuBLAS workspaces and allocator slack
MEMORY_SHARE = 0.9              # of a device's free memory that fold slots may plan to use


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


def fold_footprint(store, cfg: Config, fold_samples: list[str], device_type: str = "cuda",
                   model_kind: str = "nh2st") -> int:
    """Estimated peak bytes of training one fold on a device of `device_type`, for fold scheduling.

    features (with a --views store's other views, when TRAINING.augment draws from them) + targets +
    neighbours + hypergraph operators of the fold's spots, parameters with
    their gradients (one set per captured batch shape), Adam's two moments and the bf16 weight
    casts, the activations of a training batch (batch_size x k gathered maps) and of an evaluation
    chunk, and a process's fixed CUDA cost.
    """
    store = open_store(store)
    meta = store.meta
    n_spots = sum(store.n_spots(s) for s in fold_samples)
    flat = int(np.prod(meta.feature_shape))
    k, genes = meta.neighbors_k, len(meta.genes)
    map_bytes = 2 if device_type == "cuda" else 4
    data = n_spots * (flat * map_bytes + genes * 4 + k * 8 + k * k * 4 + 16)
    if model_kind == "nh2st" and cfg.TRAINING.augment:
        data += n_spots * (meta.views - 1) * flat * map_bytes
    if model_kind != "nh2st":
        return data + n_spots * meta.feature_shape[0] * 4 + (CUDA_PROCESS_BYTES if device_type == "cuda" else 0)
    from nh2st.model import NH2ST

    with torch.device("meta"):
        n_params = sum(p.numel() for p in NH2ST.from_config(cfg.MODEL, genes, meta.feature_shape).parameters())
    weights = n_params * (4 + 2 * 4 + 8 + 2)          # fp32 weights, two graphs' gradients, Adam m and v, bf16 casts
    t, m = cfg.TRAINING, cfg.MODEL
    rows = t.batch_size * k                           # gathered maps per step, at most
    per_row = flat * (3 * map_bytes + 4) + (m.hypergraph_dim + m.emb_dim) * 12 + genes * 8
    activations = 2 * rows * per_row + t.batch_size * m.emb_dim * 64
    evaluation = t.eval_batch_size * (k * flat * (map_bytes + 2) + genes * 8)
    return data + weights + activations + evaluation + (CUDA_PROCESS_BYTES if device_type == "cuda" else 0)


def folds_per_device(device: torch.device, footprint: int, n_folds: int, per_device: int | None = None) -> int:
    """How many folds train side by side on `device`: `per_device` if given, else as many as fit
    in MEMORY_SHARE of a CUDA device's free memory (at least 1); 1 on a CPU (its cores are the limit)."""
    if per_device is not None:
        return max(1, min(per_device, n_folds))
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n_folds, int(free * MEMORY_SHARE // max(footprint, 1))))


def fold_slots(store, indices: list[int], cfg: Config, devices: list, split: str, patients, protocol: str,
               model_kind: str, per_device: int | None = None) -> list[str]:
    """One device name per concurrent fold process, a device repeated when it holds several folds."""
    store = open_store(store)
    resolved = [resolve_device(d) if isinstance(d, str) else torch.device(d) for d in devices]
    if per_device is None and not any(d.type == "cuda" for d in resolved):
        return [str(d) for d in resolved]
    by_index = {f.index: f for f in store_folds(store, split, patients)}
    footprint = max(fold_footprint(store, cfg, [s for ids in fold_split_ids(by_index[k], cfg, protocol)[0].values()
                                                for s in ids], resolved[0].type, model_kind) for k in indices)
    counts = [folds_per_device(device, footprint, len(indices), per_device) for device in resolved]
    # interleaved, so the first folds spread over the devices: [cuda:0, cuda:1, cuda:0, cuda:1, ...]
    return [str(device) for round_ in range(max(counts)) for device, count in zip(resolved, counts) if round_ < count]


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
                patients: dict | None = None, overwrite: bool = False, resume: bool = False,
                folds_per_device: int | None = None) -> list[dict]:
    """Train `folds` ("all" or indices) of the store's `split` folds; returns each fold's test summary in order.

    Every fold's folder is checked before anything is trained: a finished fold needs `overwrite`
    (with `resume` it is skipped and an unfinished one continued). Folds run concurrently, one
    process per slot (`fold_slots`: CUDA devices by free memory, or `folds_per_device` each).
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
    slots = fold_slots(opened, indices, cfg, devices, split, patients, protocol, model_kind, folds_per_device) \
        if len(indices) > 1 else devices[:1]
    if len(slots) == 1:
        return [train_fold(store_path, k, cfg, runs_dir, protocol, model_kind, slots[0], show_progress, **options)
                for k in indices]

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    workers = []
    n_workers = min(len(slots), len(indices))
    for i, device in enumerate(slots[:n_workers]):
        workers.append(ctx.Process(target=_fold_worker, args=(messages, str(store_path), indices[i::n_workers], cfg,
                                                              str(runs_dir), protocol, model_kind, device,
                                                              n_workers, options)))
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
