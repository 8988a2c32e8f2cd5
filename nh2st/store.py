"""The Zarr v3 embedding store: the contract between stage one (extract) and stage two (train).

Layout (see docs/store.md for the full schema)::

    <name>.zarr/
      zarr.json                 root attributes: {"nh2st": StoreMeta as a dict}
      .lock                     advisory lock file held by the one writer
      samples/<sample id>/      one group per sample, attrs {"complete": bool, ...}
        features   (N, 512, 7, 7) float16   chunked along spots, Zstd level 1
        pooled     (N, 512)       float32
        counts     (N, G)         float32   raw counts of the store's genes
        targets    (N, G)         float32   normalised, log10, grid-smoothed (nh2st.expression)
        pixel_xy   (N, 2)         float64   level-0 pixel centres (x = column, y = row)
        grid_xy    (N, 2)         int64
        barcodes   (N,)           str
        neighbors  (N, k)         int32     k nearest spots within the sample, self first
        thumbnail  (h, w, 3)      uint8     optional slide thumbnail; attrs["thumbnail_scale"]

A sample is complete only once its group's ``complete`` attribute is True, which the writer sets
after every array is written; anything else under ``samples/`` is a half-written sample that the
next writer deletes and redoes.
"""

import dataclasses
import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from nh2st import __version__
from nh2st.errors import NH2STError

FORMAT_VERSION = 1
FEATURE_CHUNK_SPOTS = 128
# Zstd level 1: on ResNet maps as small as Blosc zstd-3 + shuffle (ratio 1.55 vs 1.53) at ~2.5x its
# speed per core (benchmarks/extract.py --encoder null prints the comparison); a standard zarr v3 codec.
COMPRESSOR = ZstdCodec(level=1)

SAMPLE_ARRAYS = ("features", "pooled", "counts", "targets", "pixel_xy", "grid_xy", "barcodes", "neighbors")


