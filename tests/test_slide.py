"""Slide access: exact crops, white padding, pyramid thumbnails, format by content, damaged files."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
from PIL import Image

from hest_fixtures import coordinate_image, expected_crop
from nh2st.errors import NH2STError
from nh2st.slide import ImageSlide, TiffSlide, open_slide, write_pyramid_tiff

W, H = 1100, 700   # not square, not a multiple of the 256-px tile


@pytest.fixture(scope="module", params=[("subifds", "zlib"), ("pages", "lzw")], ids=["subifds-zlib", "pages-lzw"])
def coord_tiff(request, tmp_path_factory):
    pyramid, compression = request.param
    path = tmp_path_factory.mktemp("slide") / "coords.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), mpp=0.5, compression=compression, pyramid=pyramid)
    return path


def test_crops_match_known_pixels(coord_tiff):
    rng = np.random.default_rng(0)
    with open_slide(coord_tiff) as slide:
        assert isinstance(slide, TiffSlide)
        assert (slide.width, slide.height) == (W, H)
        assert len(slide.level_shapes) > 1  # the pyramid was found
        for cx, cy in [(300.0, 200.0), (511.999, 256.0), (700.5, 400.25)] + list(rng.uniform(0, [W, H], (20, 2))):
            crop = slide.crop(cx, cy)
            assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
            np.testing.assert_array_equal(crop, expected_crop(cx, cy, W, H))
        # the centre pixel is (floor(cx), floor(cy)): x is the column, y the row
        assert tuple(slide.crop(300.7, 200.2)[112, 112]) == (300 & 255, 200, (300 >> 8) & 15)


def test_read_region_and_edge_padding(coord_tiff):
    with open_slide(coord_tiff) as slide:
        region = slide.read_region(W - 10, H - 5, 30, 20)
        np.testing.assert_array_equal(region[:5, :10], coordinate_image(W, H)[H - 5:, W - 10:])
        assert (region[5:] == 255).all() and (region[:, 10:] == 255).all()
        corner = slide.crop(3.7, 5.2)
        np.testing.assert_array_equal(corner, expected_crop(3.7, 5.2, W, H))
        assert (corner[:107] == 255).all() and (corner[:, :109] == 255).all()
        assert (corner[107:, 109:] != 255).any()


@pytest.mark.parametrize("centre", [(-500.0, -500.0), (W + 113.0, 10.0), (10.0, H + 112.0)])
def test_off_slide_spot_is_fully_white(coord_tiff, centre):
    with open_slide(coord_tiff) as slide:
        assert (slide.crop(*centre) == 255).all()


def test_crop_just_touching_the_slide_is_not_white(coord_tiff):
    with open_slide(coord_tiff) as slide:
        crop = slide.crop(W + 111.0, 10.0)  # columns W-1 .. W+222: one column on the slide
        assert (crop[:, 1:] == 255).all() and (crop[:, 0] != 255).any()


def test_mpp_from_resolution_tags(tmp_path, coord_tiff):
    with open_slide(coord_tiff) as slide:
        assert slide.mpp == pytest.approx(0.5)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, coordinate_image(64, 64), tile=(32, 32), photometric="rgb",
                     resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, coordinate_image(64, 64), photometric="rgb")
    assert open_slide(inch).mpp == pytest.approx(0.25)
    assert open_slide(plain).mpp is None


def test_thumbnail_reads_a_pyramid_level_not_level_0(tmp_path, monkeypatch):
    image = np.zeros((H, W, 3), dtype=np.uint8)
    image[:, : W // 2] = (200, 30, 30)
    image[:, W // 2:] = (30, 30, 200)
    path = tmp_path / "halves.tif"
    write_pyramid_tiff(path, image, mpp=0.5, compression="zlib")
    slide = open_slide(path)
    levels_read = []
    original = TiffSlide._read_level

    def spy(self, level, *args):
        levels_read.append(level)
        return original(self, level, *args)

    monkeypatch.setattr(TiffSlide, "_read_level", spy)
    thumb, scale = slide.thumbnail(max_size=200)
    assert thumb.shape == (127, 200, 3) and scale == pytest.approx(200 / W)
    assert levels_read and 0 not in levels_read
    assert slide.level_shapes[levels_read[0]][0] < W
    np.testing.assert_allclose(thumb[:, :95].reshape(-1, 3).mean(0), (200, 30, 30), atol=1)
    np.testing.assert_allclose(thumb[:, 105:].reshape(-1, 3).mean(0), (30, 30, 200), atol=1)


def test_thumbnail_without_pyramid_goes_band_by_band(tmp_path):
    path = tmp_path / "flat.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), compression="zlib", pyramid="none")
    with open_slide(path) as slide:
        assert slide.level_shapes == [(W, H)]
        thumb, scale = slide.thumbnail(max_size=110)
        assert thumb.shape == (70, 110, 3) and scale == pytest.approx(0.1)
        # the green channel is y mod 256: row 10 of the thumbnail averages level-0 rows 100..109
        assert abs(int(thumb[10, 50, 1]) - 104) <= 1
        small, small_scale = slide.thumbnail(max_size=5000)  # never upscaled
        assert small.shape == (H, W, 3) and small_scale == 1.0


def test_stripped_tiff_and_format_by_content(tmp_path):
    image = coordinate_image(300, 200)
    striped = tmp_path / "striped.png"  # a TIFF under a misleading name
    tifffile.imwrite(striped, image, photometric="rgb", rowsperstrip=16, compression="zlib")
    png = tmp_path / "image.tif"        # a PNG under a misleading name
    Image.fromarray(image).save(png, format="PNG")
    jpeg = tmp_path / "image.png"
    Image.fromarray(image).save(jpeg, format="JPEG", quality=95)
    with open_slide(striped) as a, open_slide(png) as b:
        assert isinstance(a, TiffSlide) and isinstance(b, ImageSlide)
        for cx, cy in [(150.2, 100.9), (10.0, 190.0), (299.0, 0.0)]:
            np.testing.assert_array_equal(a.crop(cx, cy), expected_crop(cx, cy, 300, 200))
            np.testing.assert_array_equal(b.crop(cx, cy), expected_crop(cx, cy, 300, 200))
        assert b.thumbnail(150)[0].shape == (100, 150, 3)
    with open_slide(jpeg) as c:
        assert isinstance(c, ImageSlide) and (c.width, c.height) == (300, 200)


def test_parallel_crops_are_exact_with_a_tiny_cache(coord_tiff):
    slide = TiffSlide(coord_tiff, cache_bytes=3 * 256 * 256 * 3)  # constant eviction
    centres = np.random.default_rng(1).uniform(-50, [W + 50, H + 50], (200, 2))

    def check(centre):
        np.testing.assert_array_equal(slide.crop(*centre), expected_crop(*centre, W, H))
        return threading.get_ident()

    with ThreadPoolExecutor(8) as pool:
        threads = set(pool.map(check, centres))
    assert len(threads) > 1
    slide.close()


def test_truncated_tiff_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), mpp=0.5, compression="zlib")
    data = path.read_bytes()
    cut = tmp_path / "truncated.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(NH2STError, match="truncated.tif"):
        slide = open_slide(cut)      # at open (structure or tile table past the end) ...
        slide.crop(W - 10.0, H - 10.0)  # ... or at the first read of a missing tile


def test_garbage_files_are_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(NH2STError, match="garbage.tif.*not a TIFF, JPEG or PNG"):
        open_slide(garbage)
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"II*\x00" + bytes(range(256)) * 20)
    with pytest.raises(NH2STError, match="fake.tif"):
        open_slide(fake)
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(NH2STError, match="broken.png"):
        open_slide(broken_png)
    with pytest.raises(NH2STError, match="not found"):
        open_slide(tmp_path / "absent.tif")


def test_corrupt_tile_is_an_error_at_read(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, coordinate_image(W, H), compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\x13" * count
    path.write_bytes(bytes(data))
    slide = open_slide(path)
    slide.crop(800.0, 500.0)  # tiles away from the damaged one still read
    with pytest.raises(NH2STError, match=r"slide.tif: tile 0 of level 0 cannot be decoded"):
        slide.crop(100.0, 100.0)


def test_closed_slide_refuses_reads(coord_tiff):
    slide = TiffSlide(coord_tiff)
    slide.close()
    with pytest.raises(NH2STError, match="closed"):
        slide.crop(100.0, 100.0)
