"""Batched crops (nh2st.patches): exact for any tile geometry, each tile decoded once, and the
GPU JPEG path (run here with torchvision's CPU decoder) equal to the CPU path."""

import functools
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hest_fixtures import coordinate_image, expected_crop
from nh2st.errors import NH2STError
from nh2st.patches import TileGrid, jpeg_stream, plan_regions
from nh2st.slide import ImageSlide, TiffSlide, open_slide, write_pyramid_tiff

W, H = 1100, 700
CPU = torch.device("cpu")


def _centres(rng, n=160) -> np.ndarray:
    """A Visium-like hex grid (neighbouring crops overlap), random spots, edges and off-slide spots."""
    rows, cols = np.divmod(np.arange(60), 10)
    grid = np.stack([100 + 100.0 * cols + 50 * (rows % 2), 80 + 87.0 * rows], axis=1) + 0.3
    edges = np.array([[0.0, 0.0], [W - 1.0, H - 1.0], [W + 111.0, 10.0], [-111.5, 300.0], [500.0, H + 111.9],
                      [-5000.0, -5000.0], [W / 2, -112.0], [W + 500.0, H + 500.0]])
    rand = rng.uniform([-150, -150], [W + 150, H + 150], (n - len(grid) - len(edges), 2))
    return np.concatenate([grid, edges, rand])


def _expected(centres, size=224) -> np.ndarray:
    return np.stack([expected_crop(x, y, W, H, size) for x, y in centres])


@pytest.fixture(scope="module", params=["tile64-lzw", "tile256-zlib", "strips-zlib", "png"])
def exact_slide(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("geom") / "slide.img"
    image = coordinate_image(W, H)
    if request.param == "tile64-lzw":      # a 224-px crop spans up to 5 x 5 tiles
        write_pyramid_tiff(path, image, mpp=0.5, tile=64, compression="lzw")
    elif request.param == "tile256-zlib":
        write_pyramid_tiff(path, image, mpp=0.5, tile=256, compression="zlib", pyramid="pages")
    elif request.param == "strips-zlib":
        tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=48, compression="zlib")
    else:
        Image.fromarray(image).save(path, format="PNG")
    return path


@pytest.mark.parametrize("size", [224, 37])
def test_batched_crops_are_exact_for_any_geometry(exact_slide, size):
    centres = _centres(np.random.default_rng(size))
    with open_slide(exact_slide) as slide:
        batch = slide.crop_batch(centres, size)
        assert batch.shape == (len(centres), size, size, 3) and batch.dtype == np.uint8
        np.testing.assert_array_equal(batch, _expected(centres, size))
        # the same crops one at a time, and into a caller's buffer
        np.testing.assert_array_equal(slide.crop(*centres[7], size), _expected(centres[7:8], size)[0])
        buffer = np.zeros((10, size, size, 3), dtype=np.uint8)
        assert slide.crop_batch(centres[:10], size, out=buffer) is buffer
        np.testing.assert_array_equal(buffer, _expected(centres[:10], size))


def test_non_finite_centre_names_the_slide(exact_slide):
    with open_slide(exact_slide) as slide, pytest.raises(NH2STError, match="slide.img.*not a finite"):
        slide.crop_batch(np.array([[10.0, 10.0], [np.nan, 3.0]]))


def test_plan_merges_overlapping_crops_into_runs():
    grid = TileGrid(1000, 600, 256, 256)
    # three crops overlapping in one tile row, one far away: two runs, tiles counted once
    plan = plan_regions(grid, np.array([[10, 10], [100, 20], [200, 5], [700, 10]]), 224, 100)
    assert list(plan.run_band) == [0, 0]
    assert list(zip(plan.run_x0, plan.run_x1)) == [(10, 424), (700, 924)]
    assert list(plan.tiles) == [0, 1, 2, 3]
    assert len(plan.row_source) == 4 * 100
    outside = plan_regions(grid, np.array([[-500, -500]]), 224, 224)
    assert len(outside.tiles) == 0 and (outside.row_source == outside.white_row).all()


