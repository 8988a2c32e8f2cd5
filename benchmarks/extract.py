"""Stage-one throughput and memory: `python benchmarks/extract.py [--spots 512] [--device auto]`.

Writes synthetic HEST-layout samples with the same spot count (a 5000^2 slide and 20000^2
pyramidal JPEG TIFFs), then measures on one device in one process:

- bare encoder forward: FrozenEncoder.encode on pre-cropped batches (the ceiling);
- full pipeline: run_extract (h5ad read, targets, neighbours, crops in a thread pool, encode,
  compress and write, thumbnail, commit) on the large slide, spots on a Visium grid (neighbouring
  patches share tiles) and spread over the whole slide (no tile shared: worst case);
- their ratio (goal >= 0.85), bytes per spot on disk;
- peak RSS of `nh2st extract` in a fresh process for the small vs the large slide (goal: flat).

Default run: < 3 minutes on a 2-core CPU. Prints a rich table; `--json PATH` also saves the figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 256


def _texture_bank(rng, n=24) -> np.ndarray:
    """n (256, 256, 3) uint8 H&E-like tiles: pink stroma, purple blobs, some glass."""
    yy, xx = np.mgrid[:TILE, :TILE].astype(np.float32)
    bank = []
    for _ in range(n):
        eosin = 0.25 + 0.1 * np.sin(xx / rng.uniform(4, 12) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 15))
        haem = np.zeros_like(xx)
        for _ in range(rng.integers(10, 60)):
            cx, cy, r = rng.uniform(0, TILE), rng.uniform(0, TILE), rng.uniform(3, 8)
            haem = np.maximum(haem, np.clip(1.2 - np.hypot(xx - cx, yy - cy) / r, 0, 1))
        od = (haem[..., None] * np.array([0.56, 0.72, 0.41]) + eosin[..., None] * np.array([0.22, 0.80, 0.56])
              + rng.normal(0, 0.015, (TILE, TILE, 1)))
        bank.append(np.clip(255 * 10 ** (-od), 0, 255).astype(np.uint8))
    return np.stack(bank)


def write_slide(path: Path, size: int, seed: int = 0) -> None:
    """A size x size tiled JPEG pyramidal TIFF (levels as SubIFDs, like HEST's), written tile by
    tile so the generator never holds the image."""
    import tifffile

    rng = np.random.default_rng(seed)
    bank = _texture_bank(rng)
    shapes = [(size, size)]
    while max(shapes[-1]) > TILE:
        shapes.append((max(1, shapes[-1][0] // 2), max(1, shapes[-1][1] // 2)))

    def tiles(h, w):
        for ty in range(-(-h // TILE)):
            for tx in range(-(-w // TILE)):
                yield bank[(ty * 7919 + tx * 104729) % len(bank)]

    res = 1e4 / 0.5  # px per cm at 0.5 µm/px
    with tifffile.TiffWriter(path, bigtiff=size > 30000) as tif:
        opts = dict(dtype=np.uint8, tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                    compressionargs={"level": 85}, resolution=(res, res), resolutionunit="CENTIMETER",
                    metadata=None)
        tif.write(tiles(*shapes[0]), shape=(*shapes[0], 3), subifds=len(shapes) - 1, **opts)
        for h, w in shapes[1:]:
            tif.write(tiles(h, w), shape=(h, w, 3), subfiletype=1, **opts)


def write_hest_sample(root: Path, sample_id: str, slide_size: int, n_spots: int, genes: list[str], seed=0,
                      spread: bool = False):
    """st/<id>.h5ad (sparse raw counts, HEST obs columns), wsis/<id>.tif, metadata/<id>.json.

    Spots sit on a Visium hex grid (100 µm pitch = 200 px at 0.5 µm/px, so neighbouring patches
    share tiles) in the middle of the slide, or with `spread` over the whole slide (no tile is
    shared: the worst case for cropping).
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    write_slide(root / "wsis" / f"{sample_id}.tif", slide_size, seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    rows, cols = np.divmod(np.arange(n_spots), side)
    cols = 2 * cols + rows % 2  # Visium: array_col has the parity of array_row
    if spread:
        step_x = step_y = (slide_size - 400) / (2 * side)
        x, y = 200 + cols * step_x, 200 + rows * 2 * step_y
    else:
        x, y = cols * 100.0, rows * 173.2
        x, y = x + (slide_size - x.max()) / 2, y + (slide_size - y.max()) / 2
        if x.min() < 0 or y.min() < 0:
            raise SystemExit(f"{n_spots} spots on a Visium grid do not fit a {slide_size} px slide")
    obs = pd.DataFrame({"in_tissue": 1, "array_row": rows, "array_col": cols,
                        "pxl_col_in_fullres": x, "pxl_row_in_fullres": y},
                       index=[f"SPOT{i:06d}-1" for i in range(n_spots)])
    counts = sp.random(n_spots, len(genes), density=0.3, format="csr", dtype=np.float32, random_state=seed)
    counts.data = np.ceil(counts.data * 20)
    anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(root / "st" / f"{sample_id}.h5ad")
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps({"id": sample_id, "pixel_size_um_estimated": 0.5}))


def child_peak_rss(args: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of `nh2st extract ARGS` run in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "extract", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nh2st extract {' '.join(args)} failed:\n{proc.stderr.read().decode()}")
    return usage.ru_maxrss * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=512, help="spots per sample")
    parser.add_argument("--large", type=int, default=20000, help="side of the large slide in px")
    parser.add_argument("--small", type=int, default=5000, help="side of the small slide in px")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also save the figures as JSON")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from nh2st.encoder import FrozenEncoder
    from nh2st.extract import disk_bytes, run_extract
    from nh2st.genes import load_gene_list
    from nh2st.progress import console

    tmp = tempfile.TemporaryDirectory(prefix="nh2st-bench-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    root = work / "hest"
    genes = load_gene_list("ZEN")
    t0 = time.perf_counter()
    with console.status("writing synthetic slides"):
        write_hest_sample(root, "SMALL", args.small, args.spots, genes, seed=1)
        write_hest_sample(root, "LARGE", args.large, args.spots, genes, seed=2)
        write_hest_sample(root, "SPREAD", args.large, args.spots, genes, seed=3, spread=True)
    console.print(f"data: {time.perf_counter() - t0:.0f} s, large slide "
                  f"{(root / 'wsis' / 'LARGE.tif').stat().st_size / 2**20:.0f} MB on disk", highlight=False)

    encoder = FrozenEncoder("random", device=args.device)
    batch = args.batch_size or encoder.default_batch_size
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    encoder.encode(patches)  # warm-up: kernel selection / allocator
    n_batches = max(1, args.spots // batch)

    def bare_forward() -> float:
        if encoder.device.type == "cuda":
            import torch
            torch.cuda.synchronize(encoder.device)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            encoder.encode(patches)  # returns host arrays, so each call includes the device sync
        return n_batches * batch / (time.perf_counter() - t0)

    bare_before = bare_forward()
    store = work / "stores" / "bench.zarr"
    common = ["--dataset", "zen", "--data-root", str(root), "--weights", "random", "--device", args.device,
              "--overwrite"] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    pipeline, loop = {}, {}
    for name in ("LARGE", "SPREAD"):
        t0 = time.perf_counter()
        summary = run_extract("zen", data_root=root, store_path=store, weights="random", samples=[name],
                              device=args.device, batch_size=args.batch_size, overwrite=True, progress=False)
        pipeline[name] = args.spots / (time.perf_counter() - t0)
        loop[name] = summary["patches_per_s"]
    # the bare forward again after the pipelines: on a shared machine the load drifts
    bare_after = bare_forward()
    bare = (bare_before + bare_after) / 2
    sample_dir = store / "samples" / "SPREAD"
    per_spot = disk_bytes(sample_dir) / args.spots
    features_per_spot = disk_bytes(sample_dir / "features") / args.spots

    rss = {}
    for name in ("SMALL", "LARGE"):
        rss[name] = child_peak_rss(common + ["--samples", name, "--store", str(work / "stores" / f"{name}.zarr")])

    figures = {
        "device": summary["device"], "precision": summary["precision"], "batch_size": summary["batch_size"],
        "workers": summary["workers"], "spots": args.spots, "cpu_count": os.cpu_count(),
        "bare_encoder_patches_per_s": bare, "bare_before_after": [bare_before, bare_after],
        "pipeline_patches_per_s": pipeline["LARGE"], "ratio": pipeline["LARGE"] / bare,
        "pipeline_encode_loop_patches_per_s": loop["LARGE"],
        "pipeline_spread_patches_per_s": pipeline["SPREAD"], "ratio_spread": pipeline["SPREAD"] / bare,
        "bytes_per_spot": per_spot, "feature_bytes_per_spot": features_per_spot,
        "peak_rss_small_bytes": rss["SMALL"][0], "peak_rss_large_bytes": rss["LARGE"][0],
        "small_slide_px": args.small, "large_slide_px": args.large,
    }
    table = Table(caption="pipeline = run_extract wall time: h5ad read, targets, neighbours, crops, "
                  "encode, compress+write, thumbnail, commit; RSS = a fresh `nh2st extract` process",
                  title=f"nh2st extract benchmark: {args.spots} spots, {summary['device']} "
                        f"({summary['precision']}), batch {summary['batch_size']}, {summary['workers']} crop threads")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal / note")
    table.add_row("bare encoder forward", f"{bare:,.1f} patches/s",
                  f"mean of {bare_before:,.1f} before, {bare_after:,.1f} after")
    table.add_row("pipeline, Visium grid", f"{pipeline['LARGE']:,.1f} patches/s", "")
    table.add_row("  ratio pipeline / bare", f"{pipeline['LARGE'] / bare:.2f}", ">= 0.85")
    table.add_row("  crop/encode/write loop only", f"{loop['LARGE']:,.1f} patches/s", "")
    table.add_row("pipeline, spots spread out", f"{pipeline['SPREAD']:,.1f} patches/s",
                  "no tile reuse")
    table.add_row("  ratio pipeline / bare", f"{pipeline['SPREAD'] / bare:.2f}", "")
    table.add_row("disk bytes per spot", f"{per_spot:,.0f} B", "")
    table.add_row("  features only", f"{features_per_spot:,.0f} B", "raw 50,176")
    for name, size in (("SMALL", args.small), ("LARGE", args.large)):
        table.add_row(f"peak RSS, {size:,}^2 px slide", f"{rss[name][0] / 2**20:,.0f} MB",
                      "flat" if name == "LARGE" else "")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
