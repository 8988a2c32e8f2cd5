"""Lazy whole-slide access and 224-px patch cropping.

`open_slide(path)` looks at the file's first bytes, not its name:

- TIFF (classic or BigTIFF, tiled or stripped, pyramidal or not) -> :class:`TiffSlide`. Only the
  tiles a request touches are read (``os.pread``) and decoded (libjpeg-turbo through imagecodecs
  for JPEG tiles, tifffile's per-page decoder otherwise), each once while it stays in an LRU cache
  of decoded tiles shared by all threads; the slide is never held whole in memory. A batch of crops
  is planned and assembled by :mod:`nh2st.patches` with no per-crop Python; on a GPU the JPEG
  tiles can be decoded there (:meth:`Slide.crop_batch_on`). Pyramid levels (SubIFDs or
  reduced-resolution pages) serve :meth:`Slide.thumbnail`.
- A scanner's TIFF flavour (Aperio .svs, Hamamatsu .ndpi, Leica .scn, Ventana .bif, Philips TIFF),
  recognised by tifffile from the file's tags -> :class:`ScannerSlide`, read through tiffslide,
  which knows each vendor's level layout and where its microns per pixel are written.
- JPEG / PNG -> :class:`ImageSlide`, decoded whole with PIL. These are the small images of the
  legacy datasets (STNet, Skin, STimage-1K4M); a large slide should be a pyramidal TIFF.
- MIRAX .mrxs (a folder of proprietary files) is not read: tiffslide does not support it.

Patches cover the paper's field of view: 224 px at ~0.5 µm/px (112 µm). :func:`at_paper_resolution`
wraps a slide whose level-0 resolution differs from that by more than MPP_TOLERANCE in a
:class:`RescaledSlide`, which crops the equivalent field (224 * 0.5 / mpp px) and resizes it to 224.

Coordinates are level-0 pixels, x = column, y = row. Anything outside the image reads as white
(255), so a spot at or beyond the border gives a padded patch, never an error.
"""

import logging
import math
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nh2st.atomic import atomic_write
from nh2st.errors import NH2STError
from nh2st.patches import (JPEG_COMPRESSION, WHITE, DeviceJpegTiles, TileGrid, assemble_on_host,
                           plan_regions)
from nh2st.devices import cpu_count
from nh2st.paper import PAPER_MPP, PATCH_SIZE
from nh2st.stages import stage

log = logging.getLogger(__name__)

THUMBNAIL_SIZE = 1024    # long edge of the overview image extraction stores for plots
# Decoded tiles kept per slide: a few rows of 256-px tiles across a Visium capture area, so the
# crops of neighbouring spots decode each tile once (constant in slide size: RSS stays flat).
DEFAULT_CACHE_BYTES = 128 << 20
# Mean |difference| in levels between the GPU and the CPU decoding of a probe tile above which the
# GPU decoder is not trusted with a slide (IDCT/upsampling differences stay far below it; a wrong
# colour space is far above).
JPEG_MEAN_TOLERANCE = 2.0

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# tifffile's TiffFile.is_<flavour> flags of the scanner formats tiffslide reads
SCANNER_FLAVOURS = ("svs", "ndpi", "scn", "bif", "philips")

MPP_TOLERANCE = 0.10   # relative; within it a slide is cropped natively, as the paper does


