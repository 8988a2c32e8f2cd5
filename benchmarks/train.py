"""Stage-two training speed: the step against its floor, where the time goes, and a real ZEN-sized job.

    python benchmarks/train.py                          # CPU: steps at batch 8 vs Adam, profile, released
    python benchmarks/train.py --device cuda --parts all --json out.json   # every GPU figure (gpu_all.sh)
    python benchmarks/train.py --tiny --parts all --zen-spots 600 --zen-epochs 2   # smoke test, small sizes

Parts (--parts, comma-separated, or all):
- steps: ms per training step (nh2st.training.step.TrainStep: forward, losses, backward, Adam) at
  each batch size, against an Adam-only step over the same parameters (the floor: the step cannot
  cost less than the optimizer's memory traffic) and against the pre-change step (torch.unique per
  batch, the loop before 13738a4's successor) in the same run. "best" batch: the most spots/s.
- profile: torch.profiler over one epoch of each step and one validation pass: top operations,
  host-device synchronisations per step (ops that wait on a CUDA device; on CUDA also the runtime's
  synchronise calls), operator/kernel launches per step, and the cost of a progress-bar update.
- parity (CUDA): the captured CUDA-graph step against the eager step from the same state.
- released: the released code's step (a trainable ResNet18 over 10 patches per spot) at batch 8,
  against the cached step's spots/s at each batch.
- zen: a real ZEN-sized job, measured not extrapolated: a synthetic store of --zen-spots spots on
  10 slides (ZEN40-ZEN49, so the paper's 3 folds), `train_folds` over all folds with the ZEN config,
  --zen-epochs epochs, validation every epoch, no early stop, at batch 8 and at the best batch
  (folds side by side on the device as the scheduler decides, and at the best batch also one fold
  at a time). Wall seconds, and ms per step from the folds' logs.

--tiny shrinks the maps (16x4x4) and the heads so every part runs in seconds on a CPU.
Timings on CUDA synchronise before reading the clock.
"""

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nh2st.config import load_config  # noqa: E402
from nh2st.devices import resolve_device  # noqa: E402
from nh2st.metrics import hvg_indices, score  # noqa: E402
from nh2st.model import NH2ST, nh2st_loss  # noqa: E402
from nh2st.neighbors import knn_index  # noqa: E402
from nh2st.predictor import Predictor, autocast  # noqa: E402
from nh2st.training import FoldSpots  # noqa: E402
from nh2st.training.loop import make_optimizer  # noqa: E402
from nh2st.training.monitor import validation_scores  # noqa: E402
from nh2st.training.step import TrainStep  # noqa: E402

ZEN_SPOTS = 15_780
ZEN_IDS = [f"ZEN{i}" for i in range(40, 50)]
TINY = ["MODEL.emb_dim=32", "MODEL.num_heads1=4", "MODEL.hypergraph_dim=64", "MODEL.decoder_dim=32"]
TINY_SHAPE = (16, 4, 4)
# aten ops that make the host wait for a CUDA device (their result's size or value is read back)
SYNC_OPS = {"aten::_unique2", "aten::_unique", "aten::unique_dim", "aten::unique_consecutive",
            "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::equal"}
SYNC_RUNTIME = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
# ops that only make views or allocate: no kernel runs for them
METADATA_OPS = {"aten::as_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::view", "aten::empty",
                "aten::empty_strided", "aten::detach", "aten::_unsafe_view", "aten::alias", "aten::_reshape_alias",
                "aten::expand", "aten::t", "aten::transpose", "aten::permute", "aten::squeeze", "aten::unsqueeze",
                "aten::select", "aten::slice", "aten::to", "aten::lift_fresh", "aten::resize_", "aten::empty_like",
                "aten::unbind", "aten::split", "aten::chunk", "aten::reshape", "aten::flatten", "aten::_to_copy_meta"}
