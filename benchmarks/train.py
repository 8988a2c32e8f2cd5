"""Training speed: NH²2ST heads on cached features vs the released code's approach, same spots, same run.

    python benchmarks/train.py                      # CPU: ~2 minutes
    python benchmarks/train.py --device cuda        # adds the ZEN-sized 3 folds x 200 epochs estimate

What is timed (model compute only, data already in memory for both):
- cached: one epoch of nh2st's training loop (`nh2st.training.fit`) over every spot, on the
  512x7x7 maps that a frozen ResNet18 (`FrozenEncoder`, random weights) computed once;
- released: the released code's step, timed for a few steps of its batch of 8: a *trainable*
  ResNet18 trunk forward + backward over each spot's target patch and its 9 neighbour patches
  (80 images), hypergraph built on the fly from those maps, the same heads, losses and Adam.
The one-off encoding cost of stage one is reported on its own line. Peak memory: CUDA max
allocated per phase; on CPU the process's peak RSS after each phase (cumulative).
With CUDA, `zen` estimates 3 folds x 200 epochs on ZEN-sized data (15,780 spots, ~2/3 per
training fold) from a few timed epochs on random maps; eval per epoch included.
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nh2st.config import load_config
from nh2st.devices import resolve_device
from nh2st.encoder import FrozenEncoder, build_trunk
from nh2st.model import NH2ST, nh2st_loss
from nh2st.neighbors import knn_index
from nh2st.predictor import Predictor
from nh2st.training import FoldSpots, fit

ZEN_SPOTS = 15_780
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def synthetic_spots(n_spots: int, n_genes: int, seed: int = 0):
    """Patches (N, 224, 224, 3) uint8 on square grids of 256-spot slides, targets, neighbours, slide index."""
    rng = np.random.default_rng(seed)
    side = 16
    slide = np.arange(n_spots) // (side * side)
    cell = np.arange(n_spots) % (side * side)
    xy = np.stack([cell % side, cell // side], 1) * 100.0
    neighbors = np.concatenate([knn_index(xy[slide == s], 9) + np.flatnonzero(slide == s)[0]
                                for s in np.unique(slide)]).astype(np.int64)
    # smooth colour fields so neighbouring patches look alike, plus texture noise
    base = rng.integers(60, 200, size=(n_spots, 1, 1, 3))
    patches = np.clip(base + rng.normal(0, 25, size=(n_spots, 224, 224, 3)), 0, 255).astype(np.uint8)
    targets = rng.random((n_spots, n_genes)).astype(np.float32) * 3
    return patches, targets, neighbors, slide


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cached_epoch(maps, targets, neighbors, cfg, device, epochs: int = 2) -> dict:
    """nh2st's loop, all spots in the training split; spots/s of the fastest epoch (the first warms up)."""
    n = len(maps)
    arrays = {"features": maps, "targets": targets, "neighbors": neighbors,
              "sample_index": np.zeros(n, dtype=np.int32)}
    reset_peak(device)
    spots = FoldSpots.from_arrays(arrays, {"train": ["all"]}, device, cfg.MODEL.hyperedge_k)
    cfg.TRAINING.num_epochs = epochs
    model = NH2ST.from_config(cfg.MODEL, targets.shape[1], maps.shape[1:]).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        out = fit(model, spots, cfg, Path(tmp), [f"g{i}" for i in range(targets.shape[1])], None, show_progress=False)
    sync(device)
    best = max(row["spots_per_s"] for row in out["history"])
    return {"spots_per_s": best, "peak_mb": peak_memory_mb(device), "batch_size": cfg.TRAINING.batch_size}