@dataclass(frozen=True)
class StoreMeta:
    """Root attributes: what produced the store. Two stores are compatible iff identity() matches."""

    dataset: str
    genes: tuple[str, ...]
    backbone: str
    weights: str
    weights_sha256: str
    patch_size: int = 224
    feature_shape: tuple[int, int, int] = (512, 7, 7)
    neighbors_k: int = 9
    normalisation: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        object.__setattr__(self, "genes", tuple(self.genes))
        object.__setattr__(self, "feature_shape", tuple(self.feature_shape))

    def identity(self) -> dict:
        """The fields that must match for features of two runs to be mixed in one store."""
        d = self.to_dict()
        d.pop("weights")  # a path; the checksum is what identifies the weights
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["genes"] = list(self.genes)
        d["feature_shape"] = list(self.feature_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoreMeta":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class EmbeddingStore:
    """A feature store on disk. Open read-only with :meth:`open`; write with :meth:`open_for_writing`."""

    def __init__(self, path: Path, root: zarr.Group, meta: StoreMeta):
        self.path = path
        self.root = root
        self.meta = meta
        self._lock_file = None

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "EmbeddingStore":
        """Open an existing store for reading."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise NH2STError(f"{path}: not an nh2st store (no zarr.json); build one with `nh2st extract`")
        root = zarr.open_group(str(path), mode="r")
        attrs = root.attrs.asdict()
        if "nh2st" not in attrs:
            raise NH2STError(f"{path}: a Zarr group but not an nh2st store (no 'nh2st' root attribute)")
        meta = StoreMeta.from_dict(attrs["nh2st"])
        if meta.format_version != FORMAT_VERSION:
            raise NH2STError(f"{path}: store format version {meta.format_version}, this nh2st reads "
                             f"{FORMAT_VERSION}; re-run `nh2st extract --overwrite`")
        return cls(path, root, meta)

    @classmethod
    @contextmanager
    def open_for_writing(cls, path, meta: StoreMeta, overwrite: bool = False):
        """Exclusive writer: lock the store, create it or check it matches `meta`, yield it.

        A store written with different identity fields (genes, weights checksum, patch size, ...)
        is refused unless `overwrite`, which deletes it first. A second writer gets an error while
        the first holds the lock.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lock_file = open(path / ".lock", "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            raise NH2STError(f"{path}: store is being written by {holder}; wait for it to finish "
                             "or write to another --store") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock_file.flush()
        try:
            store = cls._create_or_check(path, meta, overwrite)
            store._lock_file = lock_file
            yield store
        finally:
            lock_file.seek(0)
            lock_file.truncate()
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            lock_file.close()

    @classmethod
    def _create_or_check(cls, path: Path, meta: StoreMeta, overwrite: bool) -> "EmbeddingStore":
        is_store = (path / "zarr.json").is_file()
        others = [c for c in path.iterdir() if c.name != ".lock"]
        if others and not is_store:
            raise NH2STError(f"{path}: folder exists and is not an nh2st store; choose another --store")
        if is_store and not overwrite:
            existing, wanted = cls.open(path).meta.identity(), meta.identity()
            differ = [k for k in wanted if wanted[k] != existing.get(k)]
            if differ:
                raise NH2STError(f"{path}: store was made with other {', '.join(differ)}; "
                                 "pass --overwrite to rebuild it, or choose another --store")
        if is_store and overwrite:
            for child in others:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            is_store = False
        if not is_store:
            root = zarr.create_group(str(path))  # mode "w" would delete .lock
            root.attrs["nh2st"] = {**meta.to_dict(), "created_by": f"nh2st {__version__}",
                                   "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            root.create_group("samples")
        return cls(path, zarr.open_group(str(path), mode="r+"), meta)

    # ---- reading -------------------------------------------------------------------------------
    def _samples_group(self) -> zarr.Group:
        return self.root["samples"]

    def _sample_attrs(self, sample_id: str) -> dict:
        try:
            return self._samples_group()[sample_id].attrs.asdict()
        except (KeyError, ValueError, OSError):
            return {}

    def all_sample_ids(self) -> list[str]:
        """Every sample group, complete or not."""
        return sorted(self._samples_group().group_keys())

    def sample_ids(self) -> list[str]:
        """Complete samples only, sorted."""
        return [s for s in self.all_sample_ids() if self.is_complete(s)]

    def is_complete(self, sample_id: str) -> bool:
        return bool(self._sample_attrs(sample_id).get("complete", False))

    def sample_info(self, sample_id: str) -> dict:
        """The attributes of a complete sample (n_spots, source, completed_at, meta, ...)."""
        self._require(sample_id)
        return self._sample_attrs(sample_id)

    def n_spots(self, sample_id: str) -> int:
        return int(self.sample_info(sample_id)["n_spots"])

    def _require(self, sample_id: str) -> None:
        if not self.is_complete(sample_id):
            known = ", ".join(self.sample_ids()) or "none"
            raise NH2STError(f"{self.path}: no complete sample {sample_id!r} (complete samples: {known})")

    def read_sample(self, sample_id: str, fields=SAMPLE_ARRAYS) -> dict[str, np.ndarray]:
        """Arrays of one complete sample, as numpy."""
        self._require(sample_id)
        group = self._samples_group()[sample_id]
        out = {}
        for name in fields:
            if name not in group:
                raise NH2STError(f"{self.path}: sample {sample_id} has no array {name!r}")
            out[name] = np.asarray(group[name][...])
        return out

    def thumbnail(self, sample_id: str) -> tuple[np.ndarray, float] | None:
        """(thumbnail image, thumbnail px per level-0 px) if extraction stored one."""
        self._require(sample_id)
        group = self._samples_group()[sample_id]
        if "thumbnail" not in group:
            return None
        return np.asarray(group["thumbnail"][...]), float(group["thumbnail"].attrs["thumbnail_scale"])

    # ---- writing -------------------------------------------------------------------------------
    def begin_sample(self, sample_id: str, n_spots: int, info: dict | None = None) -> "SampleWriter":
        """Start (or restart) a sample: any previous group of that id is deleted first."""
        if self._lock_file is None:
            raise RuntimeError("begin_sample needs a store opened with EmbeddingStore.open_for_writing")
        samples = self._samples_group()
        if sample_id in samples:
            del samples[sample_id]
        group = samples.create_group(sample_id)
        group.attrs.update({"complete": False, "n_spots": int(n_spots), **(info or {})})
        return SampleWriter(self, group, n_spots)


class SampleWriter:
    """Writes one sample's arrays; features arrive in batches and are written in whole chunks."""

    def __init__(self, store: EmbeddingStore, group: zarr.Group, n_spots: int):
        self.store, self.group, self.n_spots = store, group, n_spots
        c, h, w = store.meta.feature_shape
        chunk = min(FEATURE_CHUNK_SPOTS, max(n_spots, 1))
        # write_empty_chunks: feature chunks are never all zero, so skip zarr's scan for it (~30 % of a write)
        self.features = group.create_array("features", shape=(n_spots, c, h, w), chunks=(chunk, c, h, w),
                                           dtype="float16", compressors=COMPRESSOR,
                                           config={"write_empty_chunks": True})
        self.pooled = group.create_array("pooled", shape=(n_spots, c), chunks=(chunk, c), dtype="float32",
                                         compressors=COMPRESSOR, config={"write_empty_chunks": True})
        self._chunk = chunk
        self._pending_maps: list[np.ndarray] = []
        self._pending_pooled: list[np.ndarray] = []
        self._written = 0  # spots flushed to disk
        self._buffered = 0

    def write_features(self, maps: np.ndarray, pooled: np.ndarray) -> None:
        """Append a batch (B, 512, 7, 7) maps and (B, 512) pooled vectors, in spot order."""
        if len(maps) != len(pooled):
            raise ValueError("maps and pooled must have the same number of rows")
        self._pending_maps.append(np.asarray(maps, dtype=np.float16))
        self._pending_pooled.append(np.asarray(pooled, dtype=np.float32))
        self._buffered += len(maps)
        if self._written + self._buffered > self.n_spots:
            raise ValueError(f"more feature rows than the sample's {self.n_spots} spots")
        if self._buffered >= self._chunk:
            self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self._buffered:
            return
        # one pending batch (the extract loop joins its batches) is written as it is, not copied
        maps = self._pending_maps[0] if len(self._pending_maps) == 1 else np.concatenate(self._pending_maps)
        pooled = self._pending_pooled[0] if len(self._pending_pooled) == 1 else np.concatenate(self._pending_pooled)
        take = (len(maps) // self._chunk) * self._chunk if whole_chunks_only else len(maps)
        if take:
            sl = slice(self._written, self._written + take)
            self.features[sl] = maps[:take]
            self.pooled[sl] = pooled[:take]
            self._written += take
        self._pending_maps, self._pending_pooled = [maps[take:]], [pooled[take:]]
        self._buffered = len(maps) - take

    def write_array(self, name: str, values: np.ndarray, chunks=None) -> None:
        """Write a whole per-spot (or auxiliary) array: counts, targets, pixel_xy, grid_xy, barcodes, ..."""
        values = np.asarray(values)
        if values.dtype.kind in "UO":
            array = self.group.create_array(name, shape=values.shape, dtype=str)
        else:
            array = self.group.create_array(name, shape=values.shape, chunks=chunks or values.shape or (1,),
                                            dtype=values.dtype, compressors=COMPRESSOR)
        array[...] = values
        return array

    def write_thumbnail(self, image: np.ndarray, scale: float) -> None:
        array = self.write_array("thumbnail", np.asarray(image, dtype=np.uint8))
        array.attrs["thumbnail_scale"] = float(scale)

    def commit(self) -> None:
        """Mark the sample complete; refuses if any array is missing or features are short."""
        self._flush(whole_chunks_only=False)
        if self._written != self.n_spots:
            raise RuntimeError(f"sample {self.group.basename}: {self._written} of {self.n_spots} feature rows written")
        missing = [name for name in SAMPLE_ARRAYS if name not in self.group]
        if missing:
            raise RuntimeError(f"sample {self.group.basename}: arrays not written: {', '.join(missing)}")
        for name in SAMPLE_ARRAYS:
            if self.group[name].shape[0] != self.n_spots:
                raise RuntimeError(f"sample {self.group.basename}: {name} has {self.group[name].shape[0]} "
                                   f"rows, expected {self.n_spots}")
        self.group.attrs.update({"complete": True, "completed_at": time.time()})


def load_spots(store: EmbeddingStore, sample_ids: list[str],
               fields=("features", "targets", "neighbors")) -> dict[str, np.ndarray]:
    """Concatenate `fields` of `sample_ids` (in that order) into one spot table.

    ``neighbors`` is re-indexed into the concatenation, so it can index the other arrays directly;
    ``sample_index`` (N,) int32 gives each spot's position in `sample_ids`.
    """
    if not sample_ids:
        raise NH2STError("no samples to load")
    sizes = [store.n_spots(s) for s in sample_ids]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    out: dict[str, np.ndarray] = {}
    for i, sample_id in enumerate(sample_ids):
        part = store.read_sample(sample_id, fields)
        sl = slice(int(offsets[i]), int(offsets[i + 1]))
        for name, values in part.items():
            if name not in out:
                out[name] = np.empty((total, *values.shape[1:]), dtype=values.dtype)
            out[name][sl] = values + offsets[i] if name == "neighbors" else values
    out["sample_index"] = np.repeat(np.arange(len(sample_ids), dtype=np.int32), sizes)
    return out
