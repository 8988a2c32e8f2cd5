"""Stage one: dataset reader -> 224-px crops -> frozen ResNet18 -> Zarr embedding store.

    summary = run_extract("zen", data_root="data/HEST-1k", weights="weights/tenpercent_resnet18.ckpt")

For each sample not yet complete in the store: load it through its reader, compute the targets
(nh2st.expression) and the neighbour index (nh2st.neighbors), then stream its patches through
the encoder in batches (:func:`encode_sample`) while a thread pool crops the next batches and a
writer thread compresses the previous ones; the sample is marked complete last. Each sample is
claimed in the store before it is written (nh2st.store.SampleClaims), so several writers share a
store, one per sample; complete samples are skipped, so a killed run resumes where it stopped.

Three ways to run: one process and one encoder (the default); `devices=[...]` (`--gpus`), one
encoder per device, each in its own dask worker process on this machine; `scheduler=ADDRESS`
(`--scheduler`), a dask.distributed cluster, one task per sample, the store on a filesystem every
worker shares. dask reruns a task whose worker died; the rerun finds the dead worker's claim free
and its half-written sample, which it deletes and redoes.

The run's summary is returned and saved as JSON in `<store>/extract.json` (the last run's).
"""

import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import ProgressColumn
from rich.text import Text

from nh2st import now
from nh2st.atomic import atomic_write
from nh2st.datasets import get_dataset
from nh2st.devices import cpu_count
from nh2st.encoder import DEFAULT_WEIGHTS, FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.expression import NORMALISATION, process_expression
from nh2st.neighbors import knn_index
from nh2st.paper import NEIGHBORS_K
from nh2st.progress import make_progress
from nh2st.stages import stage
from nh2st.store import FEATURE_CHUNK_SPOTS, SUMMARY_FILE, EmbeddingStore, SampleClaims, StoreMeta, store_state
from nh2st.views import VIEW_COUNTS, dihedral

log = logging.getLogger(__name__)

SCHEDULER_TIMEOUT = "20s"  # to connect to a --scheduler


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
        self._queued: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._spots = 0
        self._running = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nh2st-write")

    def add(self, maps: np.ndarray, pooled: np.ndarray, views: np.ndarray | None = None) -> None:
        self._queued.append((maps, pooled, views))
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
                maps, pooled, views = batches[0]
            else:
                maps, pooled, views = (None if parts[0] is None else np.concatenate(parts) for parts in zip(*batches))
            if views is None:    # a writer of one view (predict's) takes maps and pooled only
                self._writer.write_features(maps, pooled)
            else:
                self._writer.write_features(maps, pooled, views)

    def close(self) -> None:
        """Write what is queued and wait; `abort` instead when the sample failed."""
        self._start_next()  # wait for the running write, start the queued batches
        self._start_next()  # wait for those
        self._pool.shutdown()

    def abort(self) -> None:
        self._queued = []
        self._pool.shutdown(wait=True, cancel_futures=True)


def encode_sample(sample, encoder: FrozenEncoder, writer, pool: ThreadPoolExecutor, batch_size: int,
                  prefetch: int, on_batch=None, views: int = 1) -> None:
    """Crop (in `pool`), encode and write every spot of `sample` in order.

    `prefetch` batches are cropped ahead in `pool` (:func:`crop_batch`); each batch is submitted to
    the encoder before the previous one's result is awaited, so the device always has the next
    batch queued (and on CUDA its copy overlaps the previous forward); results go to
    :class:`_FeatureWrites`. A crop error (a corrupt tile) names the sample. views > 1: each batch
    is also encoded in dihedral views 1..views-1 (nh2st.views), turned where the batch is (on the
    encoder's device on CUDA), and written to the sample's `views` array.
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

    def submit(patches) -> list:
        """The batch's encoded views, identity first."""
        if views == 1:
            return [encoder.submit(patches)]
        if encoder.device.type == "cuda" and not patches.is_cuda:
            patches = patches.to(encoder.device, non_blocking=True)   # turned on the device, copied once
        return [encoder.submit(patches)] + [encoder.submit(dihedral(patches, v)) for v in range(1, views)]

    def finish(encoded: list) -> None:
        maps, pooled = encoded[0].result()
        others = np.stack([e.result()[0] for e in encoded[1:]], axis=1) if len(encoded) > 1 else None
        writes.add(maps, pooled, others)
        if on_batch is not None:
            on_batch(len(maps))

    for _ in range(max(1, prefetch)):
        crop_next()
    writes = _FeatureWrites(writer, max_spots=max(batch_size, FEATURE_CHUNK_SPOTS * cpu_count()))
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
            encoded.append(submit(patches))
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


