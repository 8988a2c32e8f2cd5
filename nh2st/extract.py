"""Stage one: dataset reader -> 224-px crops -> frozen ResNet18 -> Zarr embedding store.

    summary = run_extract("zen", data_root="data/HEST-1k", weights="weights/tenpercent_resnet18.ckpt")

For each sample not yet complete in the store: load it through its reader, compute the targets
(nh2st.expression) and the neighbour index (nh2st.neighbors), then stream its patches through
the encoder in batches while a thread pool crops the next batches and a writer thread compresses
the previous one; the sample is marked complete last. The store's lock keeps a second writer out;
complete samples are skipped, so a killed run resumes where it stopped.

The run's summary is returned and saved as JSON in `<store>/extract.json` (the last run's).
"""

import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.progress import ProgressColumn
from rich.text import Text

from nh2st.atomic import atomic_write
from nh2st.datasets import get_dataset
from nh2st.encoder import DEFAULT_WEIGHTS, FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.expression import NORMALISATION, process_expression
from nh2st.neighbors import knn_index
from nh2st.progress import make_progress
from nh2st.store import EmbeddingStore, StoreMeta

log = logging.getLogger(__name__)

NEIGHBORS_K = 9
THUMBNAIL_SIZE = 1024
SUMMARY_FILE = "extract.json"