LAUNCH_RUNTIME = {"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
                  "cudaMemcpyAsync", "cudaMemsetAsync"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_config(path, tiny: bool, *overrides):
    return load_config(path, [*(TINY if tiny else []), *overrides])


# ---- data --------------------------------------------------------------------------------------------------
def grid_slide(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n spots on a square grid (Visium-like spacing): grid (n, 2) int64, pixel centres (n, 2)."""
    side = math.ceil(math.sqrt(n))
    cell = np.arange(n)
    grid_xy = np.stack([cell % side, cell // side], 1).astype(np.int64)
    return grid_xy, grid_xy * 100.0 + 50.0 + rng.normal(0, 3, size=(n, 2))


def synthetic_fold(n_spots: int, n_genes: int, shape, device, per_slide: int = 256, seed: int = 0) -> FoldSpots:
    """Random maps on 256-spot grid slides, all in the training split, on `device`."""
    rng = np.random.default_rng(seed)
    slide = np.arange(n_spots) // per_slide
    neighbors = np.empty((n_spots, 9), dtype=np.int64)
    for s in np.unique(slide):
        members = np.flatnonzero(slide == s)
        neighbors[members] = knn_index(grid_slide(len(members), rng)[1], 9) + members[0]
    arrays = {"features": rng.random((n_spots, *shape), dtype=np.float32).astype(np.float16),
              "targets": rng.random((n_spots, n_genes), dtype=np.float32) * 3, "neighbors": neighbors,
              "sample_index": slide.astype(np.int32)}
    ids = [f"S{s}" for s in np.unique(slide)]
    return FoldSpots.from_arrays(arrays, {"train": ids}, device, 3)


def epoch_rows(n_spots: int, n_rows: int, seed: int = 0) -> torch.Tensor:
    """n_rows targets drawn as successive random permutations of the spots (host tensor)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(n_spots, generator=gen) for _ in range(math.ceil(n_rows / n_spots))])[:n_rows]


# ---- the pre-change step and validation (the baseline) --------------------------------------------------------
def legacy_epoch(net, spots, rows, optimizer, cfg):
    """The training loop before batches were planned on the host: torch.unique per batch."""
    operator = spots.operator if cfg.MODEL.neighbor_branch else None
    device = spots.features.device
    loss_sum = torch.zeros((), device=device)
    for batch in rows.to(device).split(cfg.TRAINING.batch_size):
        unique, local = torch.unique(spots.neighbors[batch], return_inverse=True)
        with autocast(device):
            out = net(spots.features[unique], local, None if operator is None else operator[batch],
                      spots.targets[unique])
            loss, _ = nh2st_loss(out, spots.targets[batch], cfg.MODEL)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    return loss_sum, math.ceil(len(rows) / cfg.TRAINING.batch_size)


@torch.no_grad()
def legacy_validation(model, spots, rows, genes, hvg, chunk):
    """Validation before: unique per chunk, predictions and targets copied to the host, numpy metrics."""
    model.eval()
    device = spots.features.device
    out = []
    for part in rows.split(chunk):
        wanted = spots.neighbors[part] if model.neighbors_at_inference else spots.neighbors[part][:, :1]
        unique, local = torch.unique(wanted, return_inverse=True)
        ops = spots.operator[part] if model.neighbors_at_inference else None
        with autocast(device):
            out.append(model.predict(spots.features[unique], local, ops).float())
    return score(torch.cat(out).cpu().numpy(), spots.targets[rows].cpu().numpy(), genes, hvg)


# ---- steps against the floor ---------------------------------------------------------------------------------
def build(cfg, spots, device, seed: int = 0):
    torch.manual_seed(seed)
    model = NH2ST.from_config(cfg.MODEL, spots.targets.shape[1], tuple(spots.features.shape[1:])).to(device).train()
    return model, make_optimizer(model, cfg.TRAINING)


def adam_floor(cfg, spots, device):
    """A model whose parameters hold random gradients and its optimizer: step() is the Adam-only floor."""
    model, optimizer = build(cfg, spots, device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return optimizer


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn, device, cpu: list | None = None) -> float:
    """Wall seconds of fn(); the process's CPU seconds (all threads, user + system) are added to cpu[0]."""
    sync(device)
    started, used = time.perf_counter(), cpu_seconds()
    fn()
    sync(device)
    if cpu is not None:
        cpu[0] += cpu_seconds() - used
    return time.perf_counter() - started