def _touched_tiles(centres, tile, size=224) -> set:
    tiles = set()
    for x, y in np.floor(centres).astype(int) - size // 2:
        ys = range(max(y, 0) // tile, (min(y + size, H) - 1) // tile + 1) if y + size > 0 and y < H else ()
        xs = range(max(x, 0) // tile, (min(x + size, W) - 1) // tile + 1) if x + size > 0 and x < W else ()
        tiles |= {(ty, tx) for ty in ys for tx in xs}
    return tiles


def test_each_tile_is_decoded_once_across_batches_and_threads(tmp_path):
    path = tmp_path / "grid.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), tile=64, compression="zlib")
    centres = _centres(np.random.default_rng(3))
    with TiffSlide(path) as slide:  # the default cache holds the whole small slide
        for start in range(0, len(centres), 16):
            slide.crop_batch(centres[start:start + 16])
        assert slide.tiles_decoded == len(_touched_tiles(centres, 64))
    with TiffSlide(path) as slide, ThreadPoolExecutor(6) as pool:
        barrier = threading.Barrier(6)

        def crop(batch):
            barrier.wait()  # all threads ask for the same tiles at once
            return slide.crop_batch(batch)

        results = list(pool.map(crop, [centres] * 6))
        assert slide.tiles_decoded == len(_touched_tiles(centres, 64))
        for result in results:
            np.testing.assert_array_equal(result, _expected(centres))


def test_tiny_cache_still_gives_exact_crops(tmp_path):
    path = tmp_path / "small-cache.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), tile=64, compression="lzw")
    centres = _centres(np.random.default_rng(4))
    with TiffSlide(path, cache_bytes=2 * 64 * 64 * 3) as slide, ThreadPoolExecutor(4) as pool:
        batches = [centres[i:i + 20] for i in range(0, len(centres), 20)]
        for batch, result in zip(batches, pool.map(slide.crop_batch, batches)):
            np.testing.assert_array_equal(result, _expected(batch))


# ---- the GPU JPEG path, run with torchvision's CPU decoder -----------------------------------------------
@functools.lru_cache(maxsize=4)
def _tissue(seed=0) -> np.ndarray:
    """Smooth H&E-like colours with sharp nuclei: what JPEG tiles of a slide look like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    image = np.stack([200 + 40 * np.sin(xx / 37), 120 + 60 * np.cos(yy / 23), 180 + 30 * np.sin((xx + yy) / 51)], -1)
    for cx, cy, r in zip(rng.integers(10, W - 10, 300), rng.integers(10, H - 10, 300), rng.uniform(3, 9, 300)):
        window = (slice(cy - 10, cy + 10), slice(cx - 10, cx + 10))
        image[window][np.hypot(xx[window] - cx, yy[window] - cy) < r] = (80, 40, 140)
    image = np.clip(image, 0, 255).astype(np.uint8)
    image.flags.writeable = False
    return image


@pytest.fixture(scope="module", params=["shared-tables", "full-streams"])
def jpeg_slide(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("jpeg") / f"{request.param}.tif"
    write_pyramid_tiff(path, _tissue(), mpp=0.5, tile=128, quality=90, jpeg_tables=request.param == "shared-tables")
    return path


def test_jpeg_tables_are_shared_as_in_pyvips_slides(jpeg_slide):
    with tifffile.TiffFile(jpeg_slide) as tif:
        page = tif.pages[0]
        assert page.compression == 7 and page.photometric == 6  # JPEG, YCbCr
        if "shared" in jpeg_slide.name:
            assert page.jpegtables is not None
            with open(jpeg_slide, "rb") as fh:
                fh.seek(page.dataoffsets[0])
                tile = fh.read(page.databytecounts[0])
            assert b"\xff\xdb" not in tile[:200]  # abbreviated: no quantisation table of its own
            complete = jpeg_stream(tile, page.jpegtables)
            decoded = np.asarray(Image.open(io.BytesIO(complete)).convert("RGB"))
            np.testing.assert_array_equal(decoded, page.decode(tile, 0, jpegtables=page.jpegtables)[0][0])


def test_device_path_gives_the_cpu_crops(jpeg_slide):
    centres = _centres(np.random.default_rng(5), n=120)
    with open_slide(jpeg_slide) as slide:
        assert slide.decodes_on(CPU)
        reference = slide.crop_batch(centres)
        on_device = slide.crop_batch_on(CPU, centres)
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.uint8
    assert tuple(on_device.shape) == reference.shape
    diff = np.abs(on_device.numpy().astype(np.int16) - reference.astype(np.int16))
    # JPEG decoder tolerance: nvJPEG and libjpeg-turbo may differ by IDCT/upsampling rounding
    assert diff.mean() <= 1.0 and diff.max() <= 24
    # and both are the image, up to JPEG's own loss; white outside
    tissue = _tissue()
    truth = np.stack([_window(tissue, x, y) for x, y in centres])
    assert np.abs(reference.astype(np.int16) - truth).mean() < 4
    assert (reference[-100:][(truth[-100:] == 255).all(-1)] == 255).all()


def _window(image, cx, cy, size=224):
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    x0, y0 = int(np.floor(cx)) - size // 2, int(np.floor(cy)) - size // 2
    ys, xs = slice(max(y0, 0), min(y0 + size, H)), slice(max(x0, 0), min(x0 + size, W))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = image[ys, xs]
    return out


def test_device_path_decodes_each_tile_once(tmp_path):
    path = tmp_path / "once.tif"
    write_pyramid_tiff(path, _tissue(1), tile=128, jpeg_tables=True)
    centres = _centres(np.random.default_rng(6))
    with open_slide(path) as slide:
        assert slide.decodes_on(CPU)
        tiles = slide._on_device[CPU]
        calls = []
        original = tiles.decode
        tiles.decode = lambda indices: calls.extend(indices) or original(indices)
        for start in range(0, len(centres), 32):
            slide.crop_batch_on(CPU, centres[start:start + 32])
        assert sorted(calls) == sorted(set(calls)) and len(calls) == len(_touched_tiles(centres, 128))


@pytest.mark.parametrize("compression", ["lzw", "none"])
def test_non_jpeg_slide_falls_back_to_the_cpu_with_one_log_line(tmp_path, caplog, compression):
    path = tmp_path / f"{compression}.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), tile=128, compression=compression)
    centres = _centres(np.random.default_rng(7), n=80)
    with caplog.at_level(logging.WARNING, logger="nh2st.slide"), open_slide(path) as slide:
        assert not slide.decodes_on(CPU)
        first = slide.crop_batch_on(CPU, centres[:40])
        second = slide.crop_batch_on(CPU, centres[40:])
    np.testing.assert_array_equal(torch.cat([first, second]).numpy(), _expected(centres))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert f"{compression}.tif" in lines[0] and "cropping on the CPU" in lines[0]
    assert {"lzw": "LZW", "none": "NONE"}[compression] in lines[0]


def test_corrupt_tile_on_the_device_path_names_level_and_tile(tmp_path):
    path = tmp_path / "corrupt.tif"
    write_pyramid_tiff(path, _tissue(2), tile=128, jpeg_tables=True)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[30], page.databytecounts[30]
    data = bytearray(path.read_bytes())
    data[offset + 2:offset + count] = b"\x13" * (count - 2)
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert slide.decodes_on(CPU)
        slide.crop_batch_on(CPU, np.array([[120.0, 120.0]]))  # tiles away from the damaged one decode
        ty, tx = divmod(30, -(-W // 128))
        with pytest.raises(NH2STError, match=r"corrupt.tif: tile 30 of level 0 cannot be decoded"):
            slide.crop_batch_on(CPU, np.array([[tx * 128 + 64.0, ty * 128 + 64.0]]))
        with pytest.raises(NH2STError, match=r"corrupt.tif: tile 30 of level 0 cannot be decoded"):
            slide.crop_batch(np.array([[tx * 128 + 64.0, ty * 128 + 64.0]]))


def test_image_slide_batches_like_a_tiff(tmp_path):
    path = tmp_path / "image.jpg"
    Image.fromarray(_tissue(3)).save(path, quality=95)
    centres = _centres(np.random.default_rng(8), n=90)
    with open_slide(path) as slide:
        assert isinstance(slide, ImageSlide) and not slide.decodes_on(CPU)
        batch = slide.crop_batch(centres)
        pixels = np.asarray(Image.open(path).convert("RGB"))
        np.testing.assert_array_equal(batch, np.stack([_window(pixels, x, y) for x, y in centres]))