class Slide:
    """A lazily read RGB slide: level-0 regions, 224-px crops and a pyramid thumbnail.

    Subclasses provide `level_shapes` ((width, height) per level, level 0 first, then smaller)
    and `_read_level(level, x0, y0, w, h)`; everything else is shared. Every crop goes through
    :meth:`read_regions`, whose generic form reads region by region; a subclass with a faster
    batched read (TiffSlide) overrides it, and one that can decode on a GPU overrides
    :meth:`decodes_on` and :meth:`crop_batch_on`.
    """

    path: Path
    width: int
    height: int
    mpp: float | None
    level_shapes: list[tuple[int, int]]

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 level-0 pixels of rows y0..y0+h-1, columns x0..x0+w-1; white outside."""
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}x{h}")
        return self._read_level(0, int(x0), int(y0), int(w), int(h))

    def read_regions(self, origins: np.ndarray, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """(B, 2) int level-0 top-left corners (x, y) -> (B, h, w, 3) uint8 regions; white outside.

        `out`: a C-contiguous (B, h, w, 3) uint8 buffer to fill (e.g. pinned memory). This generic
        form reads region by region.
        """
        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        if out is None:
            out = np.empty((len(origins), h, w, 3), dtype=np.uint8)
        for i, (x0, y0) in enumerate(origins.tolist()):
            out[i] = self._read_level(0, x0, y0, w, h)
        return out

    def crop_origins(self, centres: np.ndarray, size: int) -> np.ndarray:
        """(B, 2) spot centres -> (B, 2) int64 top-left corners of their size x size patches."""
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        bad = ~np.isfinite(centres).all(axis=1)
        if bad.any():
            cx, cy = centres[np.argmax(bad)]
            raise NH2STError(f"{self.path}: spot centre ({cx}, {cy}) is not a finite pixel coordinate")
        return np.floor(centres).astype(np.int64) - size // 2

    def crop_batch(self, centres: np.ndarray, size: int = PATCH_SIZE, out: np.ndarray | None = None) -> np.ndarray:
        """(B, 2) spot centres (x, y) -> (B, size, size, 3) uint8 patches, each as :meth:`crop` cuts it."""
        return self.read_regions(self.crop_origins(centres, size), size, size, out)

    def crop(self, cx: float, cy: float, size: int = PATCH_SIZE) -> np.ndarray:
        """(size, size, 3) uint8 patch centred on (floor(cx), floor(cy)).

        Rows floor(cy) - size//2 .. floor(cy) + size - size//2 - 1 (for 224: -112 .. +111), columns
        likewise; white where the patch leaves the slide.
        """
        return self.crop_batch(np.array([[cx, cy]], dtype=np.float64), size)[0]

    def decodes_on(self, device) -> bool:
        """Whether :meth:`crop_batch_on` decodes this slide's pixels on `device` (a torch device)."""
        return False

    def crop_batch_on(self, device, centres: np.ndarray, size: int = PATCH_SIZE):
        """(B, 2) centres -> (B, size, size, 3) uint8 torch tensor on `device`.

        Generic form: cropped on the host, then copied. Slides that can decode on the device
        (:meth:`decodes_on`) build the patches there.
        """
        import torch

        return torch.from_numpy(self.crop_batch(centres, size)).to(device)

    def thumbnail(self, max_size: int = THUMBNAIL_SIZE) -> tuple[np.ndarray, float]:
        """(image, scale): the whole slide with its long edge <= max_size; scale = thumb px per level-0 px.

        Reads the smallest pyramid level that is still at least the thumbnail's size, in bands of
        rows, so level 0 of a large slide is never decoded whole.
        """
        from PIL import Image

        tw, th, level = self._thumbnail_geometry(max_size)
        lw, lh = self.level_shapes[level]
        sy = lh / th
        band = max(1, int(512 / sy))  # ~512 source rows per band keeps memory flat
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for t0 in range(0, th, band):
            t1 = min(th, t0 + band)
            r0, r1 = math.floor(t0 * sy), min(lh, math.ceil(t1 * sy))
            rows = Image.fromarray(self._read_level(level, 0, r0, lw, r1 - r0))
            resized = rows.resize((tw, t1 - t0), Image.Resampling.BOX, box=(0, t0 * sy - r0, lw, t1 * sy - r0))
            out[t0:t1] = np.asarray(resized)
        return out, tw / self.width

    def _thumbnail_geometry(self, max_size: int) -> tuple[int, int, int]:
        """(width, height) of the thumbnail and the pyramid level it is read from."""
        scale = min(1.0, max_size / max(self.width, self.height))
        tw, th = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        level = max(i for i, (lw, lh) in enumerate(self.level_shapes) if (lw >= tw and lh >= th) or i == 0)
        return tw, th, level

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.width}x{self.height}, mpp={self.mpp})"


def _to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    """(h, w[, s]) uint8 -> (h, w, 3): grey is repeated, alpha dropped."""
    if array.dtype != np.uint8:
        raise NH2STError(f"{path}: pixels are {array.dtype}, nh2st reads 8-bit RGB slides; "
                         "convert the image to 8-bit RGB")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return array[:, :, :3]


