"""The Zarr v3 embedding store: the contract between stage one (extract) and stage two (train).

Layout (see docs/store.md for the full schema)::

    <name>.zarr/
      zarr.json                 root attributes: {"nh2st": StoreMeta as a dict}; written last, in one
                                atomic write: the store exists once this file holds that attribute
      extract.json              summary of the last `nh2st extract` run
      .lock                     store lock: shared while a writer checks the store, exclusive while
                                one creates, repairs or rebuilds (--overwrite) it; held for moments
      .claims/<sample id>       per-sample write claim: an exclusive flock held while writing it
      .trash/                   samples and stores being deleted (renamed here first, then removed)
      samples/<sample id>/      one group per sample, attrs {"complete": bool, ...}
        features   (N, 512, 7, 7) float16   chunked along spots, Zstd level 1
        views      (N, V-1, 512, 7, 7) float16  stores made with --views V > 1 only: the maps of the
                                            spot's patch in dihedral views 1..V-1 (nh2st.views)
        pooled     (N, 512)       float32
        counts     (N, G)         float32   raw counts of the store's genes
        targets    (N, G)         float32   normalised, log10, grid-smoothed (nh2st.expression)
        pixel_xy   (N, 2)         float64   level-0 pixel centres (x = column, y = row)
        grid_xy    (N, 2)         int64
        barcodes   (N,)           str
        neighbors  (N, k)         int32     k nearest spots within the sample, self first
        thumbnail  (h, w, 3)      uint8     optional slide thumbnail; attrs["thumbnail_scale"]

Several writers (processes, GPUs, machines on a shared filesystem) may fill one store at once: a
writer claims a sample before writing it, so two never write the same sample, and the kernel
drops a claim when its process dies, so the next writer takes it over and redoes the sample.
A sample is complete only once its group's ``complete`` attribute is True, which the writer sets
after every array is written; anything else under ``samples/`` is a half-written sample that the
next writer to claim it deletes and redoes. A kill at any instant leaves a folder that readers
either read or refuse with an NH2STError, and that the next writer opens and repairs.
"""

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from nh2st import __version__, now
from nh2st.errors import NH2STError
from nh2st.paper import NEIGHBORS_K, PATCH_SIZE

FORMAT_VERSION = 1
FEATURE_CHUNK_SPOTS = 128
# Zstd level 1: on ResNet maps as small as Blosc zstd-3 + shuffle (ratio 1.55 vs 1.53) at ~2.5x its
# speed per core (benchmarks/extract.py --encoder null prints the comparison); a standard zarr v3 codec.
COMPRESSOR = ZstdCodec(level=1)

SAMPLE_ARRAYS = ("features", "pooled", "counts", "targets", "pixel_xy", "grid_xy", "barcodes", "neighbors")

SUMMARY_FILE = "extract.json"
STORE_LOCK = ".lock"
CLAIMS_DIR = ".claims"
TRASH_DIR = ".trash"
# What nh2st itself puts in a store folder. A folder holding nothing else and no committed root
# is a store whose creation or rebuild was interrupted; the next writer finishes it.
_OWN_ENTRIES = {"zarr.json", "samples", SUMMARY_FILE}


@dataclass(frozen=True)
class StoreMeta:
    """Root attributes: what produced the store. Two stores are compatible iff identity() matches."""

    dataset: str
    genes: tuple[str, ...]
    backbone: str
    weights: str
    weights_sha256: str
    patch_size: int = PATCH_SIZE
    feature_shape: tuple[int, int, int] = (512, 7, 7)
    neighbors_k: int = NEIGHBORS_K
    normalisation: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    gene_selection: dict = field(default_factory=dict)   # how `genes` were chosen (spec, how); not identity
    views: int = 1          # dihedral views encoded per patch (nh2st.views); >1 adds the `views` array

    def __post_init__(self):
        object.__setattr__(self, "genes", tuple(self.genes))
        object.__setattr__(self, "feature_shape", tuple(self.feature_shape))

    def identity(self) -> dict:
        """The fields that must match for features of two runs to be mixed in one store."""
        d = self.to_dict()
        d.pop("weights")  # a path; the checksum is what identifies the weights
        d.pop("gene_selection")  # the genes themselves are the identity
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


