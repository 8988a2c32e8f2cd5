"""Batched region reads from a tiled image: plan once per batch, assemble without per-patch Python.

A batch of B equal-size regions (level pixels, top-left corners `origins` (B, 2) as (x, y)) is read
from a grid of tiles (or strips) in three steps:

1. :func:`plan_regions` (numpy, vectorised): which tiles the batch touches, grouped into *runs*:
   per tile row, the union of the regions' column spans, merged where they overlap. Neighbouring
   spots on a Visium grid share one long run per tile row; isolated spots get a run each.
2. :func:`assemble_on_host`: each run is filled once from its decoded tiles into one flat byte arena
   (one copy per run and tile, white outside the image), then every output row of every region is a
   contiguous ``w * 3``-byte slice of the arena, gathered in one ``index_select`` that releases the
   GIL. Cost per batch: one Python step per run and tile, none per region.
3. :func:`assemble_on_device` (torch, any device): the same regions from tiles already on the device
   (e.g. decoded there by nvJPEG) by one per-pixel gather; used by the GPU decoding path.

JPEG helpers for that path live here too: :func:`jpeg_stream` completes an abbreviated TIFF tile
with the page's shared JPEGTables, :class:`DeviceJpegTiles` decodes a level's tiles in batches with
``torchvision.io.decode_jpeg`` on a device and keeps them in a device-side LRU cache.

Out-of-image pixels read as white (255) on both paths, including the padding of edge tiles.
"""

import logging
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from nh2st.errors import NH2STError

log = logging.getLogger(__name__)
# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (not installed here); its
# decode_jpeg is still the batched nvJPEG decoder this module needs, so the notice is silenced.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

WHITE = 255


