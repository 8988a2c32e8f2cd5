"""Stage one: dataset reader -> 224-px crops -> frozen ResNet18 -> Zarr embedding store.

    summary = run_extract("zen", data_root="data/HEST-1k", weights="weights/tenpercent_resnet18.ckpt")

For each sample not yet complete in the store: load it through its reader, compute the targets
(nh2st.expression) and the neighbour index (nh2st.neighbors), then stream its patches through
the encoder in batches (:func:`encode_sample`) while a thread pool crops the next batches and a
writer thread compresses the previous ones; the sample is marked complete last. The store's lock keeps a second writer out;
complete samples are skipped, so a killed run resumes where it stopped.

The run's summary is returned and saved as JSON in `<store>/extract.json` (the last run's).
"""

import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
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
from nh2st.stages import stage
from nh2st.store import FEATURE_CHUNK_SPOTS, EmbeddingStore, StoreMeta

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


def crop_batch(slide, pixel_xy: np.ndarray, encoder, spare: list | None = None):
    """(B, 2) spot centres -> (B, size, size, 3) uint8 patches, where `encoder` wants them.

    On a GPU whose decoder handles the slide's tiles: a tensor built there (JPEG tiles decoded on
    the device). Otherwise cropped on the host straight into the encoder's host batch (page-locked
    on CUDA, so its copy to the device is asynchronous), or into a batch from `spare` (host batches
    the caller recycles; reusing one spares the kernel zeroing fresh pages).
    """
    device = encoder.device
    if encoder.crops_on_device and slide.decodes_on(device):
        return slide.crop_batch_on(device, pixel_xy, encoder.patch_size)
    batch = None
    if spare:
        try:
            batch = spare.pop()
        except IndexError:  # another thread took the last one
            pass
    if batch is None or len(batch) != len(pixel_xy):
        batch = encoder.host_batch(len(pixel_xy))
    slide.crop_batch(pixel_xy, encoder.patch_size, out=batch.numpy())
    return batch


class _FeatureWrites:
    """Writes encoded batches in spot order from one thread, one write at a time, off the encode loop.

    Batches that arrive while a write runs are joined into the next one, up to `max_spots`; a write
    of many chunks lets zarr compress them in parallel threads, so compression keeps up with the
    encoder by growing its writes, not by stalling the loop.
    """

    def __init__(self, writer, max_spots: int):
        self._writer = writer
        self._max_spots = max_spots
        self._queued: list[tuple[np.ndarray, np.ndarray]] = []
        self._spots = 0
        self._running = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nh2st-write")

    def add(self, maps: np.ndarray, pooled: np.ndarray) -> None:
        self._queued.append((maps, pooled))
        self._spots += len(maps)
        if self._running is None or self._running.done() or self._spots >= self._max_spots:
            self._start_next()

    def _start_next(self) -> None:
        if self._running is not None:
            with stage("wait for writes"):
                self._running.result()  # surfaces write errors; bounds memory
            self._running = None
        if self._queued:
            batches, self._queued, self._spots = self._queued, [], 0
            self._running = self._pool.submit(self._write, batches)

    def _write(self, batches) -> None:
        with stage("compress + write features"):
            if len(batches) == 1:
                maps, pooled = batches[0]
            else:
                maps = np.concatenate([m for m, _ in batches])
                pooled = np.concatenate([p for _, p in batches])
            self._writer.write_features(maps, pooled)

    def close(self) -> None:
        """Write what is queued and wait; `abort` instead when the sample failed."""
        self._start_next()  # wait for the running write, start the queued batches
        self._start_next()  # wait for those
        self._pool.shutdown()

    def abort(self) -> None:
        self._queued = []
        self._pool.shutdown(wait=True, cancel_futures=True)


def encode_sample(sample, encoder: FrozenEncoder, writer, pool: ThreadPoolExecutor, batch_size: int,
                  prefetch: int, on_batch=None) -> None:
    """Crop (in `pool`), encode and write every spot of `sample` in order.

    `prefetch` batches are cropped ahead in `pool` (:func:`crop_batch`); each batch is submitted to
    the encoder before the previous one's result is awaited, so the device always has the next
    batch queued (and on CUDA its copy overlaps the previous forward); results go to
    :class:`_FeatureWrites`. A crop error (a corrupt tile) names the sample.
    """
    n = sample.n_spots
    starts = iter(range(0, n, batch_size))
    crops: deque = deque()
    # On CPU a host batch is consumed when submit returns, so it goes back for the next crop; on
    # CUDA the pinned-memory allocator recycles host batches once their copies are done.
    spare: list | None = [] if encoder.device.type == "cpu" and not encoder.crops_on_device else None

    def crop_next():
        start = next(starts, None)
        if start is not None:
            xy = sample.pixel_xy[start:start + batch_size]
            crops.append(pool.submit(crop_batch, sample.slide, xy, encoder, spare))

    def finish(encoded) -> None:
        maps, pooled = encoded.result()
        writes.add(maps, pooled)
        if on_batch is not None:
            on_batch(len(maps))

    for _ in range(max(1, prefetch)):
        crop_next()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    writes = _FeatureWrites(writer, max_spots=max(batch_size, FEATURE_CHUNK_SPOTS * cores))
    encoded: deque = deque()
    try:
        while crops:
            with stage("wait for crops"):
                try:
                    patches = crops.popleft().result()
                except NH2STError as exc:
                    name = getattr(sample, "id", None)
                    raise (NH2STError(f"sample {name}: {exc}") if name else exc) from None
            crop_next()
            encoded.append(encoder.submit(patches))
            if spare is not None:
                spare.append(patches)
            del patches
            if len(encoded) > 1:
                finish(encoded.popleft())
        while encoded:
            finish(encoded.popleft())
    except BaseException:
        for future in crops:
            future.cancel()
        wait(crops)  # no crop may still read the slide when the caller closes it
        writes.abort()
        raise
    writes.close()


def run_extract(dataset: str, data_root=None, store_path=None, weights=None, samples=None,
                device: str = "auto", batch_size: int | None = None, overwrite: bool = False,
                allow_missing_genes: bool = False, workers: int | None = None,
                progress: bool = True) -> dict:
    """Build or complete the embedding store of `dataset`; returns (and saves) a run summary.

    data_root: default the dataset's (`data/...`); store_path: default `stores/<dataset>.zarr`;
    weights: checkpoint path or `random[:seed=N]` (default: weights/tenpercent_resnet18.ckpt,
    `random` for the demo); samples: sample ids overriding the dataset's list.
    Samples already complete in the store are skipped; a store made with other weights, genes or
    patch size is refused unless `overwrite`.
    """
    spec = get_dataset(dataset)
    root = Path(data_root if data_root is not None else spec.data_root)
    store_path = Path(store_path) if store_path is not None else default_store_path(spec.name)
    genes = spec.genes()
    sample_ids = list(dict.fromkeys(samples)) if samples else spec.find_samples(root)
    if not sample_ids:
        raise NH2STError(f"{root}: no {spec.name} samples found; check --data-root or pass --samples")
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
                     normalisation=dict(NORMALISATION))
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
                        "bytes": disk_bytes(store.path / "samples" / sid)})
    last_run = store.path / SUMMARY_FILE
    return {"path": str(store.path), "attributes": root_attrs, "samples": samples,
            "complete_samples": sum(s["complete"] for s in samples),
            "spots": sum(s["n_spots"] for s in samples if s["complete"]),
            "bytes": disk_bytes(store.path),
            "last_extract": json.loads(last_run.read_text()) if last_run.is_file() else None}