# ---- the folder's state ---------------------------------------------------------------------------
def _group_attributes(folder: Path) -> dict | None:
    """The attributes in a Zarr v3 group's zarr.json; None if absent, unreadable or not a group."""
    try:
        doc = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        return None
    attributes = doc.get("attributes") or {}
    return attributes if isinstance(attributes, dict) else None


def _is_own_entry(name: str) -> bool:
    # hidden names are the lock, claims, trash and temporary files of atomic writes
    return name in _OWN_ENTRIES or name.startswith(".") or name.endswith(".partial")


def store_state(path) -> str:
    """What `path` holds: 'missing' (nothing, or an empty folder), 'store' (a committed nh2st store),
    'unfinished' (nh2st's own files without a committed root: creation or --overwrite was
    interrupted) or 'foreign' (anything else, which nh2st never writes into)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "foreign"
    attributes = _group_attributes(path)
    if attributes is not None and isinstance(attributes.get("nh2st"), dict):
        return "store"
    names = [entry.name for entry in path.iterdir()]
    if not names:
        return "missing"
    return "unfinished" if all(_is_own_entry(n) for n in names) else "foreign"


@contextmanager
def _store_lock(path: Path, exclusive: bool):
    """The store's `.lock`, shared or exclusive, for the moments a writer checks or changes the root."""
    # One descriptor of .lock per process at a time: where flock is emulated with POSIX locks (NFS),
    # closing any descriptor of the file drops every lock the process holds on it.
    with _PROCESS_STORE_LOCK, open(path / STORE_LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_PROCESS_STORE_LOCK = threading.Lock()


def _to_trash(store_path: Path, entry: Path) -> None:
    """Delete `entry` atomically in effect: one rename takes it out of the store, then it is removed."""
    trash = store_path / TRASH_DIR
    trash.mkdir(exist_ok=True)
    target = trash / f"{entry.name}.{uuid.uuid4().hex}"
    os.rename(entry, target)
    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def _empty_trash(store_path: Path) -> None:
    """Remove what killed writers left in .trash (nothing in it is read; racing removers are harmless)."""
    trash = store_path / TRASH_DIR
    if trash.is_dir():
        for entry in trash.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# ---- per-sample claims ----------------------------------------------------------------------------
def _check_sample_id(sample_id: str) -> None:
    if not sample_id or "/" in sample_id or "\\" in sample_id or sample_id.startswith("."):
        raise NH2STError(f"sample id {sample_id!r}: not usable as a store group name "
                         "(no slashes, not empty, not starting with '.'); rename the sample")


# Claims held by this process, by (claims folder, sample id): threads of one process coordinate here,
# because flock (and its POSIX emulation on NFS) does not keep two threads of a process apart.
_HELD: dict[tuple[str, str], "Claim | None"] = {}
_HELD_LOCK = threading.Lock()


class Claim:
    """One held per-sample claim; `release()` (or leaving a `with` block) gives it back."""

    def __init__(self, key: tuple[str, str], path: Path, fh):
        self._key, self.path, self._fh = key, path, fh
        self.sample_id = key[1]

    @property
    def held(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is None:
            return
        # unlink while still locked: a writer waiting on this inode then sees it is gone and retries
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
        with _HELD_LOCK:
            _HELD.pop(self._key, None)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class SampleClaims:
    """The write claims of one store folder: `.claims/<sample id>`, an exclusive flock each.

    Whoever holds a sample's claim is the only writer of that sample. The kernel drops a claim
    when its process dies (on NFS, when the client's lease runs out), so a dead writer's sample
    is free for the next writer, which redoes it.
    """

    def __init__(self, store_path):
        self.store_path = Path(store_path)
        self.dir = self.store_path / CLAIMS_DIR

    def _key(self, sample_id: str) -> tuple[str, str]:
        return os.path.realpath(self.dir), sample_id

    def held(self, sample_id: str) -> Claim | None:
        """This process's claim on `sample_id`, if it holds one."""
        with _HELD_LOCK:
            return _HELD.get(self._key(sample_id))

    def try_claim(self, sample_id: str) -> Claim | None:
        """Claim `sample_id` now, or None if another writer (process or thread) holds it."""
        _check_sample_id(sample_id)
        key = self._key(sample_id)
        with _HELD_LOCK:
            if key in _HELD:
                return None
            _HELD[key] = None  # reserved for this thread
        try:
            fh = self._lock(self.dir / sample_id)
        except BaseException:
            with _HELD_LOCK:
                _HELD.pop(key, None)
            raise
        if fh is None:
            with _HELD_LOCK:
                _HELD.pop(key, None)
            return None
        fh.seek(0)
        fh.truncate()
        fh.write(_holder_text() + "\n")
        fh.flush()
        claim = Claim(key, self.dir / sample_id, fh)
        with _HELD_LOCK:
            _HELD[key] = claim
        return claim

    def _lock(self, path: Path):
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                someone = fh.read().strip()
                fh.close()
                if someone:
                    return None
                time.sleep(0.01)  # a holder between locking and naming itself, or a holder() probe
                continue
            try:  # the holder may have released (and unlinked) the file between our open and lock
                if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                    return fh
            except FileNotFoundError:
                pass
            fh.close()
        return None

    def claim(self, sample_id: str, poll: float = 0.5, on_wait=None) -> Claim:
        """Claim `sample_id`, waiting while another writer holds it (`on_wait(holder)` once)."""
        waited = False
        while True:
            claim = self.try_claim(sample_id)
            if claim is not None:
                return claim
            if not waited and on_wait is not None:
                on_wait(self.holder(sample_id) or "another writer")
            waited = True
            time.sleep(poll)

    def holder(self, sample_id: str) -> str | None:
        """Who holds `sample_id`'s claim ("pid N on host"), or None if nobody does."""
        own = self.held(sample_id)
        if own is not None:
            return _holder_text()
        try:
            fd = os.open(self.dir / sample_id, os.O_RDONLY)  # a probe never creates a claim file
        except (FileNotFoundError, NotADirectoryError):
            return None
        with os.fdopen(fd) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip() or "another writer"
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None

    def holders(self) -> dict[str, str]:
        """{sample id: holder} for every sample another writer holds now."""
        if not self.dir.is_dir():
            return {}
        out = {}
        for entry in sorted(self.dir.iterdir()):
            if self.held(entry.name) is None:
                who = self.holder(entry.name)
                if who is not None:
                    out[entry.name] = who
        return out


# ---- the store ------------------------------------------------------------------------------------
class EmbeddingStore:
    """A feature store on disk. Open read-only with :meth:`open`; write with :meth:`open_for_writing`."""

    def __init__(self, path: Path, root: zarr.Group, meta: StoreMeta, writable: bool = False):
        self.path = path
        self.root = root
        self.meta = meta
        self.claims = SampleClaims(path)
        self._writable = writable
        self._own_claims: list[Claim] = []  # taken by begin_sample for callers that did not claim

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path) -> "EmbeddingStore":
        """Open an existing store for reading."""
        path = Path(path)
        state = store_state(path)
        if state == "unfinished" and not (path / "zarr.json").is_file():
            raise NH2STError(f"{path}: creating or rebuilding this store was interrupted; run `nh2st extract` "
                             "again to finish it")
        if state != "store":
            if (path / "zarr.json").is_file():
                raise NH2STError(f"{path}: a Zarr group but not an nh2st store (no 'nh2st' root attribute); "
                                 "if nh2st was building it, `nh2st extract` (with --overwrite) rebuilds it")
            raise NH2STError(f"{path}: not an nh2st store (no zarr.json); build one with `nh2st extract`")
        root = zarr.open_group(str(path), mode="r")
        meta = StoreMeta.from_dict(_group_attributes(path)["nh2st"])
        if meta.format_version != FORMAT_VERSION:
            raise NH2STError(f"{path}: store format version {meta.format_version}, this nh2st reads "
                             f"{FORMAT_VERSION}; re-run `nh2st extract --overwrite`")
        return cls(path, root, meta)

    @classmethod
    @contextmanager
    def open_for_writing(cls, path, meta: StoreMeta, overwrite: bool = False):
        """A writer's handle: create the store, or check that it matches `meta`, and yield it.

        A store written with different identity fields (genes, weights checksum, patch size, ...)
        is refused unless `overwrite`, which empties it first (refused while another writer holds
        a claim on it). Several writers may hold handles at once; each sample is written by whoever
        claims it (`SampleClaims`, or `begin_sample` claims it). Claims taken by `begin_sample` are
        released on leaving the block.
        """
        path = Path(path)
        if store_state(path) == "foreign":
            raise NH2STError(f"{path}: exists and is not an nh2st store; choose another --store")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NH2STError(f"{path}: cannot create the store folder ({exc.strerror}); "
                             "choose another --store") from None
        with _store_lock(path, exclusive=True):
            cls._create_or_check(path, meta, overwrite)
        _empty_trash(path)
        store = cls(path, zarr.open_group(str(path), mode="r+"), meta, writable=True)
        try:
            yield store
        finally:
            for claim in store._own_claims:
                claim.release()

    @classmethod
    def _create_or_check(cls, path: Path, meta: StoreMeta, overwrite: bool) -> None:
        """Under the exclusive store lock: leave `path` a committed store with `meta`'s identity."""
        state = store_state(path)
        if state == "foreign":
            raise NH2STError(f"{path}: folder exists and is not an nh2st store; choose another --store")
        if state == "store" and not overwrite:
            cls.open(path).check_identity(meta)
            if not (path / "samples" / "zarr.json").is_file():  # a kill inside older nh2st's creation
                zarr.create_group(str(path / "samples"))
            return
        if state == "store":  # and overwrite
            cls._clear(path)
        elif state == "unfinished":
            # Nobody writes into an unfinished store (begin_sample checks the root under the store
            # lock, and a store is only emptied while no claim is held), so its claims are writers
            # that claimed first and wait for it to exist: clear it under them.
            cls._clear(path, refuse_if_claimed=False)
        # The root's zarr.json, written in one atomic write with its nh2st attribute, comes last:
        # until it exists the folder is 'unfinished', which the next writer clears and redoes.
        zarr.create_group(str(path / "samples"))
        zarr.create_group(str(path), attributes={"nh2st": {
            **meta.to_dict(), "created_by": f"nh2st {__version__}",
            "created_at": now()}})

    @classmethod
    def _clear(cls, path: Path, refuse_if_claimed: bool = True) -> None:
        """Under the exclusive store lock: empty a store for a rebuild, atomically in effect."""
        busy = SampleClaims(path).holders() if refuse_if_claimed else {}
        if busy:
            sid, who = next(iter(busy.items()))
            raise NH2STError(f"{path}: store is being written by {who} (sample {sid}); wait for it to finish "
                             "or write to another --store")
        # Removing the committed root first makes every later state 'unfinished', never a store
        # with a part of its samples gone.
        (path / "zarr.json").unlink(missing_ok=True)
        for entry in sorted(path.iterdir()):
            if not entry.name.startswith("."):
                _to_trash(path, entry)

    @classmethod
    def clear(cls, path) -> None:
        """Empty the store at `path` for a rebuild (what --overwrite does before the first writer
        creates it again); refused while another writer holds a claim. Nothing there: nothing done."""
        path = Path(path)
        state = store_state(path)
        if state == "foreign":
            raise NH2STError(f"{path}: folder exists and is not an nh2st store; choose another --store")
        if state == "missing":
            return
        with _store_lock(path, exclusive=True):
            cls._clear(path)
        _empty_trash(path)

    def check_identity(self, meta: StoreMeta) -> None:
        """NH2STError unless features made as `meta` says may join this store's."""
        existing, wanted = self.meta.identity(), meta.identity()
        differ = [k for k in wanted if wanted[k] != existing.get(k)]
        if differ:
            raise NH2STError(f"{self.path}: store was made with other {', '.join(differ)}; "
                             "pass --overwrite to rebuild it, or choose another --store")

    # ---- reading -------------------------------------------------------------------------------
    def _samples_group(self) -> zarr.Group:
        return self.root["samples"]

    def sample_attrs(self, sample_id: str) -> dict:
        """The group attributes of any sample, complete or half-written ({} if unreadable)."""
        return _group_attributes(self.path / "samples" / sample_id) or {}

    def all_sample_ids(self) -> list[str]:
        """Every sample folder, complete or not."""
        samples = self.path / "samples"
        if not samples.is_dir():
            return []
        return sorted(e.name for e in samples.iterdir() if e.is_dir() and not e.name.startswith("."))

    def sample_ids(self) -> list[str]:
        """Complete samples only, sorted."""
        return [s for s in self.all_sample_ids() if self.is_complete(s)]

    def is_complete(self, sample_id: str) -> bool:
        return bool(self.sample_attrs(sample_id).get("complete", False))

    def sample_info(self, sample_id: str) -> dict:
        """The attributes of a complete sample (n_spots, source, completed_at, meta, ...)."""
        self._require(sample_id)
        return self.sample_attrs(sample_id)

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
        """Start (or restart) a sample: any previous folder of that id is deleted first.

        The caller should hold the sample's claim (`store.claims.try_claim`); if it does not,
        the claim is taken here (NH2STError if another writer holds it) and released by commit.
        """
        if not self._writable:
            raise RuntimeError("begin_sample needs a store opened with EmbeddingStore.open_for_writing")
        _check_sample_id(sample_id)
        claim, taken_here = self.claims.held(sample_id), None
        if claim is None:
            claim = taken_here = self.claims.try_claim(sample_id)
            if claim is None:
                raise NH2STError(f"{self.path}: sample {sample_id} is being written by "
                                 f"{self.claims.holder(sample_id) or 'another writer'}; wait for it to finish "
                                 "or write to another --store")
            self._own_claims.append(claim)
        with _store_lock(self.path, exclusive=False):
            self._check_root_unchanged()
        folder = self.path / "samples" / sample_id
        if os.path.lexists(folder):
            _to_trash(self.path, folder)
        # created as a store of its own, so zarr writes no parent metadata on the way
        group = zarr.create_group(str(folder), attributes={"complete": False, "n_spots": int(n_spots),
                                                           **(info or {})})
        return SampleWriter(self, group, n_spots, sample_id=sample_id, release=taken_here)

    def _check_root_unchanged(self) -> None:
        """A writer that claimed a sample checks that nobody rebuilt the store under it since it opened."""
        attributes = _group_attributes(self.path) or {}
        current = attributes.get("nh2st")
        if not isinstance(current, dict) or StoreMeta.from_dict(current).identity() != self.meta.identity():
            raise NH2STError(f"{self.path}: the store was rebuilt or removed by another writer (--overwrite) "
                             "while this one was writing; run `nh2st extract` again")


class SampleWriter:
    """Writes one sample's arrays; features arrive in batches and are written in whole chunks."""

    def __init__(self, store: EmbeddingStore, group: zarr.Group, n_spots: int, sample_id: str = "",
                 release: Claim | None = None):
        self.store, self.group, self.n_spots, self.sample_id = store, group, n_spots, sample_id
        self._release = release  # the claim begin_sample took for this sample, given back by commit
        c, h, w = store.meta.feature_shape
        chunk = min(FEATURE_CHUNK_SPOTS, max(n_spots, 1))
        # write_empty_chunks: feature chunks are never all zero, so skip zarr's scan for it (~30 % of a write)
        self.features = group.create_array("features", shape=(n_spots, c, h, w), chunks=(chunk, c, h, w),
                                           dtype="float16", compressors=COMPRESSOR,
                                           config={"write_empty_chunks": True})
        self.pooled = group.create_array("pooled", shape=(n_spots, c), chunks=(chunk, c), dtype="float32",
                                         compressors=COMPRESSOR, config={"write_empty_chunks": True})
        self.views = None
        if store.meta.views > 1:
            others = store.meta.views - 1
            # at most a features chunk's maps per chunk, and whole chunks per features chunk
            spots = next(d for d in range(max(1, chunk // others), 0, -1) if chunk % d == 0)
            self.views = group.create_array(
                "views", shape=(n_spots, others, c, h, w), chunks=(spots, others, c, h, w),
                dtype="float16", compressors=COMPRESSOR, config={"write_empty_chunks": True})
        self._chunk = chunk
        self._pending_maps: list[np.ndarray] = []
        self._pending_pooled: list[np.ndarray] = []
        self._pending_views: list[np.ndarray] = []
        self._written = 0  # spots flushed to disk
        self._buffered = 0

    def write_features(self, maps: np.ndarray, pooled: np.ndarray, views: np.ndarray | None = None) -> None:
        """Append a batch (B, 512, 7, 7) maps and (B, 512) pooled vectors, in spot order; a store
        with V > 1 views also takes the other views' maps, (B, V-1, 512, 7, 7)."""
        if len(maps) != len(pooled):
            raise ValueError("maps and pooled must have the same number of rows")
        if (views is None) != (self.views is None) or (views is not None and (
                len(views) != len(maps) or views.shape[1:] != self.views.shape[1:])):
            expected = "no views" if self.views is None else f"views of shape (B, {', '.join(map(str, self.views.shape[1:]))})"
            raise ValueError(f"sample {self.sample_id}: the store holds {expected}")
        self._pending_maps.append(np.asarray(maps, dtype=np.float16))
        self._pending_pooled.append(np.asarray(pooled, dtype=np.float32))
        if views is not None:
            self._pending_views.append(np.asarray(views, dtype=np.float16))
        self._buffered += len(maps)
        if self._written + self._buffered > self.n_spots:
            raise ValueError(f"more feature rows than the sample's {self.n_spots} spots")
        if self._buffered >= self._chunk:
            self._flush(whole_chunks_only=True)

    def _flush(self, whole_chunks_only: bool) -> None:
        if not self._buffered:
            return
        # one pending batch (the extract loop joins its batches) is written as it is, not copied
        def joined(pending: list[np.ndarray]) -> np.ndarray:
            return pending[0] if len(pending) == 1 else np.concatenate(pending)

        maps, pooled = joined(self._pending_maps), joined(self._pending_pooled)
        views = joined(self._pending_views) if self.views is not None else None
        take = (len(maps) // self._chunk) * self._chunk if whole_chunks_only else len(maps)
        if take:
            sl = slice(self._written, self._written + take)
            self.features[sl] = maps[:take]
            self.pooled[sl] = pooled[:take]
            if views is not None:
                self.views[sl] = views[:take]
            self._written += take
        self._pending_maps, self._pending_pooled = [maps[take:]], [pooled[take:]]
        self._pending_views = [views[take:]] if views is not None else []
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
            raise RuntimeError(f"sample {self.sample_id}: {self._written} of {self.n_spots} feature rows written")
        required = SAMPLE_ARRAYS + (("views",) if self.views is not None else ())
        missing = [name for name in required if name not in self.group]
        if missing:
            raise RuntimeError(f"sample {self.sample_id}: arrays not written: {', '.join(missing)}")
        for name in required:
            if self.group[name].shape[0] != self.n_spots:
                raise RuntimeError(f"sample {self.sample_id}: {name} has {self.group[name].shape[0]} "
                                   f"rows, expected {self.n_spots}")
        self.group.attrs.update({"complete": True, "completed_at": time.time()})
        if self._release is not None:
            self._release.release()


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