@dataclass(frozen=True)
class TileGrid:
    """Geometry of one tiled (or stripped) image level: tiles of tile_w x tile_h, row-major indices."""

    width: int
    height: int
    tile_w: int
    tile_h: int

    @property
    def n_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def n_down(self) -> int:
        return -(-self.height // self.tile_h)


@dataclass
class RegionPlan:
    """What a batch of B regions of w x h needs, as arrays over its R runs.

    run_band, run_x0, run_x1, run_y0, run_y1 (R,): tile row and level-pixel span of each run.
    run_base, run_pitch (R,): byte offset and row pitch of each run in the arena; arena_bytes the
    total, white_row the offset of one all-white row (rows outside the image gather from it).
    row_source (B * h,): arena byte offset of every output row.
    tiles (T,): unique row-major indices of the in-image tiles the batch touches.
    """

    w: int
    h: int
    run_band: np.ndarray
    run_x0: np.ndarray
    run_x1: np.ndarray
    run_y0: np.ndarray
    run_y1: np.ndarray
    run_base: np.ndarray
    run_pitch: np.ndarray
    arena_bytes: int
    white_row: int
    row_source: np.ndarray
    tiles: np.ndarray


def plan_regions(grid: TileGrid, origins: np.ndarray, w: int, h: int) -> RegionPlan:
    """Plan reading B regions of w x h level pixels with top-left corners `origins` (B, 2) int (x, y)."""
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    n = len(origins)
    x0, y0 = origins[:, 0], origins[:, 1]
    # rows of each region inside the image; a region wholly left/right of the image reads white
    y_lo, y_hi = np.clip(y0, 0, grid.height), np.clip(y0 + h, 0, grid.height)
    visible = (y_hi > y_lo) & (x0 + w > 0) & (x0 < grid.width)
    first = np.where(visible, y_lo // grid.tile_h, 0)
    bands_per = np.where(visible, (y_hi - 1) // grid.tile_h - first + 1, 0)

    # pieces: one per (region, tile row it covers), in region order
    piece_region = np.repeat(np.arange(n), bands_per)
    starts = np.cumsum(bands_per) - bands_per
    piece_band = first[piece_region] + np.arange(len(piece_region)) - starts[piece_region]
    piece_x0 = x0[piece_region]
    piece_y0 = np.maximum(piece_band * grid.tile_h, y_lo[piece_region])
    piece_y1 = np.minimum((piece_band + 1) * grid.tile_h, y_hi[piece_region])

    # runs: merge overlapping column spans within a tile row (sorted by row, then x)
    order = np.lexsort((piece_x0, piece_band))
    band_s, x0_s = piece_band[order], piece_x0[order]
    if len(order):
        span = int(x0_s.max() - x0_s.min()) + w + 1
        reach = np.maximum.accumulate(band_s * span + (x0_s - x0_s.min() + w)) - band_s * span + x0_s.min()
        new_run = np.ones(len(order), dtype=bool)
        new_run[1:] = (band_s[1:] != band_s[:-1]) | (x0_s[1:] > reach[:-1])
    else:
        new_run = np.zeros(0, dtype=bool)
    run_start = np.flatnonzero(new_run)
    run_of_sorted = np.cumsum(new_run) - 1
    piece_run = np.empty(len(order), dtype=np.int64)
    piece_run[order] = run_of_sorted
    run_band = band_s[run_start]
    run_x0 = x0_s[run_start]
    if len(run_start):
        run_x1 = np.maximum.reduceat(x0_s, run_start) + w
        run_y0 = np.minimum.reduceat(piece_y0[order], run_start)
        run_y1 = np.maximum.reduceat(piece_y1[order], run_start)
    else:
        run_x1 = run_y0 = run_y1 = np.zeros(0, dtype=np.int64)
    run_pitch = (run_x1 - run_x0) * 3
    run_bytes = run_pitch * (run_y1 - run_y0)
    run_base = np.cumsum(run_bytes) - run_bytes
    white_row = int(run_bytes.sum())
    arena_bytes = white_row + w * 3

    # fills: the in-image tiles of each run's tile row that overlap its columns
    tx_first = np.clip(run_x0, 0, grid.width - 1) // grid.tile_w
    tx_last = (np.clip(run_x1, 1, grid.width) - 1) // grid.tile_w
    tiles_per = tx_last - tx_first + 1
    fill_run = np.repeat(np.arange(len(run_start)), tiles_per)
    fill_starts = np.cumsum(tiles_per) - tiles_per
    fill_tile_x = tx_first[fill_run] + np.arange(len(fill_run)) - fill_starts[fill_run]
    tiles = np.unique(run_band[fill_run] * grid.n_across + fill_tile_x)

    # every output row's source: its piece's run row, or the white row
    row_source = np.full(n * h, white_row, dtype=np.int64)
    rows_per = piece_y1 - piece_y0
    piece_row = np.repeat(np.arange(len(piece_region)), rows_per)
    row_starts = np.cumsum(rows_per) - rows_per
    level_y = piece_y0[piece_row] + np.arange(len(piece_row)) - row_starts[piece_row]
    region = piece_region[piece_row]
    run = piece_run[piece_row]
    row_source[region * h + (level_y - y0[region])] = (
        run_base[run] + (level_y - run_y0[run]) * run_pitch[run] + (x0[region] - run_x0[run]) * 3)
    return RegionPlan(w=w, h=h, run_band=run_band, run_x0=run_x0, run_x1=run_x1, run_y0=run_y0,
                      run_y1=run_y1, run_base=run_base, run_pitch=run_pitch, arena_bytes=arena_bytes,
                      white_row=white_row, row_source=row_source, tiles=tiles)


def assemble_on_host(grid: TileGrid, plan: RegionPlan, tiles: dict, out: np.ndarray | None = None) -> np.ndarray:
    """Regions of `plan` as (B, h, w, 3) uint8, from decoded `tiles` {row-major index: (th, tw, 3) uint8}.

    `out` (B, h, w, 3) uint8, C-contiguous, is filled if given (e.g. a pinned buffer).
    """
    import torch

    n = len(plan.row_source) // plan.h if plan.h else 0
    if out is None:
        out = np.empty((n, plan.h, plan.w, 3), dtype=np.uint8)
    elif out.shape != (n, plan.h, plan.w, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous ({n}, {plan.h}, {plan.w}, 3) uint8 array")
    arena = _arena(plan.arena_bytes)
    arena[plan.white_row:] = WHITE
    tw, th = grid.tile_w, grid.tile_h
    for r in range(len(plan.run_band)):
        band = int(plan.run_band[r])
        rx0, rx1, ry0, ry1 = (int(plan.run_x0[r]), int(plan.run_x1[r]), int(plan.run_y0[r]), int(plan.run_y1[r]))
        base, pitch = int(plan.run_base[r]), int(plan.run_pitch[r])
        run = arena[base:base + pitch * (ry1 - ry0)].reshape(ry1 - ry0, rx1 - rx0, 3)
        if rx0 < 0 or rx1 > grid.width:  # columns outside the image
            run[:, :max(0, -rx0)] = WHITE
            run[:, max(0, grid.width - rx0):] = WHITE
        cx_lo, cx_hi = max(rx0, 0), min(rx1, grid.width)
        if cx_lo >= cx_hi:
            continue
        for tx in range(cx_lo // tw, (cx_hi - 1) // tw + 1):
            tile = tiles[band * grid.n_across + tx]
            a, b = max(cx_lo, tx * tw), min(cx_hi, (tx + 1) * tw)
            run[:, a - rx0:b - rx0] = tile[ry0 - band * th:ry1 - band * th, a - tx * tw:b - tx * tw]
    if n:
        source = torch.from_numpy(arena)
        windows = source.as_strided((plan.arena_bytes - plan.w * 3 + 1, plan.w * 3), (1, 1))
        torch.index_select(windows, 0, torch.from_numpy(plan.row_source),
                           out=torch.from_numpy(out.reshape(n * plan.h, plan.w * 3)))
    return out


_ARENAS = threading.local()
_ARENA_KEEP_BYTES = 64 << 20


def _arena(nbytes: int) -> np.ndarray:
    """A scratch byte buffer for this thread, reused across batches: a fresh one per batch would
    cost the kernel's zeroing of every page (as much as the copies into it)."""
    buffer = getattr(_ARENAS, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
        if nbytes <= _ARENA_KEEP_BYTES:
            _ARENAS.buffer = buffer
    return buffer[:nbytes]


def tile_blocks(grid: TileGrid, origins: np.ndarray, w: int, h: int) -> np.ndarray:
    """(B, ky, kx) int64: for each region, the row-major index of every tile in the block of tile
    rows/columns starting at its top-left corner's tile; -1 where that tile does not meet the part
    of the region inside the image (or lies outside it)."""
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    th, tw = grid.tile_h, grid.tile_w
    ty = np.floor_divide(origins[:, 1], th)[:, None, None] + np.arange((h - 1) // th + 2)[None, :, None]
    tx = np.floor_divide(origins[:, 0], tw)[:, None, None] + np.arange((w - 1) // tw + 2)[None, None, :]
    x_lo, x_hi = np.clip(origins[:, 0], 0, grid.width), np.clip(origins[:, 0] + w, 0, grid.width)
    y_lo, y_hi = np.clip(origins[:, 1], 0, grid.height), np.clip(origins[:, 1] + h, 0, grid.height)
    meets = ((ty * th < y_hi[:, None, None]) & ((ty + 1) * th > y_lo[:, None, None])
             & (tx * tw < x_hi[:, None, None]) & ((tx + 1) * tw > x_lo[:, None, None])
             & ((x_hi > x_lo) & (y_hi > y_lo))[:, None, None])
    return np.where(meets, ty * grid.n_across + tx, -1)


def assemble_on_device(grid: TileGrid, origins: np.ndarray, w: int, h: int, tile_ids: np.ndarray, tiles,
                       blocks: np.ndarray | None = None):
    """(B, h, w, 3) uint8 regions on the tiles' device by one gather.

    tile_ids (T,) sorted row-major indices of `tiles` (T, tile_h, tile_w, 3) uint8 (a device tensor);
    every tile the regions meet must be among them. `blocks`: :func:`tile_blocks` if already computed.
    """
    import torch

    device = tiles.device
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    n = len(origins)
    th, tw = grid.tile_h, grid.tile_w
    blocks = tile_blocks(grid, origins, w, h) if blocks is None else blocks
    white_slot = len(tile_ids)
    needed = blocks >= 0
    pos = np.searchsorted(tile_ids, blocks)
    found = needed & (pos < len(tile_ids))
    found[found] = tile_ids[pos[found]] == blocks[found]
    if (needed & ~found).any():
        raise ValueError("assemble_on_device: a region needs a tile that was not given")
    # int32 indices throughout: half the device memory of int64 for the (B, h, w) gather
    slots = torch.from_numpy(np.where(found, pos, white_slot).astype(np.int32)).to(device)
    corners = torch.from_numpy(np.concatenate([origins, np.floor_divide(origins, [tw, th])], 1).astype(np.int32))
    corners = corners.to(device)
    y = corners[:, 1, None] + torch.arange(h, device=device, dtype=torch.int32)[None, :]    # (B, h)
    x = corners[:, 0, None] + torch.arange(w, device=device, dtype=torch.int32)[None, :]    # (B, w)
    band = torch.div(y, th, rounding_mode="floor") - corners[:, 3, None]
    col = torch.div(x, tw, rounding_mode="floor") - corners[:, 2, None]
    batch = torch.arange(n, device=device)[:, None, None]
    slot = slots[batch, band[:, :, None].long(), col[:, None, :].long()]                      # (B, h, w)
    inside = ((y >= 0) & (y < grid.height))[:, :, None] & ((x >= 0) & (x < grid.width))[:, None, :]
    slot = torch.where(inside, slot, white_slot)
    pixel = (slot * (th * tw) + (torch.remainder(y, th) * tw)[:, :, None] + torch.remainder(x, tw)[:, None, :])
    white = torch.full((1, th, tw, 3), WHITE, dtype=torch.uint8, device=device)
    table = torch.cat([tiles.reshape(-1, th, tw, 3), white]).reshape(-1, 3)
    return table.index_select(0, pixel.reshape(-1)).reshape(n, h, w, 3)


# ---- JPEG tiles -------------------------------------------------------------------------------------------
JPEG_COMPRESSION = 7        # TIFF Compression tag: "new-style" JPEG (one JPEG stream per tile)
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


def jpeg_stream(data: bytes, tables: bytes | None) -> bytes:
    """A TIFF JPEG tile as a complete JPEG stream.

    Abbreviated tiles (as libtiff/pyvips write them) omit the quantisation and Huffman tables and
    rely on the page's JPEGTables tag (SOI, tables, EOI); the tables go right after the tile's SOI.
    """
    if not tables or len(tables) <= 4:
        return data
    if not (data[:2] == _SOI and tables[:2] == _SOI and tables[-2:] == _EOI):
        raise ValueError("not a JPEG tile and JPEGTables pair")
    return data[:2] + tables[2:-2] + data[2:]


class DeviceJpegTiles:
    """Decodes the JPEG tiles of one TIFF level on a torch device in batches, with an LRU cache there.

    ``torchvision.io.decode_jpeg(list, device=...)`` decodes a whole batch in one call (nvJPEG on
    CUDA); each tile is decoded once while it stays in the cache (`cache_bytes` of device memory).
    Regions are then assembled on the device (:func:`assemble_on_device`). Thread-safe: one batch
    at a time per level.
    """

    def __init__(self, path, fd: int, grid: TileGrid, offsets, bytecounts, tables: bytes | None,
                 device, level: int = 0, cache_bytes: int = 512 << 20):
        self.path, self.fd, self.grid, self.level = path, fd, grid, level
        self.offsets, self.bytecounts, self.tables = offsets, bytecounts, tables
        self.device = device
        self._cache: OrderedDict = OrderedDict()
        self._tile_bytes = grid.tile_w * grid.tile_h * 3
        self._cache_tiles = max(64, cache_bytes // self._tile_bytes)
        self._lock = threading.Lock()

    def _stream(self, index: int) -> bytes:
        count = self.bytecounts[index]
        data = os.pread(self.fd, count, self.offsets[index])
        if len(data) < count:
            raise NH2STError(f"{self.path}: truncated at tile {index} of level {self.level}; re-download the file")
        return jpeg_stream(data, self.tables)

    def decode(self, indices) -> list:
        """Decode tiles `indices` on the device -> list of (tile_h, tile_w, 3) uint8 tensors (not cached)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        th, tw = self.grid.tile_h, self.grid.tile_w
        out: list = [None] * len(indices)
        todo = []
        for i, index in enumerate(indices):
            if self.bytecounts[index] == 0:  # sparse TIFF: a missing tile is blank
                out[i] = torch.full((th, tw, 3), WHITE, dtype=torch.uint8, device=self.device)
            else:
                todo.append(i)
        if todo:
            streams = [torch.frombuffer(bytearray(self._stream(indices[i])), dtype=torch.uint8) for i in todo]
            try:
                images = decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.device)
            except Exception:
                self._name_bad_tile([indices[i] for i in todo])
                raise
            for i, image in zip(todo, images):
                if image.shape[1] < th or image.shape[2] < tw:  # a short last strip
                    full = torch.full((3, th, tw), WHITE, dtype=torch.uint8, device=self.device)
                    full[:, :image.shape[1], :image.shape[2]] = image
                    image = full
                out[i] = image[:, :th, :tw].permute(1, 2, 0)
        return out

    def _name_bad_tile(self, indices) -> None:
        """A batch failed to decode: find the tile (one by one, on the CPU) and raise naming it."""
        from torchvision.io import ImageReadMode, decode_jpeg
        import torch

        for index in indices:
            try:
                decode_jpeg(torch.frombuffer(bytearray(self._stream(index)), dtype=torch.uint8),
                            mode=ImageReadMode.RGB)
            except Exception as exc:
                raise NH2STError(f"{self.path}: tile {index} of level {self.level} cannot be decoded "
                                 f"({type(exc).__name__}: {exc}); the file is corrupt, re-download it") from None

    def regions(self, origins: np.ndarray, w: int, h: int):
        """(B, h, w, 3) uint8 tensor on the device: the regions with top-left corners `origins` (B, 2)."""
        import torch

        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        blocks = tile_blocks(self.grid, origins, w, h)
        needed = np.unique(blocks[blocks >= 0])
        with self._lock:
            missing = [int(i) for i in needed if int(i) not in self._cache]
            found = {i: self._cache[i] for i in map(int, needed) if i in self._cache}
            for i in found:
                self._cache.move_to_end(i)
            for index, tile in zip(missing, self.decode(missing)):
                found[index] = tile
                self._cache[index] = tile
            while len(self._cache) > max(self._cache_tiles, len(needed)):
                self._cache.popitem(last=False)
        if len(needed):
            stack = torch.stack([found[int(i)] for i in needed])
        else:
            stack = torch.empty((0, self.grid.tile_h, self.grid.tile_w, 3), dtype=torch.uint8, device=self.device)
        return assemble_on_device(self.grid, origins, w, h, needed, stack, blocks)
