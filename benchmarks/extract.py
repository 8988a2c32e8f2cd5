"""Stage-one throughput, its per-stage breakdown, and memory: `python benchmarks/extract.py [--encoder null]`.

Writes synthetic HEST-layout samples (h5ad + 20,000^2 JPEG pyramidal TIFF with pyvips-style shared
JPEGTables + metadata), then measures in one process:

`--encoder resnet18` (default): the frozen ResNet18 on `--device`
- bare encoder forward: FrozenEncoder.encode on pre-cropped batches (the ceiling);
- full pipeline: run_extract on the large slide, spots on a Visium grid (neighbouring patches
  share tiles) and spread over the whole slide (no tile shared: worst case); ratio (goal >= 0.85);
`--encoder null`: a stand-in of ~zero cost returning real-looking maps (a bank computed once by
  the random-weight trunk), so the pipeline's own ceiling is measured on any machine
- the pipeline with 1 and 2 (`--workers`) crop threads, patches/s and patches per CPU-second
  (process CPU time: "per core"), against the per-crop path (Slide's generic read_regions) in the
  same run; spots spread out; a batch of small (250-spot) samples for the per-sample fixed cost;
- compression codecs on those maps (speed per core, ratio);
both: the per-stage breakdown (thread-seconds per stage and share of wall time), tiles decoded
per tile touched, bytes per spot, and peak RSS of a fresh extraction process for the small vs
the large slide (goal: flat).

Prints rich tables; `--json PATH` also saves the figures.
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
    """A size x size tiled JPEG pyramidal TIFF like HEST's (pyvips): levels as SubIFDs, YCbCr
    4:2:0 tiles as abbreviated JPEG streams sharing the page's JPEGTables. Written tile by tile
    from a bank of pre-encoded textures, so the generator never holds the image."""
    import tifffile

    from nh2st.slide import abbreviated_jpeg_tiles

    rng = np.random.default_rng(seed)
    encoded = [abbreviated_jpeg_tiles(tile, TILE, 85) for tile in _texture_bank(rng)]
    tables = encoded[0][0]
    bank = [tiles[0] for _, tiles in encoded]
    shapes = [(size, size)]
    while max(shapes[-1]) > TILE:
        shapes.append((max(1, shapes[-1][0] // 2), max(1, shapes[-1][1] // 2)))

    def tiles(h, w):
        for ty in range(-(-h // TILE)):
            for tx in range(-(-w // TILE)):
                yield bank[(ty * 7919 + tx * 104729) % len(bank)]

    res = 1e4 / 0.5  # px per cm at 0.5 µm/px
    with tifffile.TiffWriter(path, bigtiff=size > 30000) as tif:
        opts = dict(dtype=np.uint8, tile=(TILE, TILE), photometric="ycbcr", subsampling=(2, 2), compression="jpeg",
                    resolution=(res, res), resolutionunit="CENTIMETER", metadata=None,
                    extratags=[(347, 7, len(tables), tables, True)])  # JPEGTables
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


def null_encoder(weights="random", device="auto", bank_size: int = 64):
    """A FrozenEncoder (same store identity as `random`) whose forward returns maps from a bank that
    the random-weight trunk computed once on texture patches: the rest of the pipeline is unchanged."""
    import torch

    from nh2st.encoder import FrozenEncoder

    key = (str(weights), str(device))
    if key in _NULL_ENCODERS:  # built once per process: its bank's forward pass is not the pipeline's cost
        return _NULL_ENCODERS[key]
    encoder = FrozenEncoder("random", device)
    rng = np.random.default_rng(7)
    patches = _texture_bank(rng, bank_size)[:, :224, :224]
    with torch.inference_mode():
        bank = torch.cat([encoder.trunk(encoder.preprocess(patches[i:i + 16])).float()
                          for i in range(0, bank_size, 16)])

    def forward(batch):
        index = torch.arange(len(batch), device=bank.device) % len(bank)
        return bank.index_select(0, index)

    encoder._forward = forward
    encoder.trunk = None
    if encoder.device.type != "cuda":  # no copies to make: hand out slices of a finished bank
        from nh2st.encoder import EncodedBatch

        bank_maps = np.resize(bank.to(torch.float16).numpy(), (1024, *bank.shape[1:]))
        bank_pooled = np.resize(bank.mean(dim=(2, 3)).numpy(), (1024, bank.shape[1]))

        def submit(patches):
            n = len(encoder._check(patches))
            start = (submit.calls * n) % (len(bank_maps) - n + 1)
            submit.calls += 1
            return EncodedBatch(bank_maps[start:start + n], bank_pooled[start:start + n])

        submit.calls = 0
        encoder.submit = submit
    _NULL_ENCODERS[key] = encoder
    return encoder


_NULL_ENCODERS: dict = {}


def child_peak_rss(args: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of this script's `--child ARGS` (one extraction) in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"extraction {' '.join(args)} failed:\n{proc.stderr.read().decode()}")
    return usage.ru_maxrss * 1024, seconds


def run_child(args) -> None:
    root, store, sample, encoder_kind, device = args
    from nh2st import extract

    if encoder_kind == "null":
        extract.FrozenEncoder = null_encoder
    extract.run_extract("zen", data_root=root, store_path=store, weights="random", samples=[sample],
                        device=device, overwrite=True, progress=False)


# ---- instrumentation -----------------------------------------------------------------------------------------
ORCHESTRATION = {  # (module attribute, stage name): what run_extract does around the hot path
    ("nh2st.datasets.DatasetSpec.load_sample", "read h5ad + open slide"),
    ("nh2st.extract.process_expression", "targets"),
    ("nh2st.extract.knn_index", "neighbours"),
    ("nh2st.store.EmbeddingStore.begin_sample", "begin sample"),
    ("nh2st.store.SampleWriter.write_array", "write small arrays + thumbnail"),
    ("nh2st.slide.Slide.thumbnail", "thumbnail"),
    ("nh2st.store.SampleWriter.commit", "commit"),
    # inside zarr's worker threads (a write's chunks are compressed and stored concurrently)
    ("zarr.codecs.ZstdCodec._encode_sync", "compress chunks (zarr threads)"),
    ("zarr.codecs.BloscCodec._encode_sync", "compress chunks (zarr threads)"),
    ("zarr.storage._local._put", "write chunk files (zarr threads)"),
}


def instrument() -> dict:
    """Wrap the orchestration steps in stage timers (once per process); returns a tiles-decoded tally."""
    import functools
    import importlib

    from nh2st import slide as slide_module
    from nh2st.stages import stage

    for target, name in ORCHESTRATION:
        module_name, _, attr = target.rpartition(".")
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a class attribute
            parent, _, cls = module_name.rpartition(".")
            owner = getattr(importlib.import_module(parent), cls)
        original = getattr(owner, attr, None)
        if original is None:  # e.g. a zarr internal renamed: that stage is simply not shown
            continue

        def timed(*a, __original=original, __name=name, **k):
            with stage(__name):
                return __original(*a, **k)

        setattr(owner, attr, functools.wraps(original)(timed))
    tally = {"decoded": 0}
    close = slide_module.TiffSlide.close

    def counting_close(self):
        if getattr(self, "_fd", None) is not None:
            tally["decoded"] += self.tiles_decoded
        close(self)

    slide_module.TiffSlide.close = counting_close
    return tally


def touched_tiles(pixel_xy: np.ndarray, size: int, tile: int = TILE, patch: int = 224) -> int:
    """Distinct level-0 tiles that the patches of `pixel_xy` touch (each needs one decode at least)."""
    origin = np.floor(pixel_xy).astype(np.int64) - patch // 2
    tiles = set()
    for x0, y0 in origin.tolist():
        for ty in range(max(y0, 0) // tile, (min(y0 + patch, size) - 1) // tile + 1):
            for tx in range(max(x0, 0) // tile, (min(x0 + patch, size) - 1) // tile + 1):
                tiles.add((ty, tx))
    return len(tiles)


def measured_extract(root, store, samples, device, workers, batch_size) -> dict:
    """run_extract timed: wall, process CPU seconds, stage thread-seconds."""
    from nh2st.extract import run_extract
    from nh2st.stages import recording

    cpu0, t0 = time.process_time(), time.perf_counter()
    with recording() as times:
        summary = run_extract("zen", data_root=root, store_path=store, weights="random", samples=samples,
                              device=device, batch_size=batch_size, overwrite=True, workers=workers,
                              progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    spots = summary["spots_extracted"]
    return {"spots": spots, "wall_s": wall, "cpu_s": cpu, "patches_per_s": spots / wall,
            "patches_per_cpu_s": spots / cpu, "workers": summary["workers"], "device": summary["device"],
            "precision": summary["precision"], "batch_size": summary["batch_size"],
            "stages": dict(times.seconds), "stage_cpu": dict(times.cpu_seconds), "stage_calls": dict(times.calls)}


def breakdown_table(title: str, run: dict):
    from rich.table import Table

    table = Table(title=title, caption="wall: thread-seconds in the stage (stages in parallel threads overlap); "
                                       "CPU: that thread's CPU time, which a loaded machine does not inflate; "
                                       "'wait for …' is the encode loop idling")
    table.add_column("stage")
    table.add_column("wall s", justify="right")
    table.add_column("share of wall", justify="right")
    table.add_column("CPU s", justify="right")
    table.add_column("CPU µs / patch", justify="right")
    table.add_column("calls", justify="right")
    for name, seconds in sorted(run["stages"].items(), key=lambda kv: -run["stage_cpu"][kv[0]]):
        cpu = run["stage_cpu"][name]
        table.add_row(name, f"{seconds:.3f}", f"{100 * seconds / run['wall_s']:.0f} %", f"{cpu:.3f}",
                      f"{1e6 * cpu / run['spots']:,.0f}", str(run["stage_calls"][name]))
    table.add_row("wall time of the run", f"{run['wall_s']:.3f}", "100 %", "", "", "")
    table.add_row("process CPU time (all threads)", "", "", f"{run['cpu_s']:.3f}",
                  f"{1e6 * run['cpu_s'] / run['spots']:,.0f}", "")
    return table


def codec_table(maps: np.ndarray):
    """Compress 128-spot chunks of `maps` with candidate zarr v3 codecs, one thread each."""
    import numcodecs
    from numcodecs import Blosc, Zstd
    from rich.table import Table

    numcodecs.blosc.set_nthreads(1)
    chunk = np.ascontiguousarray(np.resize(maps, (128, *maps.shape[1:])))
    candidates = {
        "Blosc zstd 3 + shuffle (before)": Blosc("zstd", 3, Blosc.SHUFFLE),
        "Blosc zstd 1 + shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
        "Blosc lz4 5 + shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
        "Zstd 1 (chosen)": Zstd(1),
        "Zstd 3": Zstd(3),
    }
    rows = {}
    for name, codec in candidates.items():
        encoded = codec.encode(chunk)
        rates = []
        for fn, arg in ((codec.encode, chunk), (codec.decode, encoded)):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                fn(arg)
                n += 1
            rates.append(chunk.nbytes * n / (time.perf_counter() - t0))
        rows[name] = {"ratio": chunk.nbytes / len(encoded), "compress_MBps": rates[0] / 1e6,
                      "decompress_MBps": rates[1] / 1e6, "patches_per_core_s": rates[0] / (chunk[0].nbytes)}
    table = Table(title="float16 512x7x7 maps, 128-spot chunks, one thread per codec")
    for col in ("codec", "ratio", "compress MB/s", "= patches/s per core", "decompress MB/s"):
        table.add_column(col, justify="left" if col == "codec" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['ratio']:.2f}", f"{r['compress_MBps']:,.0f}", f"{r['patches_per_core_s']:,.0f}",
                      f"{r['decompress_MBps']:,.0f}")
    return table, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", choices=("resnet18", "null"), default="resnet18")
    parser.add_argument("--spots", type=int, default=None, help="spots per large sample (default 512; null: 2048)")
    parser.add_argument("--large", type=int, default=20000, help="side of the large slide in px")
    parser.add_argument("--small", type=int, default=5000, help="side of the small slide in px")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="crop threads to measure (null default: 1 2; resnet18: run_extract's default)")
    parser.add_argument("--small-samples", type=int, default=6, help="null: 250-spot samples for the fixed cost")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also save the figures as JSON")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child)

    from rich.console import Console
    from rich.table import Table

    from nh2st import extract
    from nh2st.extract import disk_bytes
    from nh2st.genes import load_gene_list
    from nh2st.progress import console

    null = args.encoder == "null"
    spots = args.spots or (2048 if null else 512)
    tmp = tempfile.TemporaryDirectory(prefix="nh2st-bench-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    root = work / "hest"
    genes = load_gene_list("ZEN")
    small_ids = [f"S250_{i}" for i in range(args.small_samples if null else 0)]
    t0 = time.perf_counter()
    with console.status("writing synthetic slides"):
        fits = 2 * 100 * np.ceil(np.sqrt(spots)) < args.small  # a Visium grid of `spots` fits the small slide
        write_hest_sample(root, "SMALL", args.small, spots, genes, seed=1, spread=not fits)
        write_hest_sample(root, "LARGE", args.large, spots, genes, seed=2)
        write_hest_sample(root, "SPREAD", args.large, spots, genes, seed=3, spread=True)
        for i, sid in enumerate(small_ids):
            write_hest_sample(root, sid, 4000, 250, genes, seed=10 + i)
    console.print(f"data: {time.perf_counter() - t0:.0f} s, large slide "
                  f"{(root / 'wsis' / 'LARGE.tif').stat().st_size / 2**20:.0f} MB on disk", highlight=False)
    tally = instrument()
    import anndata
    xy = {}
    for sid in ("LARGE", "SPREAD"):
        obs = anndata.read_h5ad(root / "st" / f"{sid}.h5ad").obs
        xy[sid] = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    figures = {"encoder": args.encoder, "spots": spots, "cpu_count": os.cpu_count(),
               "small_slide_px": args.small, "large_slide_px": args.large}
    store = work / "stores" / "bench.zarr"
    tables = []

    if null:
        extract.FrozenEncoder = null_encoder
        encoder = null_encoder("random", args.device)
        maps, _ = encoder.encode(np.zeros((64, 224, 224, 3), dtype=np.uint8))
        codecs, figures["codecs"] = codec_table(maps)
        runs = {}
        for workers in args.workers or [1, 2]:
            for sid in ("LARGE", "SPREAD"):
                tally["decoded"] = 0
                runs[(sid, workers)] = run = measured_extract(root, store, [sid], args.device, workers, args.batch_size)
                run["tiles_decoded"], run["tiles_touched"] = tally["decoded"], touched_tiles(xy[sid], args.large)
        # the per-crop path in the same run: Slide's generic read_regions (one region at a time)
        from nh2st.slide import Slide, TiffSlide

        batched = TiffSlide.read_regions
        TiffSlide.read_regions = Slide.read_regions
        try:
            baseline = measured_extract(root, store, ["LARGE"], args.device, 1, args.batch_size)
        finally:
            TiffSlide.read_regions = batched
        fixed = measured_extract(root, store, small_ids, args.device, 2, args.batch_size) if small_ids else None
        first = runs[("LARGE", min(w for _, w in runs))]
        table = Table(title=f"nh2st extract, null encoder: {spots} spots per sample, {first['device']}, batch "
                            f"{first['batch_size']}, {os.cpu_count()} CPU cores (shared)",
                      caption="per CPU-second = spots / process CPU time (user + sys, all threads): "
                              "what one core sustains")
        for col in ("run", "crop threads", "patches/s", "per CPU-second", "tiles decoded / touched", "note"):
            table.add_column(col, justify="left" if col in ("run", "note") else "right")
        table.add_row("per-crop path (before), Visium grid", "1", f"{baseline['patches_per_s']:,.0f}",
                      f"{baseline['patches_per_cpu_s']:,.0f}", "", "baseline")
        for (sid, workers), run in sorted(runs.items()):
            name = "batched, Visium grid" if sid == "LARGE" else "batched, spots spread out"
            table.add_row(name, str(workers), f"{run['patches_per_s']:,.0f}", f"{run['patches_per_cpu_s']:,.0f}",
                          f"{run['tiles_decoded']:,} / {run['tiles_touched']:,}",
                          "goal >= 1,500 per core" if sid == "LARGE" else "no tile shared")
        if fixed:
            per_sample = fixed["wall_s"] / len(small_ids)
            patches_only = 250 / first["patches_per_s"]
            table.add_row(f"{len(small_ids)} samples x 250 spots", "2", f"{fixed['patches_per_s']:,.0f}",
                          f"{fixed['patches_per_cpu_s']:,.0f}", "",
                          f"{per_sample:.2f} s per sample; its patches alone {patches_only:.2f} s")
        tables += [table, codecs]
        grid_runs = [r for (sid, _), r in sorted(runs.items()) if sid == "LARGE"]
        tables += [breakdown_table(f"breakdown: Visium grid, {r['workers']} crop thread(s)", r) for r in grid_runs]
        if fixed:
            tables.append(breakdown_table(f"breakdown: {len(small_ids)} samples x 250 spots", fixed))
        figures.update({"baseline_per_crop": baseline, "fixed_cost": fixed,
                        "runs": {f"{sid}/{w}": r for (sid, w), r in runs.items()}})
        pipeline_run = first
    else:
        from nh2st.encoder import FrozenEncoder

        encoder = FrozenEncoder("random", device=args.device)
        batch = args.batch_size or encoder.default_batch_size
        rng = np.random.default_rng(0)
        patches = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        encoder.encode(patches)  # warm-up: kernel selection / allocator
        n_batches = max(1, spots // batch)

        def bare_forward() -> float:
            if encoder.device.type == "cuda":
                import torch
                torch.cuda.synchronize(encoder.device)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                encoder.encode(patches)  # returns host arrays, so each call includes the device sync
            return n_batches * batch / (time.perf_counter() - t0)

        bare_before = bare_forward()
        workers = (args.workers or [None])[0]
        runs = {sid: measured_extract(root, store, [sid], args.device, workers, args.batch_size)
                for sid in ("LARGE", "SPREAD")}
        bare_after = bare_forward()  # again after the pipelines: on a shared machine the load drifts
        bare = (bare_before + bare_after) / 2
        pipeline_run = runs["LARGE"]
        table = Table(title=f"nh2st extract: {spots} spots, {pipeline_run['device']} ({pipeline_run['precision']}), "
                            f"batch {pipeline_run['batch_size']}, {pipeline_run['workers']} crop threads",
                      caption="pipeline = run_extract wall time: h5ad read, targets, neighbours, crops, "
                              "encode, compress+write, thumbnail, commit")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_column("goal / note")
        table.add_row("bare encoder forward", f"{bare:,.1f} patches/s",
                      f"mean of {bare_before:,.1f} before, {bare_after:,.1f} after")
        for sid, note in (("LARGE", "Visium grid"), ("SPREAD", "spots spread out (no tile reuse)")):
            table.add_row(f"pipeline, {note}", f"{runs[sid]['patches_per_s']:,.1f} patches/s", "")
            table.add_row("  ratio pipeline / bare", f"{runs[sid]['patches_per_s'] / bare:.2f}", ">= 0.85")
        tables += [table, breakdown_table("breakdown: Visium grid", runs["LARGE"])]
        figures.update({"bare_encoder_patches_per_s": bare, "bare_before_after": [bare_before, bare_after],
                        "runs": runs, "ratio": runs["LARGE"]["patches_per_s"] / bare,
                        "ratio_spread": runs["SPREAD"]["patches_per_s"] / bare})

    # the store holds the last run's samples (each run overwrites it)
    sample_dir = store / "samples" / (small_ids[-1] if small_ids else "SPREAD")
    n = 250 if small_ids else spots
    figures["bytes_per_spot"] = disk_bytes(sample_dir) / n
    figures["feature_bytes_per_spot"] = disk_bytes(sample_dir / "features") / n
    memory = Table(title="disk and memory")
    memory.add_column("measure")
    memory.add_column("value", justify="right")
    memory.add_column("note")
    memory.add_row("disk bytes per spot", f"{figures['bytes_per_spot']:,.0f} B", "")
    memory.add_row("  features only", f"{figures['feature_bytes_per_spot']:,.0f} B", "raw 50,176")
    if not args.no_rss:
        for sid, size in (("SMALL", args.small), ("LARGE", args.large)):
            peak, _ = child_peak_rss([str(root), str(work / "stores" / f"{sid}.zarr"), sid, args.encoder, args.device])
            figures[f"peak_rss_{sid.lower()}_bytes"] = peak
            memory.add_row(f"peak RSS, {size:,}^2 px slide", f"{peak / 2**20:,.0f} MB",
                           "fresh process; flat is the goal" if sid == "LARGE" else "fresh process")
    tables.append(memory)
    out = Console(width=max(Console().width, 150))
    for table in tables:
        out.print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