def time_steps(cfg, spots, device, n_steps: int, adam_steps: int, rounds: int, legacy_steps: int) -> dict:
    """ms per step of the new step, the Adam-only floor and (optionally) the old loop, measured in
    interleaved rounds so that a shared machine's changing load hits all three alike."""
    batch = cfg.TRAINING.batch_size
    per = max(1, n_steps // rounds)
    rows = epoch_rows(len(spots.features), (rounds + 1) * per * batch, seed=1)
    model, optimizer = build(cfg, spots, device)
    stepper = TrainStep(model, spots, optimizer, cfg)
    floor = adam_floor(cfg, spots, device)
    old = build(cfg, spots, device) if legacy_steps else None
    chunk = lambda r: rows[r * per * batch:(r + 1) * per * batch]             # noqa: E731
    stepper.epoch(chunk(0))[0].item()                   # warm-up; on CUDA it captures the graphs for `per` steps
    floor.step()
    if old:
        legacy_epoch(old[0], spots, chunk(0)[:3 * batch], old[1], cfg)
    seconds = {"new": 0.0, "adam": 0.0, "legacy": 0.0}
    cpu = {"new": [0.0], "adam": [0.0], "legacy": [0.0]}
    adam_per = max(1, adam_steps // rounds)
    legacy_per = max(1, min(per, legacy_steps // rounds))
    faults = 0
    for r in range(1, rounds + 1):
        before = minor_faults()
        seconds["new"] += timed(lambda: stepper.epoch(chunk(r))[0].item(), device, cpu["new"])
        faults += minor_faults() - before
        seconds["adam"] += timed(lambda: [floor.step() for _ in range(adam_per)], device, cpu["adam"])
        if old:
            seconds["legacy"] += timed(lambda: legacy_epoch(old[0], spots, chunk(r)[:legacy_per * batch], old[1],
                                                            cfg)[0].item(), device, cpu["legacy"])
    out = {"batch_size": batch, "steps": rounds * per, "ms_per_step": 1e3 * seconds["new"] / (rounds * per),
           "adam_ms": 1e3 * seconds["adam"] / (rounds * adam_per), "mode": stepper.mode, "captures": stepper.captures,
           "legacy_ms_per_step": 1e3 * seconds["legacy"] / (rounds * legacy_per) if old else None,
           "page_faults_per_step": faults / (rounds * per),
           "cpu_ms_per_step": 1e3 * cpu["new"][0] / (rounds * per),
           "adam_cpu_ms": 1e3 * cpu["adam"][0] / (rounds * adam_per),
           "legacy_cpu_ms_per_step": 1e3 * cpu["legacy"][0] / (rounds * legacy_per) if old else None}
    out["cpu_ratio_to_adam"] = out["cpu_ms_per_step"] / out["adam_cpu_ms"]
    out["spots_per_s"] = 1e3 * batch / out["ms_per_step"]
    out["ratio_to_adam"] = out["ms_per_step"] / out["adam_ms"]
    out["legacy_spots_per_s"] = 1e3 * batch / out["legacy_ms_per_step"] if old else None
    return out


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_legacy_cold(cfg, spots, device, n_steps: int) -> dict:
    """The old loop in a process that has not yet run the new step, i.e. with glibc's default
    allocator settings (nh2st.training.step.retain_freed_memory changes them for the process)."""
    model, optimizer = build(cfg, spots, device)
    batch = cfg.TRAINING.batch_size
    rows = epoch_rows(len(spots.features), (n_steps + 2) * batch, seed=4)
    legacy_epoch(model, spots, rows[:2 * batch], optimizer, cfg)
    faults, cpu = minor_faults(), [0.0]
    seconds = timed(lambda: legacy_epoch(model, spots, rows[2 * batch:], optimizer, cfg)[0].item(), device, cpu)
    return {"ms_per_step": 1e3 * seconds / n_steps, "cpu_ms_per_step": 1e3 * cpu[0] / n_steps,
            "page_faults_per_step": (minor_faults() - faults) / n_steps}


def time_adam(cfg, spots, device, n_steps: int) -> float:
    """ms of one optimizer step alone over the model's parameters (random gradients): the floor."""
    floor = adam_floor(cfg, spots, device)
    floor.step()
    return 1e3 * timed(lambda: [floor.step() for _ in range(n_steps)], device) / n_steps


def part_steps(args, device, console, results) -> None:
    cfg0 = make_config(args.config, args.tiny)
    spots = synthetic_fold(args.spots, args.genes, TINY_SHAPE if args.tiny else (512, 7, 7), device)
    n_params = sum(p.numel() for p in NH2ST.from_config(cfg0.MODEL, args.genes,
                                                        tuple(spots.features.shape[1:])).parameters())
    cold = None
    if device.type == "cpu" and args.legacy_batch_sizes:     # before anything here runs the new step
        cold_batch = min(args.legacy_batch_sizes)
        cold = {"batch_size": cold_batch, **time_legacy_cold(make_config(args.config, args.tiny,
                                                                         f"TRAINING.batch_size={cold_batch}"),
                                                             spots, device, args.legacy_steps)}
    rows = [time_steps(make_config(args.config, args.tiny, f"TRAINING.batch_size={batch}"), spots, device, args.steps,
                       args.adam_steps, args.rounds, args.legacy_steps if batch in args.legacy_batch_sizes else 0)
            for batch in args.batch_sizes]
    best = max(rows, key=lambda r: (r["spots_per_s"], -r["batch_size"]))
    adam_ms = float(np.median([r["adam_ms"] for r in rows]))
    results["steps"] = {"device": str(device), "spots": args.spots, "params": n_params, "adam_ms": adam_ms,
                        "rows": rows, "best_batch": best["batch_size"], "threads": torch.get_num_threads(),
                        "rounds": args.rounds, "legacy_fresh_process": cold}
    table = Table(title=f"training step vs the Adam-only floor, {device}, {n_params / 1e6:.1f} M parameters, "
                        f"{args.spots} spots")
    cpu = device.type == "cpu"
    for name in ("batch", "steps", "ms / step", "Adam-only ms", "ratio to Adam", "spots/s",
                 "before: ms / step", "speed-up", *(["CPU-time ratio to Adam", "before: CPU-time ratio"] if cpu else [])):
        table.add_column(name, justify="right")
    for r in rows:
        before = r["legacy_ms_per_step"]
        table.add_row(str(r["batch_size"]), str(r["steps"]), f"{r['ms_per_step']:.2f}", f"{r['adam_ms']:.2f}",
                      f"{r['ratio_to_adam']:.2f}", f"{r['spots_per_s']:,.0f}",
                      "" if before is None else f"{before:.2f}",
                      "" if before is None else f"{before / r['ms_per_step']:.2f}x",
                      *([f"{r['cpu_ratio_to_adam']:.2f}",
                         "" if before is None else f"{r['legacy_cpu_ms_per_step'] / r['adam_cpu_ms']:.2f}"]
                        if cpu else []))
    table.caption = (f"step mode {rows[0]['mode']}; the three timings interleave in {args.rounds} rounds. 'before': "
                     "the per-batch torch.unique loop, same process. Goal at batch 8: ratio <= 1.5 on CPU, <= 2 on "
                     f"an H100/H200. Best batch: {best['batch_size']}. Page faults per step (new): "
                     f"{rows[0]['page_faults_per_step']:,.0f}")
    if cold:
        table.caption += (f". The old loop in a fresh process (glibc defaults), batch {cold['batch_size']}: "
                          f"{cold['ms_per_step']:.1f} ms/step ({cold['cpu_ms_per_step']:.1f} ms CPU time), "
                          f"{cold['page_faults_per_step']:,.0f} page faults/step; CPU time counts every thread")
    console.print(table)


# ---- profile -------------------------------------------------------------------------------------------------
def leaf_ops(events) -> list:
    """aten ops that call no other aten op and do more than make a view: on CUDA, one kernel launch each."""
    return [e for e in events if e.name.startswith("aten::") and e.name not in METADATA_OPS
            and not any(c.name.startswith("aten::") for c in e.cpu_children)]


def inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def profile_run(fn, device, n_steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        seconds = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    events = prof.events()
    names = [e.name for e in events]
    leaves = leaf_ops(events)
    sync_ops = {}
    for e in events:
        # the CPU fused Adam kernel reads its step counters with item(); on CUDA it reads them on the device
        if (e.name in SYNC_OPS or e.name in SYNC_RUNTIME) and not (device.type == "cpu" and
                                                                  inside(e, "aten::_fused_adam_")):
            sync_ops[e.name] = sync_ops.get(e.name, 0) + 1
    launches = sum(names.count(n) for n in LAUNCH_RUNTIME) if device.type == "cuda" else len(leaves)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = sorted(prof.key_averages(), key=lambda a: getattr(a, sort.replace("cuda", "device"), 0)
                      or getattr(a, sort, 0), reverse=True)
    total = sum(getattr(a, "self_device_time_total", 0) if device.type == "cuda" else a.self_cpu_time_total
                for a in averages) or 1
    top = []
    for a in averages[:12]:
        self_us = getattr(a, "self_device_time_total", 0) if device.type == "cuda" else a.self_cpu_time_total
        top.append({"name": a.key, "calls_per_step": a.count / n_steps, "self_ms_per_step": self_us / 1e3 / n_steps,
                    "share": self_us / total})
    sync_warnings = sum("synchroniz" in str(w.message).lower() for w in caught)
    return {"seconds": seconds, "ms_per_step": 1e3 * seconds / n_steps, "steps": n_steps,
            "syncs": {k: v / n_steps for k, v in sync_ops.items()}, "sync_calls_per_step": sum(sync_ops.values()) / n_steps,
            "sync_warnings_per_step": sync_warnings / n_steps if device.type == "cuda" else None,
            "launches_per_step": launches / n_steps, "top": top}


def progress_cost_us(n: int = 2000) -> float:
    from nh2st.progress import make_progress

    progress = make_progress()
    task = progress.add_task("x", total=n)
    started = time.perf_counter()
    for _ in range(n):
        progress.advance(task)
    return 1e6 * (time.perf_counter() - started) / n


def part_profile(args, device, console, results) -> None:
    cfg = make_config(args.config, args.tiny, f"TRAINING.batch_size={args.profile_batch}")
    spots = synthetic_fold(args.spots, args.genes, TINY_SHAPE if args.tiny else (512, 7, 7), device)
    n = min(args.profile_steps, len(spots.features) // args.profile_batch)
    rows = epoch_rows(len(spots.features), n * args.profile_batch, seed=2)
    out = {}
    model, optimizer = build(cfg, spots, device)
    legacy_epoch(model, spots, rows[:3 * args.profile_batch], optimizer, cfg)
    out["before"] = profile_run(lambda: legacy_epoch(model, spots, rows, optimizer, cfg)[0], device, n)
    model, optimizer = build(cfg, spots, device)
    stepper = TrainStep(model, spots, optimizer, cfg)
    stepper.epoch(rows if stepper.mode == "graph" else rows[:3 * args.profile_batch])
    out["after"] = profile_run(lambda: stepper.epoch(rows)[0], device, n)
    out["after"]["mode"] = stepper.mode
    genes = [f"g{i}" for i in range(args.genes)]
    val_cfg = make_config(args.config, args.tiny, "MODEL.predict_from=query+neighbors")
    val_model = NH2ST.from_config(val_cfg.MODEL, args.genes, tuple(spots.features.shape[1:])).to(device)
    val_rows = spots.split["train"][:min(len(spots.features), 2048)]
    spots.split["val"] = val_rows
    hvg = hvg_indices(spots.targets[val_rows].cpu().numpy())
    predictor = Predictor("nh2st", genes, val_cfg, val_model.feature_shape, model=val_model, device=device)
    chunks = math.ceil(len(val_rows) / val_cfg.TRAINING.eval_batch_size)
    out["validation_before"] = profile_run(lambda: legacy_validation(val_model, spots, val_rows, genes, hvg,
                                                                      val_cfg.TRAINING.eval_batch_size), device, 1)
    out["validation_after"] = profile_run(lambda: validation_scores(predictor, spots, "val", hvg), device, 1)
    out["progress_advance_us"] = progress_cost_us()
    out.update(batch_size=args.profile_batch, device=str(device), validation_spots=len(val_rows),
               validation_chunks=chunks)
    results["profile"] = out

    table = Table(title=f"one epoch profiled ({n} steps, batch {args.profile_batch}, {device}): per step")
    for name in ("", "before (torch.unique per batch)", f"after ({stepper.mode} step)"):
        table.add_column(name, justify="right")
    b, a = out["before"], out["after"]
    table.add_row("ms per step (under the profiler)", f"{b['ms_per_step']:.2f}", f"{a['ms_per_step']:.2f}")
    table.add_row("host-device syncs per step", fmt_syncs(b), fmt_syncs(a))
    if device.type == "cuda":
        table.add_row("sync warnings per step (sync debug mode)", f"{b['sync_warnings_per_step']:.1f}",
                      f"{a['sync_warnings_per_step']:.1f}")
    table.add_row("kernel launches per step" if device.type == "cuda" else "leaf aten ops per step (= launches on CUDA)",
                  f"{b['launches_per_step']:.0f}", f"{a['launches_per_step']:.0f}")
    vb, va = out["validation_before"], out["validation_after"]
    table.add_row(f"validation of {len(val_rows)} spots: syncs", fmt_syncs(vb, 1), fmt_syncs(va, 1))
    table.add_row("validation: ms", f"{vb['ms_per_step']:.1f}", f"{va['ms_per_step']:.1f}")
    table.caption = (f"progress-bar update: {out['progress_advance_us']:.0f} µs per step on the host, no device wait. "
                     "Syncs: ops that wait for a CUDA device (unique, item, nonzero, ...)" +
                     (" and cuda*Synchronize/cudaMemcpy calls" if device.type == "cuda" else ", counted on CPU"))
    console.print(table)
    top = Table(title="top operations of the new step (self time per step)")
    for name in ("operation", "calls / step", "ms / step", "share"):
        top.add_column(name, justify="left" if name == "operation" else "right")
    for t in a["top"][:10]:
        top.add_row(t["name"], f"{t['calls_per_step']:.1f}", f"{t['self_ms_per_step']:.2f}", f"{100 * t['share']:.0f}%")
    console.print(top)


def fmt_syncs(p: dict, per: int | None = None) -> str:
    if not p["syncs"]:
        return "0"
    return ", ".join(f"{name.replace('aten::', '')} {count:g}" for name, count in sorted(p["syncs"].items()))


# ---- CUDA graph vs eager -------------------------------------------------------------------------------------------
def part_parity(args, device, console, results) -> None:
    if device.type != "cuda":
        return
    shape = TINY_SHAPE if args.tiny else (512, 7, 7)
    spots = synthetic_fold(min(args.spots, 1024), args.genes, shape, device)
    out = []
    for dropout in (0.0, 0.5):
        cfg = make_config(args.config, args.tiny, "TRAINING.batch_size=8", f"MODEL.dropout1={dropout}")
        rows = epoch_rows(len(spots.features), 8 * 40 + 5, seed=3)           # 40 full batches and a short one
        runs = {}
        for mode in ("eager", "graph"):
            model, optimizer = build(cfg, spots, device)
            stepper = TrainStep(model, spots, optimizer, cfg, mode=mode)
            torch.manual_seed(11)
            losses = [stepper.epoch(rows)[0].item() for _ in range(5)]        # epoch 4 replays both graphs
            runs[mode] = (losses, [p.detach().float().clone() for p in model.parameters()], stepper.captures)
        diff = max(float((a - b).abs().max()) for a, b in zip(runs["eager"][1], runs["graph"][1]))
        scale = max(float(a.abs().max()) for a in runs["eager"][1])
        out.append({"dropout": dropout, "eager_losses": runs["eager"][0], "graph_losses": runs["graph"][0],
                    "max_param_diff": diff, "max_param": scale, "captures": runs["graph"][2]})
    results["parity"] = out
    table = Table(title="CUDA graph step vs eager step, same start, 5 epochs of 41 steps")
    for name in ("dropout", "eager loss, last epoch", "graph loss, last epoch", "max |param diff|", "captures"):
        table.add_column(name, justify="right")
    for r in out:
        table.add_row(str(r["dropout"]), f"{r['eager_losses'][-1]:.6f}", f"{r['graph_losses'][-1]:.6f}",
                      f"{r['max_param_diff']:.2e}", str(r["captures"]))
    console.print(table)


# ---- the released approach --------------------------------------------------------------------------------------
def time_released_steps(cfg, device, steps: int, n_genes: int, batch_size: int = 8) -> dict:
    """The released approach: trainable ResNet18 over target + 9 neighbour patches per spot, every step."""
    from nh2st.encoder import build_trunk

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    k = 9
    trunk = build_trunk().requires_grad_(True).train().to(device, memory_format=torch.channels_last)
    heads = NH2ST.from_config(cfg.MODEL, n_genes).to(device)
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=cfg.TRAINING.learning_rate)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    local = (torch.arange(batch_size)[:, None] * (k + 1) + 1 + torch.arange(k)).to(device)  # skip each target's slot
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    times = []
    for step in range(steps + 1):                                   # step 0 warms up
        patches = rng.integers(0, 255, size=(batch_size * (k + 1), 224, 224, 3), dtype=np.uint8)
        expression = torch.from_numpy(rng.random((batch_size * (k + 1), n_genes), dtype=np.float32)).to(device)
        sync(device)
        started = time.perf_counter()
        images = torch.from_numpy(patches).to(device).permute(0, 3, 1, 2).float().div(255)
        images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
        with amp:
            out = heads(trunk(images), local, None, expression)
            loss, _ = nh2st_loss(out, expression[local[:, 0]], cfg.MODEL)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step:
            times.append(time.perf_counter() - started)
    return {"spots_per_s": batch_size / float(np.median(times)), "step_s": float(np.median(times)),
            "batch_size": batch_size, "steps": steps}


def part_released(args, device, console, results) -> None:
    if args.tiny:
        return                                   # the released model needs full-size maps
    released = time_released_steps(make_config(args.config, False), device, args.released_steps, args.genes)
    results["released"] = released
    steps = results.get("steps", {}).get("rows", [])
    table = Table(title=f"cached heads vs the released approach, training spots/s, {device}")
    for name in ("approach", "batch", "training spots/s", "speed-up"):
        table.add_column(name, justify="left" if name == "approach" else "right")
    for r in steps:
        table.add_row("nh2st: heads on cached 512x7x7 maps", str(r["batch_size"]), f"{r['spots_per_s']:,.1f}",
                      f"{r['spots_per_s'] / released['spots_per_s']:,.0f}x")
    table.add_row("released: trainable ResNet18 x 10 patches/spot", "8", f"{released['spots_per_s']:,.2f}", "1x")
    table.caption = (f"released: {released['step_s'] * 1e3:.0f} ms/step, median of {released['steps']}. "
                     "Goals: >= 50x at batch 8, >= 200x at batch >= 128")
    console.print(table)


# ---- a real ZEN-sized job ------------------------------------------------------------------------------------------
def write_zen_store(path: Path, n_spots: int, shape, seed: int = 0) -> Path:
    """A 'zen' store: ZEN40-ZEN49 with n_spots spots in all, random maps, expression with spatial signal."""
    from nh2st.expression import process_expression
    from nh2st.genes import load_gene_list
    from nh2st.store import EmbeddingStore, StoreMeta

    if path.exists():
        existing = EmbeddingStore.open(path)
        if existing.sample_ids() == ZEN_IDS and sum(map(existing.n_spots, ZEN_IDS)) == n_spots \
                and tuple(existing.meta.feature_shape) == tuple(shape):
            return path                                   # made by an earlier part of the same benchmark
    rng = np.random.default_rng(seed)
    genes = load_gene_list("ZEN")
    meta = StoreMeta(dataset="zen", genes=genes, backbone="synthetic", weights="none", weights_sha256="0" * 64,
                     feature_shape=tuple(shape), neighbors_k=9)
    sizes = np.full(len(ZEN_IDS), n_spots // len(ZEN_IDS))
    sizes[:n_spots % len(ZEN_IDS)] += 1
    with EmbeddingStore.open_for_writing(path, meta) as store:
        for sample_id, n in zip(ZEN_IDS, sizes):
            grid_xy, pixel_xy = grid_slide(int(n), rng)
            maps = rng.random((n, *shape), dtype=np.float32)
            counts = rng.poisson(np.exp(1 + maps.mean(axis=(2, 3))[:, :1] @ rng.random((1, len(genes))))).astype(
                np.float32)
            writer = store.begin_sample(sample_id, int(n))
            writer.write_features(maps.astype(np.float16), maps.mean(axis=(2, 3)))
            writer.write_array("counts", counts)
            writer.write_array("targets", process_expression(counts, grid_xy))
            writer.write_array("pixel_xy", pixel_xy)
            writer.write_array("grid_xy", grid_xy)
            writer.write_array("barcodes", np.array([f"{sample_id}-{i}" for i in range(n)]))
            writer.write_array("neighbors", knn_index(pixel_xy, 9))
            writer.commit()
    return path


def zen_job(store: Path, runs: Path, args, device, batch: int, per_device: int | None) -> dict:
    from nh2st.training import train_folds

    epochs = args.zen_epochs
    cfg = make_config(ROOT / "configs" / "zen.yaml", args.tiny, f"TRAINING.batch_size={batch}",
                      f"TRAINING.num_epochs={epochs}", f"TRAINING.early_stopping.patience={epochs}")
    started = time.perf_counter()
    folds = train_folds(store, "all", cfg, runs, devices=[str(device)], show_progress=False,
                        folds_per_device=per_device)
    wall = time.perf_counter() - started
    sizes = dict(zip(ZEN_IDS, _slide_sizes(store)))
    train_s, steps, epoch_s = 0.0, 0, 0.0
    for fold in folds:
        run_dir = Path(fold["run_dir"])
        log = json.loads((run_dir / "log.json").read_text())
        n_train = sum(sizes[s] for s in json.loads((run_dir / "run.json").read_text())["train_samples"])
        train_s += sum(n_train / row["spots_per_s"] for row in log)
        epoch_s += sum(row["seconds"] for row in log)
        steps += math.ceil(n_train / batch) * len(log)
    return {"batch_size": batch, "epochs": epochs, "folds": len(folds), "wall_s": wall,
            "folds_side_by_side": per_device or "scheduler", "train_s_summed": train_s, "epoch_s_summed": epoch_s,
            "steps": steps, "ms_per_step": 1e3 * train_s / max(steps, 1),
            "R": [f["R"] for f in folds]}


def _genes() -> list[str]:
    from nh2st.genes import load_gene_list

    return load_gene_list("ZEN")


def _slide_sizes(store: Path) -> list[int]:
    from nh2st.store import EmbeddingStore

    opened = EmbeddingStore.open(store)
    return [opened.n_spots(s) for s in ZEN_IDS]


def part_zen(args, device, console, results, out_dir: Path) -> None:
    shape = TINY_SHAPE if args.tiny else (512, 7, 7)
    store = write_zen_store(out_dir / "zen-synthetic.zarr", args.zen_spots, shape)
    best = results.get("steps", {}).get("best_batch")
    batches = args.zen_batch_sizes or sorted({8, best or 8})
    adam_ms = results.get("steps", {}).get("adam_ms")
    if adam_ms is None:
        cfg = make_config(ROOT / "configs" / "zen.yaml", args.tiny)
        adam_ms = time_adam(cfg, synthetic_fold(64, len(_genes()), shape, device), device, args.adam_steps)
        results["adam_ms"] = adam_ms
    jobs = []
    for batch in sorted(batches, key=lambda b: (b == 8, -b)):        # the long batch-8 job last
        plans = [None, 1] if batch == max(batches) and args.zen_compare_sequential else [None]
        for per_device in plans:
            runs = Path(tempfile.mkdtemp(dir=out_dir, prefix=f"zen-runs-b{batch}-{per_device or 'auto'}-"))
            job = zen_job(store, runs, args, device, batch, per_device)
            job["ratio_to_adam"] = job["ms_per_step"] / adam_ms if adam_ms else None
            jobs.append(job)
            results["zen"] = jobs
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            console.print(f"zen job: batch {batch}, folds side by side: {job['folds_side_by_side']}, "
                          f"{job['wall_s']:.1f} s wall, {job['ms_per_step']:.3f} ms/step", highlight=False)
    table = Table(title=f"ZEN-sized job measured: {args.zen_spots:,} spots on 10 slides, 3 folds x {args.zen_epochs} "
                        f"epochs, validation every epoch, no early stop, {device}")
    for name in ("batch", "folds side by side", "wall s", "ms / step", "ratio to Adam", "steps", "mean test R"):
        table.add_column(name, justify="right")
    for j in jobs:
        table.add_row(str(j["batch_size"]), str(j["folds_side_by_side"]), f"{j['wall_s']:,.1f}",
                      f"{j['ms_per_step']:.3f}", "" if j["ratio_to_adam"] is None else f"{j['ratio_to_adam']:.2f}",
                      f"{j['steps']:,}", f"{np.mean([r for r in j['R'] if r is not None]):.3f}")
    table.caption = ("wall: train_folds from start to all folds scored (loading, training, validation, test). "
                     "ms/step from the folds' logs (training time / steps). Goals on one H100/H200: batch 8 < 600 s, "
                     "batch >= 128 < 60 s")
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parts", default="steps,profile,released", help="steps, profile, parity, released, zen or all")
    parser.add_argument("--config", default=str(ROOT / "configs" / "zen.yaml"), help="model/optimizer config")
    parser.add_argument("--tiny", action="store_true", help="16x4x4 maps and small heads: a smoke test")
    parser.add_argument("--spots", type=int, default=None, help="spots of the synthetic fold (CPU 512, CUDA 4096)")
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=None, help="CPU: 8; CUDA: 8 32 128 512 2048")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per batch size (CPU 200, CUDA 400)")
    parser.add_argument("--adam-steps", type=int, default=None, help="timed Adam-only steps (CPU 40, CUDA 200)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds (new, Adam, old)")
    parser.add_argument("--legacy-steps", type=int, default=None, help="timed steps of the old loop (CPU 40, CUDA 200)")
    parser.add_argument("--legacy-batch-sizes", type=int, nargs="*", default=[8, 128])
    parser.add_argument("--profile-batch", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=None, help="steps in the profiled epoch (CPU 16, CUDA 100)")
    parser.add_argument("--released-steps", type=int, default=3)
    parser.add_argument("--zen-spots", type=int, default=ZEN_SPOTS)
    parser.add_argument("--zen-epochs", type=int, default=200)
    parser.add_argument("--zen-batch-sizes", type=int, nargs="*", default=None, help="default: 8 and the best batch")
    parser.add_argument("--zen-compare-sequential", action="store_true",
                        help="at the largest ZEN batch also train the folds one at a time")
    parser.add_argument("--out-dir", default=None, help="where the ZEN store and runs go (default: a temp dir)")
    parser.add_argument("--json", help="write every figure here (rewritten after each part)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.spots = args.spots or (4096 if cuda else 512)
    args.batch_sizes = args.batch_sizes or ([8, 32, 128, 512, 2048] if cuda else [8])
    args.steps = args.steps or (400 if cuda else 200)
    args.adam_steps = args.adam_steps or (200 if cuda else 40)
    args.legacy_steps = args.legacy_steps or (200 if cuda else 40)
    args.profile_steps = args.profile_steps or (100 if cuda else 16)
    parts = {"steps", "profile", "parity", "released", "zen"} if args.parts == "all" else set(args.parts.split(","))
    console = Console()
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    console.print(f"device {device} ({name}), torch {torch.__version__}, load average {load}", highlight=False)
    results = {"device": str(device), "device_name": name, "torch": torch.__version__, "load_average": load,
               "tiny": args.tiny}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    for part, fn in (("steps", part_steps), ("parity", part_parity), ("profile", part_profile),
                     ("released", part_released)):
        if part in parts:
            fn(args, device, console, results)
            save()
    if "zen" in parts:
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            part_zen(args, device, console, results, Path(args.out_dir))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                part_zen(args, device, console, results, Path(tmp))
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