class _TiffLevel:
    """Segment (tile or strip) geometry and decoder of one TIFF page."""

    def __init__(self, page, path: Path, index: int):
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            raise NH2STError(f"{path}: planar (separate-plane) TIFF is not supported; re-save it as contiguous RGB")
        if page.imagedepth != 1:
            raise NH2STError(f"{path}: volumetric TIFF pages are not supported; give a 2-D RGB slide")
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            self.seg_w, self.seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            self.seg_w, self.seg_h = self.width, int(min(page.rowsperstrip, self.height))
        self.n_across = -(-self.width // self.seg_w)
        self.offsets = [int(o) for o in page.dataoffsets]
        self.bytecounts = [int(b) for b in page.databytecounts]
        self.jpegtables = page.jpegtables
        self.index = index
        self.compression = int(page.compression)
        self.grid = TileGrid(self.width, self.height, self.seg_w, self.seg_h)
        self.decode = page.decode  # a pure closure; evaluated here, before any thread uses it
        self._jpeg = None
        if self.compression == JPEG_COMPRESSION and page.bitspersample == 8 and page.planarconfig == 1:
            from tifffile.tifffile import jpeg_decode_colorspace

            # what tifffile's decoder passes, without its per-call Python (see decode_segment)
            self._jpeg = jpeg_decode_colorspace(int(page.photometric), int(page.planarconfig),
                                                tuple(page.extrasamples), bool(page.is_jfif))
        self.end = max((o + b for o, b in zip(self.offsets, self.bytecounts)), default=0)

    def decode_segment(self, data: bytes, index: int) -> np.ndarray:
        """Compressed bytes of segment `index` -> its pixels (rows, cols[, samples])."""
        if self._jpeg is not None:
            import imagecodecs

            colorspace, outcolorspace = self._jpeg
            return imagecodecs.jpeg_decode(data, tables=self.jpegtables, colorspace=colorspace,
                                           outcolorspace=outcolorspace)
        segment, _, shape = self.decode(data, index, jpegtables=self.jpegtables)
        return np.asarray(segment).reshape(shape)[0]


class _TileCache:
    """Decoded tiles by key, least recently used evicted past `limit` bytes; thread-safe.

    A tile that one thread is decoding is waited for by the others, never decoded twice.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._tiles: OrderedDict = OrderedDict()
        self._bytes = 0
        self._pending: dict = {}
        self._lock = threading.Lock()
        self.decoded = 0  # tiles decoded so far (a tile evicted and needed again counts twice)

    def get_many(self, keys, decode) -> dict:
        """{key: tile} for `keys`, calling decode(key) for each one neither cached nor being decoded."""
        found, mine, theirs = {}, [], []
        with self._lock:
            for key in keys:
                tile = self._tiles.get(key)
                if tile is not None:
                    self._tiles.move_to_end(key)
                    found[key] = tile
                elif key in self._pending:
                    theirs.append((key, self._pending[key]))
                else:
                    self._pending[key] = pending = _Pending()
                    mine.append((key, pending))
        try:
            for key, pending in mine:
                pending.value = found[key] = decode(key)
                with self._lock:
                    self._store(key, pending.value)
                    del self._pending[key]
                pending.done.set()
        finally:
            for key, pending in mine:  # on an error: release the waiters, let a later read retry
                if not pending.done.is_set():
                    with self._lock:
                        self._pending.pop(key, None)
                    pending.done.set()
        for key, pending in theirs:
            pending.done.wait()
            if pending.value is None:  # its decoder failed; decode here to raise the same error
                pending.value = decode(key)
            found[key] = pending.value
        return found

    def _store(self, key, tile: np.ndarray) -> None:
        self.decoded += 1
        self._tiles[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self.limit and len(self._tiles) > 1:
            self._bytes -= self._tiles.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self._bytes = 0


class _Pending:
    __slots__ = ("done", "value")

    def __init__(self):
        self.done = threading.Event()
        self.value = None


class TiffSlide(Slide):
    """A TIFF read tile by tile.

    Thread safety: segment bytes are read with ``os.pread`` on a private descriptor (no shared
    file position), the decoders are pure functions, and the decoded-tile LRU cache is guarded by
    a lock; so `read_regions`/`crop_batch`/`crop` may be called from many threads at once. `close`
    must not race with reads.
    """

    def __init__(self, path: Path, cache_bytes: int = DEFAULT_CACHE_BYTES):
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            pages = [level.keyframe for level in series.levels]
        except NH2STError:
            raise
        except Exception as exc:  # tifffile raises many types on damaged files
            raise NH2STError(f"{self.path}: cannot read TIFF structure ({type(exc).__name__}: {exc}); "
                             "the file is corrupt or incomplete, re-download it") from None
        try:
            levels = [_TiffLevel(p, self.path, i) for i, p in enumerate(pages)]
        except NH2STError:
            self._tif.close()
            raise
        base = levels[0]
        aspect = base.width / base.height
        # keep reduced copies of level 0 only (not e.g. a label or macro image stored as another level)
        self._levels = [lv for i, lv in enumerate(levels)
                        if i == 0 or lv.width < base.width and abs(lv.width / lv.height - aspect) < 0.05]
        self.width, self.height = base.width, base.height
        self.level_shapes = [(lv.width, lv.height) for lv in self._levels]
        self.mpp = _tiff_mpp(pages[0])
        size = self.path.stat().st_size
        end = max(lv.end for lv in self._levels)
        if end > size:
            self._tif.close()
            raise NH2STError(f"{self.path}: truncated (image data runs to byte {end}, file has {size}); "
                             "the download is incomplete, re-download it")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._cache = _TileCache(cache_bytes)
        self._on_device: dict = {}  # torch device -> DeviceJpegTiles of level 0, or None
        self._device_lock = threading.Lock()

    @property
    def tiles_decoded(self) -> int:
        """Tiles decoded on the host so far (the benchmark's decode-once check)."""
        return self._cache.decoded

    def _segment(self, key: tuple[int, int]) -> np.ndarray:
        """Decoded (rows, seg_w, 3) uint8 pixels of segment `index` of `level`, key = (level, index)."""
        level, index = key
        lv = self._levels[level]
        if self._fd is None:
            raise NH2STError(f"{self.path}: slide was closed; open it again with open_slide")
        count = lv.bytecounts[index]
        if count == 0:  # sparse TIFF: a missing tile is blank
            rows = min(lv.seg_h, lv.height - (index // lv.n_across) * lv.seg_h)
            tile = np.full((rows, lv.seg_w, 3), WHITE, dtype=np.uint8)
        else:
            data = os.pread(self._fd, count, lv.offsets[index])
            if len(data) < count:
                raise NH2STError(f"{self.path}: truncated at tile {index} of level {level}; re-download the file")
            try:
                segment = lv.decode_segment(data, index)
            except Exception as exc:
                raise NH2STError(f"{self.path}: tile {index} of level {level} cannot be decoded "
                                 f"({type(exc).__name__}: {exc}); the file is corrupt, re-download it") from None
            tile = _to_rgb(segment, self.path)
        return tile

    def _read_regions(self, level: int, origins: np.ndarray, w: int, h: int, out=None) -> np.ndarray:
        lv = self._levels[level]
        with stage("plan crops"):
            plan = plan_regions(lv.grid, origins, w, h)
        with stage("read + decode tiles"):
            found = self._cache.get_many([(level, int(i)) for i in plan.tiles], self._segment)
        with stage("assemble crops"):
            return assemble_on_host(lv.grid, plan, {i: t for (_, i), t in found.items()}, out)

    def read_regions(self, origins, w, h, out=None):
        return self._read_regions(0, np.asarray(origins, dtype=np.int64).reshape(-1, 2), w, h, out)

    def _read_level(self, level, x0, y0, w, h):
        return self._read_regions(level, np.array([[x0, y0]], dtype=np.int64), w, h)[0]

    def thumbnail(self, max_size: int = THUMBNAIL_SIZE) -> tuple[np.ndarray, float]:
        # a level that fits the cache is decoded on several cores first; the bands then hit the cache
        level = self._thumbnail_geometry(max_size)[2]
        lv = self._levels[level]
        keys = [(level, i) for i in range(len(lv.offsets))]
        if 1 < len(keys) and len(keys) * lv.seg_w * lv.seg_h * 3 <= self._cache.limit // 2:
            workers = min(8, cpu_count())
            parts = [keys[i::workers] for i in range(workers)]
            with ThreadPoolExecutor(workers, thread_name_prefix="nh2st-thumbnail") as pool:
                list(pool.map(lambda part: self._cache.get_many(part, self._segment), parts))
        return super().thumbnail(max_size)

    # ---- decoding on a device (GPU) ---------------------------------------------------------------------
    def decodes_on(self, device) -> bool:
        """True if level 0 is JPEG-tiled and a probe tile decodes on `device` like on the CPU.

        Otherwise (LZW, JPEG 2000, uncompressed, an unsupported JPEG colour space, no torchvision
        decoder) crops are cut on the CPU; that is logged once per slide.
        """
        import torch

        device = torch.device(device)
        with self._device_lock:
            if device not in self._on_device:
                self._on_device[device] = self._device_tiles(device)
            return self._on_device[device] is not None

    def _device_tiles(self, device):
        lv = self._levels[0]
        reason = None
        if lv.compression != JPEG_COMPRESSION:
            reason = f"its tiles are {_compression_name(lv.compression)}-compressed, not JPEG"
        elif lv._jpeg is None or lv._jpeg[0] is not None:
            reason = "its JPEG tiles are not 8-bit YCbCr/RGB as the GPU decoder expects"
        if reason is None:
            tiles = DeviceJpegTiles(self.path, self._fd, lv.grid, lv.offsets, lv.bytecounts, lv.jpegtables,
                                    device, level=0)
            reason = self._probe(tiles)
            if reason is None:
                return tiles
        log.warning("%s: cropping on the CPU, not decoding on %s: %s", self.path, device, reason)
        return None

    def _probe(self, tiles: "DeviceJpegTiles") -> str | None:
        """Decode the first stored tile both ways; None if they agree within JPEG decoder tolerance."""
        index = next((i for i, c in enumerate(self._levels[0].bytecounts) if c), None)
        if index is None:
            return None
        try:
            on_device = tiles.decode([index])[0].cpu().numpy()
        except Exception as exc:  # no decoder for this device, or a stream it cannot read
            return f"the device decoder failed ({type(exc).__name__}: {exc})"
        reference = self._segment((0, index))
        rows = min(len(on_device), len(reference))
        diff = np.abs(on_device[:rows].astype(np.int16) - reference[:rows].astype(np.int16))
        if diff.mean() > JPEG_MEAN_TOLERANCE:
            return f"the device decodes tile {index} differently (mean difference {diff.mean():.1f} levels)"
        return None

    def crop_batch_on(self, device, centres, size=PATCH_SIZE):
        if not self.decodes_on(device):
            return super().crop_batch_on(device, centres, size)
        if self._fd is None:
            raise NH2STError(f"{self.path}: slide was closed; open it again with open_slide")
        import torch

        with stage("decode + assemble on device"):
            return self._on_device[torch.device(device)].regions(self.crop_origins(centres, size), size, size)

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
            self._tif.close()
            self._cache.clear()
            self._on_device.clear()


def _tiff_mpp(page) -> float | None:
    """µm per pixel from XResolution/ResolutionUnit (inch or cm) or an Aperio 'MPP = ' description."""
    match = re.search(r"\bMPP\s*=\s*([0-9.]+)", page.description or "")
    if match:
        return float(match.group(1))
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if not num or not den or unit not in (2, 3):
        return None
    per_unit_um = 25_400.0 if unit == 2 else 10_000.0
    mpp = per_unit_um * den / num
    return mpp if 0.01 <= mpp <= 100.0 else None  # e.g. 72 dpi defaults say nothing about the scan


class ImageSlide(Slide):
    """A JPEG or PNG decoded whole (small images of the legacy datasets). Reads are thread-safe
    because the pixels are an immutable in-memory array after opening."""

    def __init__(self, path: Path):
        from PIL import Image

        self.path = Path(path)
        limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # legacy ST images (e.g. Skin, 15872^2) exceed PIL's bomb guard
            with Image.open(self.path) as image:
                self._pixels = np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise NH2STError(f"{self.path}: cannot decode image ({type(exc).__name__}: {exc}); "
                             "the file is corrupt or incomplete, re-download it") from None
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        self.height, self.width = self._pixels.shape[:2]
        self.level_shapes = [(self.width, self.height)]
        self.mpp = None

    def read_regions(self, origins, w, h, out=None):
        # the image as one tile: the same batched assembly as a TiffSlide's
        grid = TileGrid(self.width, self.height, self.width, self.height)
        plan = plan_regions(grid, origins, w, h)
        return assemble_on_host(grid, plan, {0: self._pixels}, out)

    def _read_level(self, level, x0, y0, w, h):
        return self.read_regions(np.array([[x0, y0]], dtype=np.int64), w, h)[0]


class ScannerSlide(Slide):
    """A scanner's pyramidal TIFF (svs, ndpi, scn, bif, Philips) read through tiffslide.

    Level 0 microns per pixel come from the vendor's metadata as tiffslide parses it (None when the
    file has none). tiffslide keeps one zarr view per thread, so reads may come from many threads.
    """

    def __init__(self, path: Path):
        import tiffslide

        self.path = Path(path)
        try:
            self._slide = tiffslide.TiffSlide(self.path)
            self.level_shapes = [(int(w), int(h)) for w, h in self._slide.level_dimensions]
            self._downsamples = [float(d) for d in self._slide.level_downsamples]
            mpp = self._slide.properties.get("tiffslide.mpp-x")
        except NH2STError:
            raise
        except Exception as exc:  # tifffile/tiffslide raise many types on damaged files
            raise NH2STError(f"{self.path}: cannot read the scanner slide ({type(exc).__name__}: {exc}); "
                             "the file is corrupt or incomplete, re-download or re-export it") from None
        self.width, self.height = self.level_shapes[0]
        self.mpp = float(mpp) if mpp and 0.01 <= float(mpp) <= 100.0 else None
        self.vendor = self._slide.properties.get("tiffslide.vendor")

    def _read_level(self, level, x0, y0, w, h):
        lw, lh = self.level_shapes[level]
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lw), min(y0 + h, lh)
        if ix0 >= ix1 or iy0 >= iy1:
            return out
        if self._slide is None:
            raise NH2STError(f"{self.path}: slide was closed; open it again with open_slide")
        # tiffslide takes the location in level-0 pixels and maps it back with int(loc / downsample)
        ds = self._downsamples[level]
        location = (math.ceil(ix0 * ds), math.ceil(iy0 * ds))
        try:
            region = self._slide.read_region(location, level, (ix1 - ix0, iy1 - iy0), as_array=True, padding=False)
        except Exception as exc:
            raise NH2STError(f"{self.path}: region at ({ix0}, {iy0}) of level {level} cannot be read "
                             f"({type(exc).__name__}: {exc}); the file is corrupt, re-download it") from None
        out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = _to_rgb(np.asarray(region), self.path)
        return out

    def close(self):
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
            self._slide = None


class RescaledSlide(Slide):
    """A slide whose crops cover the paper's field of view: 224 px at `target_mpp`.

    `crop_batch(centres, size)` (and so `crop`) reads the square of round(size * target_mpp / mpp)
    level-0 pixels centred like a native crop (top-left at floor(centre) - field // 2) and resizes it to size x size
    (PIL bilinear, which averages over the source pixels when shrinking). Everything else (level-0
    regions, coordinates, thumbnails) is the wrapped slide's, so spot coordinates stay level-0 pixels.
    """

    def __init__(self, slide: Slide, mpp: float, target_mpp: float = PAPER_MPP):
        self.base = slide
        self.path, self.width, self.height = slide.path, slide.width, slide.height
        self.level_shapes = slide.level_shapes
        self.mpp = float(mpp)
        self.target_mpp = float(target_mpp)

    def field(self, size: int = PATCH_SIZE) -> int:
        """Level-0 pixels across the field a `size`-px patch covers."""
        return max(1, round(size * self.target_mpp / self.mpp))

    def _read_level(self, level, x0, y0, w, h):
        return self.base._read_level(level, x0, y0, w, h)

    def read_regions(self, origins, w, h, out=None):
        return self.base.read_regions(origins, w, h, out)

    def crop_batch(self, centres: np.ndarray, size: int = PATCH_SIZE, out: np.ndarray | None = None) -> np.ndarray:
        """Each patch is the field around its centre (read by the wrapped slide's batched reader), resized."""
        from PIL import Image

        field = self.field(size)
        regions = self.base.read_regions(self.crop_origins(centres, field), field, field)
        if field == size:
            if out is None:
                return regions
            out[...] = regions
            return out
        if out is None:
            out = np.empty((len(regions), size, size, 3), dtype=np.uint8)
        for i, region in enumerate(regions):
            out[i] = np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR))
        return out

    def thumbnail(self, max_size: int = THUMBNAIL_SIZE) -> tuple[np.ndarray, float]:
        return self.base.thumbnail(max_size)

    def close(self):
        self.base.close()

    def __repr__(self) -> str:
        return f"RescaledSlide({self.base!r}, field {self.field()} px -> {PATCH_SIZE} px)"


def at_paper_resolution(slide: Slide, mpp: float | None = None, tolerance: float = MPP_TOLERANCE,
                        target_mpp: float = PAPER_MPP) -> tuple[Slide, dict]:
    """(slide to crop from, the rule applied as a JSON-able record for the store).

    `mpp` (e.g. from --mpp or the dataset's metadata) overrides the slide's own. When level-0
    µm/px is within `tolerance` (relative) of `target_mpp` the slide is cropped natively, else it is
    wrapped in a RescaledSlide. A slide with no resolution at all is an error asking for --mpp.
    """
    used = mpp if mpp is not None else slide.mpp
    if used is None:
        raise NH2STError(f"{slide.path}: the slide records no microns per pixel, so the 224-px patch's tissue size "
                         "is unknown; pass --mpp (level-0 µm per pixel, e.g. 0.5 for a 20x scan, 0.25 for 40x)")
    if not (math.isfinite(used) and used > 0):
        raise NH2STError(f"--mpp {used}: must be a positive number of µm per pixel")
    record = {"slide_mpp": float(used), "mpp_from": "slide file" if mpp is None else "given",
              "target_mpp": target_mpp, "tolerance": tolerance, "patch_size": PATCH_SIZE}
    if abs(used / target_mpp - 1.0) <= tolerance:
        return slide, {**record, "rule": "native", "field_px": PATCH_SIZE}
    rescaled = RescaledSlide(slide, used, target_mpp)
    return rescaled, {**record, "rule": "rescaled", "field_px": rescaled.field(),
                      "field_um": round(rescaled.field() * used, 2)}


def _compression_name(code: int) -> str:
    import tifffile

    try:
        return tifffile.COMPRESSION(code).name
    except ValueError:
        return f"compression-{code}"


def open_slide(path, cache_bytes: int = DEFAULT_CACHE_BYTES) -> Slide:
    """Open a slide by its content: TIFF -> TiffSlide (lazy), JPEG/PNG -> ImageSlide."""
    path = Path(path)
    if path.suffix.lower() == ".mrxs":
        raise NH2STError(f"{path}: MIRAX (.mrxs) slides are not supported (tiffslide cannot read them); "
                         "convert it to a pyramidal TIFF, e.g. `vips tiffsave in.mrxs out.tif --tile --pyramid "
                         "--compression jpeg`, and give that")
    if not path.is_file():
        raise NH2STError(f"{path}: slide image not found")
    with open(path, "rb") as fh:
        head = fh.read(8)
    try:
        if head[:4] in _TIFF_MAGIC:
            if _scanner_flavour(path):
                return ScannerSlide(path)
            return TiffSlide(path, cache_bytes=cache_bytes)
        if head.startswith(_JPEG_MAGIC) or head.startswith(_PNG_MAGIC):
            return ImageSlide(path)
    except NH2STError:
        raise
    except Exception as exc:  # whatever the decoder throws, the user needs the file's name
        raise NH2STError(f"{path}: cannot read the image ({exc.__class__.__name__}: {exc}); "
                         "re-download or re-export it") from None
    raise NH2STError(f"{path}: not a TIFF, JPEG or PNG image (first bytes {head[:8]!r}); "
                     "give the slide as a (pyramidal) TIFF, SVS, NDPI, SCN, JPEG or PNG")


def _scanner_flavour(path: Path) -> str | None:
    """The scanner format of a TIFF ('svs', 'ndpi', ...) as tifffile recognises it, else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return next((name for name in SCANNER_FLAVOURS if getattr(tif, f"is_{name}", False)), None)
    except Exception:  # TiffSlide reports a damaged file with its own message
        return None


def pyramid_levels(image: np.ndarray, tile: int = 256) -> list[np.ndarray]:
    """Level 0 and its 2x2-mean reductions until a level fits in one tile (as pyvips does)."""
    levels = [image]
    while max(levels[-1].shape[:2]) > tile:
        a = levels[-1]
        h, w = a.shape[0] // 2, a.shape[1] // 2
        quads = a[0:2 * h:2, 0:2 * w:2].astype(np.uint16)
        quads += a[1:2 * h:2, 0:2 * w:2]
        quads += a[0:2 * h:2, 1:2 * w:2]
        quads += a[1:2 * h:2, 1:2 * w:2]
        quads += 2
        levels.append((quads >> 2).astype(np.uint8))
    return levels


def write_pyramid_tiff(path, image: np.ndarray, mpp: float | None = None, *, tile: int = 256,
                       compression: str = "jpeg", quality: int = 90, pyramid: str = "subifds",
                       jpeg_tables: bool = False) -> Path:
    """Write an (H, W, 3) uint8 image as a tiled pyramidal RGB TIFF like HEST's (pyvips) slides.

    Resolution tags in pixels per cm (10^4 / mpp). `pyramid`: "subifds" (levels as SubIFDs of
    page 0), "pages" (reduced-resolution pages after it) or "none". `compression`: "jpeg",
    "lzw", "zlib" or "none". `jpeg_tables`: JPEG tiles as abbreviated streams (YCbCr 4:2:0) that
    share the page's JPEGTables, as libtiff (pyvips, scanners) writes them; otherwise each tile is
    a complete stream. Written to a temporary file and renamed, so the path never holds a
    half-written slide.
    """
    import tifffile

    path = Path(path)
    if pyramid not in ("subifds", "pages", "none"):
        raise ValueError(f"pyramid must be 'subifds', 'pages' or 'none', not {pyramid!r}")
    if jpeg_tables and compression != "jpeg":
        raise ValueError("jpeg_tables needs compression='jpeg'")
    levels = pyramid_levels(image, tile) if pyramid != "none" else [image]
    options = dict(tile=(tile, tile), photometric="rgb", metadata=None,
                   compression=None if compression == "none" else compression,
                   compressionargs={"level": quality} if compression == "jpeg" else None)
    if mpp:
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")

    def level_data(level: np.ndarray) -> tuple[object, dict]:
        if not jpeg_tables:
            return level, options
        tables, tiles = abbreviated_jpeg_tiles(level, tile, quality)
        return iter(tiles), {**options, "compressionargs": None, "photometric": "ycbcr", "subsampling": (2, 2),
                             "shape": level.shape, "dtype": np.uint8,
                             "extratags": [(347, 7, len(tables), tables, True)]}  # JPEGTables

    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as writer:
            extra = {"subifds": len(levels) - 1} if pyramid == "subifds" else {}
            data, opts = level_data(levels[0])
            writer.write(data, **extra, **opts)
            for level in levels[1:]:
                data, opts = level_data(level)
                writer.write(data, subfiletype=1, **opts)

    return atomic_write(path, write)


_DQT, _DHT, _APP0, _SOS = 0xDB, 0xC4, 0xE0, 0xDA


def abbreviated_jpeg_tiles(image: np.ndarray, tile: int, quality: int) -> tuple[bytes, list[bytes]]:
    """(JPEGTables, tiles): row-major tile x tile JPEG tiles of `image` without their quantisation
    and Huffman tables, which all share (standard Huffman tables, one quality)."""
    import imagecodecs

    h, w = image.shape[:2]
    tables, tiles = None, []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            block = np.zeros((tile, tile, 3), dtype=np.uint8)
            part = image[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            stream = imagecodecs.jpeg8_encode(block, quality, colorspace="rgb", outcolorspace="ycbcr",
                                              subsampling="420", optimize=False)
            segments = _jpeg_segments(bytes(stream))
            own = b"".join(seg for marker, seg in segments if marker in (_DQT, _DHT))
            if tables is None:
                tables = own
            elif own != tables:
                raise RuntimeError("JPEG tiles do not share their tables")
            tiles.append(b"\xff\xd8" + b"".join(seg for marker, seg in segments if marker not in (_DQT, _DHT, _APP0)))
    return b"\xff\xd8" + tables + b"\xff\xd9", tiles


def _jpeg_segments(stream: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of each segment after SOI; the last is SOS with the entropy-coded data and EOI."""
    out, i = [], 2
    while i < len(stream):
        marker = stream[i + 1]
        if marker == _SOS:
            out.append((marker, stream[i:]))
            break
        length = int.from_bytes(stream[i + 2:i + 4], "big")
        out.append((marker, stream[i:i + 2 + length]))
        i += 2 + length
    return out