def time_released_steps(patches, targets, neighbors, cfg, device, steps: int, batch_size: int = 8) -> dict:
    """The released approach: trainable ResNet18 over target + 9 neighbour patches per spot, every step."""
    reset_peak(device)
    torch.manual_seed(0)
    trunk = build_trunk().requires_grad_(True).train().to(device, memory_format=torch.channels_last)
    heads = NH2ST.from_config(cfg.MODEL, targets.shape[1]).to(device)
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=cfg.TRAINING.learning_rate)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    k = neighbors.shape[1]
    local = (torch.arange(batch_size)[:, None] * (k + 1) + 1 + torch.arange(k)).to(device)   # skip each target's slot
    order = np.random.default_rng(0).permutation(len(patches))
    mean, std = IMAGENET_MEAN.to(device), IMAGENET_STD.to(device)
    times = []
    for step in range(steps + 1):                                   # step 0 warms up
        batch = order[step * batch_size:(step + 1) * batch_size]
        rows = np.concatenate([np.concatenate([[b], neighbors[b]]) for b in batch])   # (8 x 10) images
        sync(device)
        started = time.perf_counter()
        images = torch.from_numpy(patches[rows]).to(device).permute(0, 3, 1, 2).float().div(255)
        images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
        expression = torch.from_numpy(targets[rows]).to(device)
        with amp:
            maps = trunk(images)
            out = heads(maps, local, None, expression)               # hypergraph from these maps, as the paper
            loss, _ = nh2st_loss(out, expression[local[:, 0]], cfg.MODEL)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step:
            times.append(time.perf_counter() - started)
    return {"spots_per_s": batch_size / float(np.median(times)), "peak_mb": peak_memory_mb(device),
            "batch_size": batch_size, "step_s": float(np.median(times))}