@dataclass(frozen=True)
class ExtractJob:
    """What every writer of one extraction needs; picklable, so dask workers receive it whole."""

    dataset: str
    root: Path
    store_path: Path
    weights: str
    genes: tuple[str, ...]
    allow_missing_genes: bool = False
    batch_size: int | None = None
    workers: int | None = None       # crop threads per encoder; None: chosen per device
    encoders_per_machine: int = 1    # encoders sharing this machine's cores (--gpus)
    gene_selection: dict | None = None   # how `genes` was chosen (choose_genes)
    views: int = 1                   # dihedral views encoded per patch (nh2st.views.VIEW_COUNTS)
    image_dir: str | None = None     # reader options of own data (visium, hest)
    mpp: float | None = None

    def spec(self):
        return get_dataset(self.dataset).with_options(image_dir=self.image_dir, mpp=self.mpp)

    def meta(self, encoder: FrozenEncoder) -> StoreMeta:
        return StoreMeta(dataset=self.dataset, genes=self.genes, backbone=encoder.name, weights=encoder.weights,
                         weights_sha256=encoder.weights_sha256, patch_size=encoder.patch_size,
                         feature_shape=encoder.feature_shape, neighbors_k=NEIGHBORS_K,
                         normalisation=dict(NORMALISATION), gene_selection=self.gene_selection or {},
                         views=self.views)

    def batch_and_workers(self, encoder: FrozenEncoder) -> tuple[int, int]:
        if self.workers is not None:
            return self.batch_size or encoder.default_batch_size, self.workers
        # A GPU forward outruns one crop thread by far (JPEG tile decoding); on CPU the crop threads
        # share the cores with the forward, which needs most of them.
        cores = max(1, cpu_count() // self.encoders_per_machine)
        workers = min(32, cores) if encoder.device.type == "cuda" else min(4, max(2, cores // 4))
        return self.batch_size or encoder.default_batch_size, workers


def run_extract(dataset: str, data_root=None, store_path=None, weights=None, samples=None,
                device: str = "auto", batch_size: int | None = None, overwrite: bool = False,
                allow_missing_genes: bool = False, workers: int | None = None,
                progress: bool = True, genes: str | None = None, image_dir=None, mpp: float | None = None,
                devices: list[str] | None = None, scheduler: str | None = None, views: int = 1) -> dict:
    """Build or complete the embedding store of `dataset`; returns (and saves) a run summary.

    data_root: default the dataset's (`data/...`); store_path: default `stores/<dataset>.zarr`;
    weights: checkpoint path or `random[:seed=N]` (default: weights/tenpercent_resnet18.ckpt,
    `random` for the demo); samples: sample ids overriding the dataset's list; genes: FILE, hvg:N or
    heg:N (default: the paper's list; see choose_genes); image_dir, mpp: own-data reader options.
    Samples already complete in the store are skipped, and so are samples another writer is
    writing (status "claimed"); a store made with other weights, genes or patch size is refused
    unless `overwrite`. devices: one encoder per device (`["cuda:0", "cuda:1"]`), each in a worker
    process of a local dask cluster; scheduler: address of a dask.distributed scheduler whose
    workers share the data, weights and store paths. views: 1, 4 or 8 dihedral views of each patch
    (nh2st.views; training draws one per target spot per epoch), at 1x, 4x or 8x the encoder's work.
    """
    spec = get_dataset(dataset).with_options(image_dir=image_dir, mpp=mpp)
    root = Path(data_root if data_root is not None else spec.data_root)
    store_path = Path(store_path) if store_path is not None else default_store_path(spec.name)
    sample_ids = list(dict.fromkeys(samples)) if samples else spec.find_samples(root)
    if not sample_ids:
        raise NH2STError(f"{root}: no {spec.name} samples found; check --data-root or pass --samples")
    genes, gene_selection = choose_genes(spec, root, sample_ids, genes, store_path, overwrite, progress)
    if batch_size is not None and batch_size < 1:
        raise NH2STError(f"--batch-size {batch_size}: must be at least 1")
    if workers is not None and workers < 1:
        raise NH2STError(f"--workers {workers}: must be at least 1")
    if views not in VIEW_COUNTS:
        raise NH2STError(f"--views {views}: use one of {', '.join(map(str, VIEW_COUNTS))} (the patch as it is, "
                         "its 4 rotations, or all 8 rotations and mirror images)")
    if devices and scheduler:
        raise NH2STError("--gpus and --scheduler: pick one (a cluster's workers each use their own device)")
    job = ExtractJob(dataset=spec.name, root=root, store_path=store_path,
                     weights=str(weights if weights is not None else default_weights(spec.name)),
                     genes=tuple(genes), allow_missing_genes=allow_missing_genes, batch_size=batch_size,
                     workers=workers, encoders_per_machine=len(devices) if devices else 1,
                     gene_selection=gene_selection, image_dir=None if image_dir is None else str(image_dir), mpp=mpp,
                     views=views)
    started = time.time()
    if devices or scheduler:
        rows, setup = _run_on_cluster(job, sample_ids, device, devices, scheduler, overwrite, progress)
    else:
        rows, setup = _run_here(job, sample_ids, device, overwrite, progress)
    rows = [rows[sid] for sid in sample_ids]
    done = [r for r in rows if r["status"] == "extracted"]
    spots = sum(r["n_spots"] for r in done)
    # wall time from the first sample's start to the last one's end: several encoders overlap
    window = max(r["finished_at"] for r in done) - min(r["started_at"] for r in done) if done else 0.0
    meta = EmbeddingStore.open(store_path).meta
    summary = {
        "dataset": spec.name, "store": str(store_path), "data_root": str(root),
        "backbone": meta.backbone, "weights": meta.weights, "weights_sha256": meta.weights_sha256, "views": meta.views,
        "device": ", ".join(dict.fromkeys(r["device"] for r in done)) or setup.get("device"),
        "precision": ", ".join(dict.fromkeys(r["precision"] for r in done)) or setup.get("precision"),
        "batch_size": setup.get("batch_size", batch_size), "workers": setup.get("workers", workers),
        "devices": list(devices) if devices else None, "scheduler": scheduler,
        "up_to_date": all(r["status"] == "skipped" for r in rows), "samples": rows,
        "n_extracted": len(done), "n_skipped": sum(r["status"] == "skipped" for r in rows),
        "n_claimed": sum(r["status"] == "claimed" for r in rows), "spots_extracted": spots,
        "patches_per_s": spots / window if window > 0 else None,
        "seconds": time.time() - started, "store_bytes": disk_bytes(store_path),
        "finished_at": now(),
    }
    atomic_write(store_path / SUMMARY_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def _skipped(store: EmbeddingStore, sample_id: str) -> dict:
    return {"id": sample_id, "status": "skipped", "n_spots": store.n_spots(sample_id)}


def _up_to_date(job: ExtractJob, store: EmbeddingStore, rows: dict[str, dict]) -> tuple[dict[str, dict], dict]:
    """Nothing to extract, provided the store was made as this run would make it (the weights'
    checksum needs the encoder, on the CPU: no device is set up for nothing)."""
    store.check_identity(job.meta(FrozenEncoder(job.weights, "cpu")))
    log.info("%s: all %d samples already complete, nothing to do", job.store_path, len(rows))
    return rows, {}


def _busy(sample_ids: list[str], claims: SampleClaims) -> NH2STError:
    holders = {sid: claims.holder(sid) or "another writer" for sid in sample_ids}
    if len(set(holders.values())) == 1:
        verb = "is" if len(holders) == 1 else "are"
        said = f"{', '.join(holders)} {verb} being written by {next(iter(holders.values()))}"
    else:
        said = "; ".join(f"{sid} is being written by {who}" for sid, who in holders.items())
    return NH2STError(f"{claims.store_path}: {said}; wait for it to finish or write to another --store")


def _run_here(job: ExtractJob, sample_ids: list[str], device: str, overwrite: bool,
              progress: bool) -> tuple[dict[str, dict], dict]:
    """One process, one encoder, samples in order; returns ({sample id: row}, the encoder's setup)."""
    rows: dict[str, dict] = {}
    spec, claims = job.spec(), SampleClaims(job.store_path)
    todo, first = list(sample_ids), None
    if store_state(job.store_path) == "store":
        if not overwrite:
            existing = EmbeddingStore.open(job.store_path)
            rows = {sid: _skipped(existing, sid) for sid in sample_ids if existing.is_complete(sid)}
            todo = [sid for sid in sample_ids if sid not in rows]
            if not todo:
                return _up_to_date(job, existing, rows)
        # Claim before loading the encoder (seconds on a GPU): a writer that finds every sample
        # left taken by other writers is refused at once.
        first = next((claim for claim in map(claims.try_claim, todo) if claim is not None), None)
        if first is None:
            raise _busy(todo, claims)
    try:
        encoder = FrozenEncoder(job.weights, device)
        batch_size, workers = job.batch_and_workers(encoder)
        bar = make_progress(RateColumn(), transient=True)
        bar.disable = not progress
        with EmbeddingStore.open_for_writing(job.store_path, job.meta(encoder), overwrite=overwrite) as store, \
                ThreadPoolExecutor(workers, thread_name_prefix="nh2st-crop") as pool, bar:
            overall = bar.add_task("samples", total=len(todo))
            for sid in todo:
                claim = first if first is not None and first.sample_id == sid else claims.try_claim(sid)
                if claim is None:
                    rows[sid] = {"id": sid, "status": "claimed", "n_spots": None,
                                 "holder": claims.holder(sid) or "another writer"}
                else:
                    with claim:  # complete by now if another writer finished it meanwhile
                        rows[sid] = _skipped(store, sid) if store.is_complete(sid) else _timed(
                            _extract_sample, spec, job.root, sid, list(job.genes), job.allow_missing_genes,
                            store, encoder, pool, workers, batch_size, bar, job.views)
                bar.advance(overall)
    finally:
        if first is not None:
            first.release()
    return rows, {"device": str(encoder.device), "precision": str(encoder.dtype).removeprefix("torch."),
                  "batch_size": batch_size, "workers": workers}


def _timed(extract, *args) -> dict:
    started = time.time()
    row = extract(*args)
    return {**row, "started_at": started, "finished_at": time.time()}


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
                    batch_size, bar, views: int = 1) -> dict:
    """Read, encode and write one sample whose claim the caller holds; commits it last."""
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
                      on_batch=lambda k: bar.advance(task, k), views=views)
        image, scale = sample.slide.thumbnail()
        writer.write_thumbnail(image, scale)
        writer.commit()
        seconds = time.perf_counter() - t0
        bar.remove_task(task)
    finally:
        sample.slide.close()
    log.info("%s: %d spots in %.1f s (%.0f patches/s)", sample_id, sample.n_spots, seconds,
             sample.n_spots / seconds)
    return {"id": sample_id, "status": "extracted", "n_spots": sample.n_spots, "seconds": seconds,
            "patches_per_s": sample.n_spots / seconds, "device": str(encoder.device),
            "precision": str(encoder.dtype).removeprefix("torch."), "writer": store.claims.holder(sample_id)}


# ---- several encoders: a dask.distributed cluster, one task per sample ----------------------------
def _run_on_cluster(job: ExtractJob, sample_ids: list[str], device: str, devices: list[str] | None,
                    scheduler: str | None, overwrite: bool, progress: bool) -> tuple[dict[str, dict], dict]:
    """Samples as dask tasks: on a local cluster with one worker process per device (`devices`), or
    on the cluster at `scheduler`. Returns ({sample id: row}, {})."""
    from distributed import Client, KilledWorker, LocalCluster, as_completed  # only these runs need it

    rows: dict[str, dict] = {}
    existing, state = None, store_state(job.store_path)
    if state == "store" and overwrite:
        EmbeddingStore.clear(job.store_path)  # the first task to finish loading its encoder creates it anew
    elif state == "store":
        existing = EmbeddingStore.open(job.store_path)
        rows = {sid: _skipped(existing, sid) for sid in sample_ids if existing.is_complete(sid)}
    todo = [sid for sid in sample_ids if sid not in rows]
    if not todo:
        return _up_to_date(job, existing, rows)
    if devices:
        from nh2st.devices import resolve_device
        for d in devices:  # refused here rather than on every worker
            resolve_device(d)
    cluster = None
    try:
        if devices:
            cluster = LocalCluster(n_workers=len(devices), threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
            except (OSError, ValueError) as exc:
                raise NH2STError(f"--scheduler {scheduler}: cannot reach a dask scheduler there ({exc}); start "
                                 "one with `dask scheduler` and workers with `dask worker ADDRESS`") from None
        bar = make_progress(transient=True)
        bar.disable = not progress
        with client, bar:
            overall = bar.add_task("samples", total=len(todo))
            run = uuid.uuid4().hex[:8]
            futures = {client.submit(_extract_task, job, sid, device, devices, key=f"nh2st-extract-{sid}-{run}",
                                     pure=False): sid for sid in todo}
            try:
                for future in as_completed(futures):
                    sid = futures[future]
                    try:
                        rows[sid] = future.result()
                    except KilledWorker:
                        raise NH2STError(f"sample {sid}: every dask worker that tried it died (see the worker "
                                         "logs: memory?); the store keeps the finished samples, run again to "
                                         "retry") from None
                    bar.advance(overall)
            except BaseException:
                client.cancel(list(futures))
                raise
    finally:
        if cluster is not None:
            cluster.close()
    return rows, {}


# One encoder per (weights, device) per worker process, loaded by its first task, kept for the rest.
_WORKER_ENCODERS: dict[tuple[str, str], FrozenEncoder] = {}
_WORKER_ENCODERS_LOCK = threading.Lock()


def _extract_task(job: ExtractJob, sample_id: str, device: str, devices: list[str] | None) -> dict:
    """One sample, on a dask worker: claim it (waiting while another writer holds it), skip it if
    complete, else load this worker's encoder (once) and extract it."""
    if devices:  # a local cluster's workers are named 0, 1, ...: one device each
        from distributed import get_worker
        device = devices[int(get_worker().name) % len(devices)]
    claims = SampleClaims(job.store_path)
    with claims.claim(sample_id, on_wait=lambda who: log.info("%s: waiting for %s", sample_id, who)):
        if store_state(job.store_path) == "store":
            existing = EmbeddingStore.open(job.store_path)
            if existing.is_complete(sample_id):
                return _skipped(existing, sample_id)
        with _WORKER_ENCODERS_LOCK:
            encoder = _WORKER_ENCODERS.get((job.weights, device))
            if encoder is None:
                encoder = _WORKER_ENCODERS[job.weights, device] = FrozenEncoder(job.weights, device)
        batch_size, workers = job.batch_and_workers(encoder)
        bar = make_progress()
        bar.disable = True
        with EmbeddingStore.open_for_writing(job.store_path, job.meta(encoder)) as store, \
                ThreadPoolExecutor(workers, thread_name_prefix="nh2st-crop") as pool:
            return _timed(_extract_sample, job.spec(), job.root, sample_id, list(job.genes),
                          job.allow_missing_genes, store, encoder, pool, workers, batch_size, bar, job.views)


def describe_store(path: str | Path) -> dict:
    """What `nh2st info` shows: root attributes, per-sample spots/completeness/writer/bytes, total bytes."""
    store = EmbeddingStore.open(path)
    root_attrs = store.root.attrs.asdict().get("nh2st", {})
    writers = store.claims.holders()
    samples = []
    for sid in sorted(set(store.all_sample_ids()) | set(writers)):
        attrs = store.sample_attrs(sid)
        samples.append({"id": sid, "complete": bool(attrs.get("complete", False)),
                        "n_spots": int(attrs.get("n_spots", 0)),
                        "completed_at": attrs.get("completed_at"), "writer": writers.get(sid),
                        "patch": (attrs.get("meta") or {}).get("patch"),
                        "bytes": disk_bytes(store.path / "samples" / sid)})
    last_run = store.path / SUMMARY_FILE
    return {"path": str(store.path), "attributes": root_attrs, "samples": samples,
            "complete_samples": sum(s["complete"] for s in samples),
            "spots": sum(s["n_spots"] for s in samples if s["complete"]),
            "bytes": disk_bytes(store.path),
            "last_extract": json.loads(last_run.read_text()) if last_run.is_file() else None}
