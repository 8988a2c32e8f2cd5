"""Lazy whole-slide access and 224-px patch cropping.

`open_slide(path)` looks at the file's first bytes, not its name:

- TIFF (classic or BigTIFF, tiled or stripped, pyramidal or not) -> :class:`TiffSlide`. Only the
  tiles a request touches are read (``os.pread``) and decoded (tifffile's per-page decoder), with
  a small LRU cache of decoded tiles; the slide is never held whole in memory. Pyramid levels
  (SubIFDs or reduced-resolution pages) serve :meth:`Slide.thumbnail`.
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

import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from nh2st.atomic import atomic_write
from nh2st.errors import NH2STError

PATCH_SIZE = 224
WHITE = 255

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# tifffile's TiffFile.is_<flavour> flags of the scanner formats tiffslide reads
SCANNER_FLAVOURS = ("svs", "ndpi", "scn", "bif", "philips")

PAPER_MPP = 0.5        # µm per pixel of the paper's 224-px patches (HEST's ~20x)
MPP_TOLERANCE = 0.10   # relative; within it a slide is cropped natively, as the paper does


class Slide:
    """A lazily read RGB slide: level-0 regions, 224-px crops and a pyramid thumbnail.

    Subclasses provide `level_shapes` ((width, height) per level, level 0 first, then smaller)
    and `_read_level(level, x0, y0, w, h)`; everything else is shared.
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

    def crop(self, cx: float, cy: float, size: int = PATCH_SIZE) -> np.ndarray:
        """(size, size, 3) uint8 patch centred on (floor(cx), floor(cy)).

        Rows floor(cy) - size//2 .. floor(cy) + size - size//2 - 1 (for 224: -112 .. +111), columns
        likewise; white where the patch leaves the slide.
        """
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise NH2STError(f"{self.path}: spot centre ({cx}, {cy}) is not a finite pixel coordinate")
        half = size // 2
        return self._read_level(0, math.floor(cx) - half, math.floor(cy) - half, size, size)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """(image, scale): the whole slide with its long edge <= max_size; scale = thumb px per level-0 px.

        Reads the smallest pyramid level that is still at least the thumbnail's size, in bands of
        rows, so level 0 of a large slide is never decoded whole.
        """
        from PIL import Image

        long_edge = max(self.width, self.height)
        scale = min(1.0, max_size / long_edge)
        tw, th = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        level = max(i for i, (lw, lh) in enumerate(self.level_shapes) if (lw >= tw and lh >= th) or i == 0)
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

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.width}x{self.height}, mpp={self.mpp})"


def _paste(out: np.ndarray, x0: int, y0: int, tile: np.ndarray, tx0: int, ty0: int) -> None:
    """Copy the part of `tile` (top-left at level px tx0, ty0) that overlaps `out` (top-left x0, y0)."""
    h, w = out.shape[:2]
    th, tw = tile.shape[:2]
    ox0, oy0 = max(x0, tx0), max(y0, ty0)
    ox1, oy1 = min(x0 + w, tx0 + tw), min(y0 + h, ty0 + th)
    if ox0 < ox1 and oy0 < oy1:
        out[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0] = tile[oy0 - ty0:oy1 - ty0, ox0 - tx0:ox1 - tx0]


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

    def __init__(self, page, path: Path):
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
        self.decode = page.decode  # a pure closure; evaluated here, before any thread uses it
        self.end = max((o + b for o, b in zip(self.offsets, self.bytecounts)), default=0)