def time_zen(cfg, device, epochs: int, n_genes: int = 250, n_spots: int = ZEN_SPOTS) -> dict:
    """A ZEN-sized fold (10 slides: 6 train, 1 validation, 3 test) on random maps: seconds per epoch
    (training + validation scoring), extrapolated to 3 folds x 200 epochs plus each fold's test scoring."""
    n = n_spots - n_spots % 10
    rng = np.random.default_rng(0)
    maps = rng.random((n, 512, 7, 7), dtype=np.float32).astype(np.float16)
    slide = np.arange(n) // (n // 10)
    xy = rng.random((n, 2)) * 10_000
    neighbors = np.concatenate([knn_index(xy[slide == s], 9) + np.flatnonzero(slide == s)[0] for s in range(10)])
    arrays = {"features": maps, "targets": rng.random((n, n_genes), dtype=np.float32), "neighbors": neighbors,
              "sample_index": slide.astype(np.int32)}
    split = {"train": [f"S{i}" for i in range(6)], "val": ["S6"], "test": [f"S{i}" for i in range(7, 10)]}
    spots = FoldSpots.from_arrays(arrays, split, device, cfg.MODEL.hyperedge_k)
    cfg.TRAINING.num_epochs = epochs
    cfg.TRAINING.early_stopping.patience = epochs + 1
    model = NH2ST.from_config(cfg.MODEL, n_genes).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        out = fit(model, spots, cfg, Path(tmp), [f"g{i}" for i in range(n_genes)], "val", show_progress=False)
    per_epoch = float(np.median([row["seconds"] for row in out["history"][1:]] or [out["history"][0]["seconds"]]))
    sync(device)
    started = time.perf_counter()
    Predictor("nh2st", [f"g{i}" for i in range(n_genes)], cfg, model.feature_shape, model=model,
              device=device).predict(spots.features, spots.neighbors, spots.split["test"], spots.operator)
    sync(device)
    return {"seconds_per_epoch": per_epoch, "train_spots": len(spots.split["train"]),
            "estimate_s": 3 * 200 * per_epoch + 3 * (time.perf_counter() - started),
            "batch_size": cfg.TRAINING.batch_size, "peak_mb": peak_memory_mb(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spots", type=int, default=512, help="spots in the comparison (256 per synthetic slide)")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"),
                        help="config of the cached run (default configs/demo.yaml)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=None,
                        help="cached batch sizes to time (default: 8 = the paper's, the config's, and all spots)")
    parser.add_argument("--released-steps", type=int, default=3, help="timed steps of the released approach")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--zen-epochs", type=int, default=4, help="CUDA only: epochs timed for the ZEN estimate")
    parser.add_argument("--zen-batch-size", type=int, nargs="*", default=[8, 256],
                        help="CUDA only: batch sizes for the ZEN estimate (8 = the paper's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    console = Console()
    console.print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads", highlight=False)
    batch_sizes = args.batch_sizes or sorted({8, load_config(args.config).TRAINING.batch_size, args.spots})

    patches, targets, neighbors, _ = synthetic_spots(args.spots, 250)
    started = time.perf_counter()
    encoder = FrozenEncoder("random:seed=0", device=str(device))
    maps = np.concatenate([encoder.encode(patches[i:i + encoder.default_batch_size])[0]
                           for i in range(0, len(patches), encoder.default_batch_size)])
    encode_s = time.perf_counter() - started
    del encoder

    cached = [time_cached_epoch(maps, targets, neighbors, load_config(args.config, [f"TRAINING.batch_size={b}"]),
                                device) for b in batch_sizes]
    released = time_released_steps(patches, targets, neighbors, load_config(args.config), device, args.released_steps)
    results = {"device": str(device), "spots": args.spots, "encode_once_s": encode_s, "cached": cached,
               "released": released,
               "speedup": {c["batch_size"]: c["spots_per_s"] / released["spots_per_s"] for c in cached}}

    table = Table(title=f"one training epoch, {args.spots} spots, {device} (config {Path(args.config).name})")
    for name in ("approach", "batch", "training spots/s", "speed-up", "peak memory (MB)"):
        table.add_column(name, justify="left" if name == "approach" else "right")
    for c in cached:
        table.add_row("nh2st: heads on cached 512x7x7 maps", str(c["batch_size"]), f"{c['spots_per_s']:,.1f}",
                      f"{c['spots_per_s'] / released['spots_per_s']:,.0f}x", f"{c['peak_mb']:,.0f}")
    table.add_row("released: trainable ResNet18 x 10 patches/spot", str(released["batch_size"]),
                  f"{released['spots_per_s']:,.2f}", "1x", f"{released['peak_mb']:,.0f}")
    table.caption = (f"goal >= 200x. Stage one encoded the {args.spots} spots once in {encode_s:.1f} s. "
                     f"Released: {released['step_s']:.2f} s/step, median of {args.released_steps}. Memory: "
                     + ("CUDA max allocated per phase" if device.type == "cuda" else
                        "process peak RSS after each phase (cumulative, includes the encoder)"))
    console.print(table)

    if device.type == "cuda":
        zen_config = Path(__file__).resolve().parents[1] / "configs" / "zen.yaml"
        zen_config = zen_config if zen_config.is_file() else None          # else the paper's defaults
        zen_table = Table(title=f"ZEN-sized: 3 folds x 200 epochs (estimated from timed epochs; "
                                f"config {zen_config.name if zen_config else 'paper defaults'})")
        for name in ("batch", "train spots/fold", "s/epoch (train+val)", "3 x 200 epochs (s)", "peak memory (MB)"):
            zen_table.add_column(name, justify="right")
        results["zen"] = []
        for batch_size in args.zen_batch_size:
            reset_peak(device)
            zen = time_zen(load_config(zen_config, [f"TRAINING.batch_size={batch_size}"]), device, args.zen_epochs)
            results["zen"].append(zen)
            zen_table.add_row(str(batch_size), f"{zen['train_spots']:,}", f"{zen['seconds_per_epoch']:.3f}",
                              f"{zen['estimate_s']:,.0f}", f"{zen['peak_mb']:,.0f}")
        zen_table.caption = "goal < 60 s on one H100"
        console.print(zen_table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