class RateColumn(ProgressColumn):
    """Patches per second of a task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} patches/s" if speed else "", style="progress.data.speed")


def default_store_path(dataset: str) -> Path:
    return Path("stores") / f"{dataset}.zarr"


def default_weights(dataset: str) -> str:
    """The demo runs anywhere with seeded random weights; real datasets need the histology checkpoint."""
    return "random" if dataset == "demo" else str(DEFAULT_WEIGHTS)


def disk_bytes(path: str | Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def crop_batch(slide, pixel_xy: np.ndarray, size: int) -> np.ndarray:
    """(B, 2) spot centres -> (B, size, size, 3) uint8 patches."""
    out = np.empty((len(pixel_xy), size, size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(pixel_xy):
        out[i] = slide.crop(float(x), float(y), size)
    return out


def encode_sample(sample, encoder: FrozenEncoder, writer, pool: ThreadPoolExecutor, batch_size: int,
                  prefetch: int, on_batch=None) -> None:
    """Crop (in `pool`), encode and write every spot of `sample` in order."""
    n = sample.n_spots
    starts = iter(range(0, n, batch_size))
    pending: deque = deque()

    def submit_next():
        start = next(starts, None)
        if start is not None:
            xy = sample.pixel_xy[start:start + batch_size]
            pending.append(pool.submit(crop_batch, sample.slide, xy, encoder.patch_size))

    for _ in range(prefetch):
        submit_next()
    with ThreadPoolExecutor(1, thread_name_prefix="nh2st-write") as write_pool:
        write = None
        while pending:
            patches = pending.popleft().result()
            submit_next()
            maps, pooled = encoder.encode(patches)
            if write is not None:
                write.result()  # one batch in flight keeps memory flat and surfaces write errors
            write = write_pool.submit(writer.write_features, maps, pooled)
            if on_batch is not None:
                on_batch(len(patches))
        if write is not None:
            write.result()


def run_extract(dataset: str, data_root=None, store_path=None, weights=None, samples=None,
                device: str = "auto", batch_size: int | None = None, overwrite: bool = False,
                allow_missing_genes: bool = False, workers: int | None = None,
                progress: bool = True, genes: str | None = None, image_dir=None, mpp: float | None = None) -> dict:
    """Build or complete the embedding store of `dataset`; returns (and saves) a run summary.

    data_root: default the dataset's (`data/...`); store_path: default `stores/<dataset>.zarr`;
    weights: checkpoint path or `random[:seed=N]` (default: weights/tenpercent_resnet18.ckpt,
    `random` for the demo); samples: sample ids overriding the dataset's list; genes: FILE, hvg:N or
    heg:N (default: the paper's list; see choose_genes); image_dir, mpp: own-data reader options.
    Samples already complete in the store are skipped; a store made with other weights, genes or
    patch size is refused unless `overwrite`.
    """
    spec = get_dataset(dataset).with_options(image_dir=image_dir, mpp=mpp)
    root = Path(data_root if data_root is not None else spec.data_root)
    store_path = Path(store_path) if store_path is not None else default_store_path(spec.name)
    sample_ids = list(dict.fromkeys(samples)) if samples else spec.find_samples(root)
    if not sample_ids:
        raise NH2STError(f"{root}: no {spec.name} samples found; check --data-root or pass --samples")
    genes, gene_selection = choose_genes(spec, root, sample_ids, genes, store_path, overwrite, progress)
    encoder = FrozenEncoder(weights if weights is not None else default_weights(spec.name), device)
    batch_size = batch_size or encoder.default_batch_size
    if batch_size < 1:
        raise NH2STError(f"--batch-size {batch_size}: must be at least 1")
    if workers is None:
        # A GPU forward outruns one crop thread by far (JPEG tile decoding); on CPU the crop threads
        # share the cores with the forward, which needs most of them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        workers = min(32, cores) if encoder.device.type == "cuda" else min(4, max(2, cores // 4))
    if workers < 1:
        raise NH2STError(f"--workers {workers}: must be at least 1")
    meta = StoreMeta(dataset=spec.name, genes=tuple(genes), backbone=encoder.name, weights=encoder.weights,
                     weights_sha256=encoder.weights_sha256, patch_size=encoder.patch_size,
                     feature_shape=encoder.feature_shape, neighbors_k=NEIGHBORS_K,
                     normalisation=dict(NORMALISATION), gene_selection=gene_selection)
    started = time.time()
    rows = []
    with EmbeddingStore.open_for_writing(store_path, meta, overwrite=overwrite) as store:
        todo = [s for s in sample_ids if not store.is_complete(s)]
        for sid in sample_ids:
            if sid not in todo:
                rows.append({"id": sid, "status": "skipped", "n_spots": store.n_spots(sid)})
        if not todo:
            log.info("%s: all %d samples already complete, nothing to do", store_path, len(sample_ids))
        else:
            bar = make_progress(RateColumn(), transient=True)
            bar.disable = not progress
            with ThreadPoolExecutor(workers, thread_name_prefix="nh2st-crop") as pool, bar:
                overall = bar.add_task("samples", total=len(todo))
                for sid in todo:
                    rows.append(_extract_sample(spec, root, sid, genes, allow_missing_genes, store, encoder,
                                                pool, workers, batch_size, bar))
                    bar.advance(overall)
        order = {sid: i for i, sid in enumerate(sample_ids)}
        rows.sort(key=lambda r: order[r["id"]])
        done = [r for r in rows if r["status"] == "extracted"]
        spots = sum(r["n_spots"] for r in done)
        encode_seconds = sum(r["seconds"] for r in done)
        summary = {
            "dataset": spec.name, "store": str(store_path), "data_root": str(root),
            "backbone": encoder.name, "weights": encoder.weights, "weights_sha256": encoder.weights_sha256,
            "device": str(encoder.device), "precision": str(encoder.dtype).removeprefix("torch."),
            "batch_size": batch_size, "workers": workers,
            "up_to_date": not done, "samples": rows,
            "n_extracted": len(done), "n_skipped": len(rows) - len(done), "spots_extracted": spots,
            "patches_per_s": spots / encode_seconds if encode_seconds else None,
            "seconds": time.time() - started, "store_bytes": disk_bytes(store_path),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write(store_path / SUMMARY_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def choose_genes(spec, root, sample_ids, genes: str | None, store_path, overwrite: bool = False,
                 show_progress: bool = True) -> tuple[list[str], dict]:
    """(gene list, how it was chosen) for a run of `nh2st extract` (`--genes`, see DatasetSpec.choose_genes).

    A store already made with the same `hvg:N` / `heg:N` choice keeps its list (resuming, or adding
    samples, never re-ranks genes under finished samples); so does a store of a dataset without a
    shipped list when `--genes` is not given. `overwrite` chooses afresh.
    """
    from nh2st.expression import RANKINGS, parse_gene_choice

    choice = parse_gene_choice(genes) if genes is not None else None
    reusable = choice.kind in RANKINGS if choice is not None else spec.gene_list is None
    if reusable and not overwrite and (Path(store_path) / "zarr.json").is_file():
        try:
            made = EmbeddingStore.open(store_path).meta
        except NH2STError:  # not a store, or another writer is creating it: open_for_writing says which
            made = None
        previous = made.gene_selection if made is not None else {}
        if previous and (choice is None or previous.get("spec") == choice.spec):
            return list(made.genes), previous
    return spec.choose_genes(root, sample_ids, genes, show_progress)


def _extract_sample(spec, root, sample_id, genes, allow_missing_genes, store, encoder, pool, workers,
                    batch_size, bar) -> dict:
    sample = spec.load_sample(root, sample_id, genes, allow_missing_genes)
    try:
        t0 = time.perf_counter()
        targets = process_expression(sample.counts, sample.grid_xy)
        neighbors = knn_index(sample.pixel_xy, NEIGHBORS_K)
        info = {"source": str(sample.source), "meta": sample.meta, "slide": str(sample.slide.path),
                "slide_size": [int(sample.slide.width), int(sample.slide.height)],
                "device": str(encoder.device), "precision": str(encoder.dtype).removeprefix("torch."),
                "started_at": time.time()}
        writer = store.begin_sample(sample_id, sample.n_spots, info=json.loads(json.dumps(info, default=str)))
        writer.write_array("counts", sample.counts)
        writer.write_array("targets", targets)
        writer.write_array("pixel_xy", sample.pixel_xy)
        writer.write_array("grid_xy", sample.grid_xy)
        writer.write_array("barcodes", sample.barcodes)
        writer.write_array("neighbors", neighbors)
        task = bar.add_task(sample_id, total=sample.n_spots)
        encode_sample(sample, encoder, writer, pool, batch_size, prefetch=workers + 1,
                      on_batch=lambda k: bar.advance(task, k))
        image, scale = sample.slide.thumbnail(THUMBNAIL_SIZE)
        writer.write_thumbnail(image, scale)
        writer.commit()
        seconds = time.perf_counter() - t0
        bar.remove_task(task)
    finally:
        sample.slide.close()
    log.info("%s: %d spots in %.1f s (%.0f patches/s)", sample_id, sample.n_spots, seconds,
             sample.n_spots / seconds)
    return {"id": sample_id, "status": "extracted", "n_spots": sample.n_spots, "seconds": seconds,
            "patches_per_s": sample.n_spots / seconds}


def describe_store(path: str | Path) -> dict:
    """What `nh2st info` shows: root attributes, per-sample spots/completeness/bytes, total bytes."""
    store = EmbeddingStore.open(path)
    root_attrs = store.root.attrs.asdict().get("nh2st", {})
    samples = []
    for sid in store.all_sample_ids():
        attrs = store.root["samples"][sid].attrs.asdict()
        samples.append({"id": sid, "complete": bool(attrs.get("complete", False)),
                        "n_spots": int(attrs.get("n_spots", 0)),
                        "completed_at": attrs.get("completed_at"),
                        "patch": (attrs.get("meta") or {}).get("patch"),
                        "bytes": disk_bytes(store.path / "samples" / sid)})
    last_run = store.path / SUMMARY_FILE
    return {"path": str(store.path), "attributes": root_attrs, "samples": samples,
            "complete_samples": sum(s["complete"] for s in samples),
            "spots": sum(s["n_spots"] for s in samples if s["complete"]),
            "bytes": disk_bytes(store.path),
            "last_extract": json.loads(last_run.read_text()) if last_run.is_file() else None}