class TiffSlide(Slide):
    """A TIFF read tile by tile.

    Thread safety: segment bytes are read with ``os.pread`` on a private descriptor (no shared
    file position), tifffile's decoder is a pure function, and the decoded-tile LRU cache is
    guarded by a lock; so `read_region`/`crop` may be called from many threads at once. `close`
    must not race with reads.
    """

    def __init__(self, path: Path, cache_bytes: int = 64 << 20):
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
            levels = [_TiffLevel(p, self.path) for p in pages]
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
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes
        self._lock = threading.Lock()

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
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
                segment, _, shape = lv.decode(data, index, jpegtables=lv.jpegtables)
            except Exception as exc:
                raise NH2STError(f"{self.path}: tile {index} of level {level} cannot be decoded "
                                 f"({type(exc).__name__}: {exc}); the file is corrupt, re-download it") from None
            tile = _to_rgb(np.asarray(segment).reshape(shape)[0], self.path)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cache_bytes += tile.nbytes
                while self._cache_bytes > self._cache_limit and len(self._cache) > 1:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _read_level(self, level, x0, y0, w, h):
        lv = self._levels[level]
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lv.width), min(y0 + h, lv.height)
        if ix0 >= ix1 or iy0 >= iy1:
            return out
        for ty in range(iy0 // lv.seg_h, (iy1 - 1) // lv.seg_h + 1):
            for tx in range(ix0 // lv.seg_w, (ix1 - 1) // lv.seg_w + 1):
                tile = self._segment(level, ty * lv.n_across + tx)
                # edge tiles are stored full-size; keep only the part inside the image
                tile = tile[:lv.height - ty * lv.seg_h, :lv.width - tx * lv.seg_w]
                _paste(out, x0, y0, tile, tx * lv.seg_w, ty * lv.seg_h)
        return out

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
            self._tif.close()
            self._cache.clear()


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

    def _read_level(self, level, x0, y0, w, h):
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        _paste(out, x0, y0, self._pixels, 0, 0)
        return out


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
        _paste(out, x0, y0, _to_rgb(np.asarray(region), self.path), ix0, iy0)
        return out

    def close(self):
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
            self._slide = None


class RescaledSlide(Slide):
    """A slide whose crops cover the paper's field of view: 224 px at `target_mpp`.

    `crop(cx, cy, size)` reads the square of round(size * target_mpp / mpp) level-0 pixels centred
    like a native crop (top-left at floor(centre) - field // 2) and resizes it to size x size
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

    def crop(self, cx: float, cy: float, size: int = PATCH_SIZE) -> np.ndarray:
        from PIL import Image

        field = self.field(size)
        region = super().crop(cx, cy, field)
        if field == size:
            return region
        return np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR))

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


def open_slide(path, cache_bytes: int = 64 << 20) -> Slide:
    """Open a slide by its content: a scanner's TIFF -> ScannerSlide, other TIFF -> TiffSlide (lazy),
    JPEG/PNG -> ImageSlide."""
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
                       compression: str = "jpeg", quality: int = 90, pyramid: str = "subifds") -> Path:
    """Write an (H, W, 3) uint8 image as a tiled pyramidal RGB TIFF like HEST's (pyvips) slides.

    Resolution tags in pixels per cm (10^4 / mpp). `pyramid`: "subifds" (levels as SubIFDs of
    page 0), "pages" (reduced-resolution pages after it) or "none". `compression`: "jpeg",
    "lzw", "zlib" or "none". Written to a temporary file and renamed, so the path never holds a
    half-written slide.
    """
    import tifffile

    path = Path(path)
    if pyramid not in ("subifds", "pages", "none"):
        raise ValueError(f"pyramid must be 'subifds', 'pages' or 'none', not {pyramid!r}")
    levels = pyramid_levels(image, tile) if pyramid != "none" else [image]
    options = dict(tile=(tile, tile), photometric="rgb", metadata=None,
                   compression=None if compression == "none" else compression,
                   compressionargs={"level": quality} if compression == "jpeg" else None)
    if mpp:
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    def write(tmp):
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as writer:
            extra = {"subifds": len(levels) - 1} if pyramid == "subifds" else {}
            writer.write(levels[0], **extra, **options)
            for level in levels[1:]:
                writer.write(level, subfiletype=1, **options)

    return atomic_write(path, write)
