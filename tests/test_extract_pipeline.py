"""Stage one's hot path (nh2st.extract.encode_sample): spot order, crops built on the device,
joined writes, per-stage timing, and a corrupt tile naming its sample, level and tile."""

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from hest_fixtures import make_hest_sample
from nh2st.encoder import FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.extract import encode_sample, run_extract
from nh2st.genes import load_gene_list
from nh2st.slide import open_slide, write_pyramid_tiff
from nh2st.stages import recording
from nh2st.store import EmbeddingStore

torch.set_num_threads(2)


class Collector:
    """A writer that keeps what it is given; its first write may wait for `hold`, a later one fail."""

    def __init__(self, hold: threading.Event | None = None, fail_at: int | None = None):
        self.maps, self.pooled, self.calls = [], [], 0
        self.hold, self.fail_at = hold, fail_at

    def write_features(self, maps, pooled):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise OSError("disk full")
        if self.hold is not None and self.calls == 1:
            assert self.hold.wait(60)
        self.maps.append(np.array(maps))
        self.pooled.append(np.array(pooled))


@pytest.fixture(scope="module")
def encoder():
    return FrozenEncoder("random", "cpu")


@pytest.fixture(scope="module")
def jpeg_sample(tmp_path_factory):
    """A JPEG pyramidal TIFF with pyvips-style shared JPEGTables and 70 spots, some off the edge."""
    path = tmp_path_factory.mktemp("pipeline") / "slide.tif"
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(small, 8, 0), 8, 1)  # 720 x 960, blocky: JPEG keeps it recognisable
    write_pyramid_tiff(path, image, mpp=0.5, tile=128, jpeg_tables=True)
    rows, cols = np.divmod(np.arange(64), 8)
    xy = np.concatenate([np.stack([100 + 100.0 * cols + 50 * (rows % 2), 90 + 70.0 * rows], 1) + 0.5,
                         [[0.0, 0.0], [959.0, 719.0], [1000.0, 100.0], [-50.0, 700.0], [480.0, -100.0], [5.5, 360.2]]])
    return path, xy


def _encode(path, xy, encoder, batch_size=16, workers=2, writer=None, on_batch=None):
    writer = writer or Collector()
    with open_slide(path) as slide, ThreadPoolExecutor(workers) as pool:
        sample = SimpleNamespace(id="S1", n_spots=len(xy), pixel_xy=xy, slide=slide)
        encode_sample(sample, encoder, writer, pool, batch_size, prefetch=workers + 1, on_batch=on_batch)
    return writer


def test_spots_come_out_in_order_whatever_the_batching(jpeg_sample, encoder):
    path, xy = jpeg_sample
    with open_slide(path) as slide:
        reference = encoder.encode(np.stack([slide.crop(x, y) for x, y in xy]))
    for batch_size, workers in ((16, 2), (7, 3), (64, 1)):
        out = _encode(path, xy, encoder, batch_size, workers)
        maps, pooled = np.concatenate(out.maps), np.concatenate(out.pooled)
        assert maps.shape == (len(xy), 512, 7, 7) and maps.dtype == np.float16 and maps.flags.c_contiguous
        np.testing.assert_allclose(pooled, reference[1], rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(maps.astype(np.float32), reference[0].astype(np.float32), rtol=1e-2, atol=2e-3)


def test_crops_built_on_the_device_give_the_host_features(jpeg_sample, encoder):
    """The GPU path (JPEG tiles decoded by torchvision, crops assembled as tensors), run on the CPU."""
    path, xy = jpeg_sample
    host = _encode(path, xy, encoder)
    encoder.crops_on_device = True
    try:
        with open_slide(path) as slide:
            assert slide.decodes_on(encoder.device)
        device = _encode(path, xy, encoder)
    finally:
        encoder.crops_on_device = False
    np.testing.assert_allclose(np.concatenate(device.pooled), np.concatenate(host.pooled), rtol=2e-2, atol=2e-3)


def test_writes_arriving_during_a_write_are_joined(jpeg_sample, encoder):
    path, xy = jpeg_sample
    handed_over, done = [0], threading.Event()

    def on_batch(k):  # the first write is held until every batch has been encoded and handed over
        handed_over[0] += k
        if handed_over[0] == len(xy):
            done.set()

    slow = _encode(path, xy, encoder, batch_size=8, writer=Collector(hold=done), on_batch=on_batch)
    assert sum(len(m) for m in slow.maps) == len(xy)
    assert slow.calls == 2  # the first batch, then the other eight joined into one write
    fast = _encode(path, xy, encoder, batch_size=8)
    np.testing.assert_array_equal(np.concatenate(slow.maps), np.concatenate(fast.maps))


def test_a_failing_write_stops_the_sample(jpeg_sample, encoder):
    path, xy = jpeg_sample
    with pytest.raises(OSError, match="disk full"):
        _encode(path, xy, encoder, batch_size=8, writer=Collector(fail_at=2))


def test_stages_are_timed_for_the_benchmark(jpeg_sample, encoder):
    path, xy = jpeg_sample
    with recording() as times:
        _encode(path, xy, encoder)
    for name in ("plan crops", "read + decode tiles", "assemble crops", "encode", "compress + write features",
                 "wait for crops"):
        assert times.calls[name] > 0 and times.seconds[name] >= times.cpu_seconds[name] * 0.5, name
    assert times.calls["encode"] == -(-len(xy) // 16)


def test_corrupt_tile_names_sample_level_and_tile_and_keeps_done_samples(tmp_path):
    genes = load_gene_list("ZEN")
    root = tmp_path / "hest"
    make_hest_sample(root, "GOOD1", genes, seed=1, compression="jpeg")
    bad = make_hest_sample(root, "BAD2", genes, seed=2, compression="jpeg")
    slide_path = bad.paths["wsi"]
    with tifffile.TiffFile(slide_path) as tif:
        page = tif.pages[0]
        n_across = -(-page.imagewidth // page.tilewidth)
        x, y = bad.pixel_xy[len(bad.pixel_xy) // 2]
        index = int(y // page.tilelength) * n_across + int(x // page.tilewidth)
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(slide_path.read_bytes())
    data[offset + 2:offset + count] = b"\x13" * (count - 2)
    slide_path.write_bytes(bytes(data))
    store_path = tmp_path / "store.zarr"
    with pytest.raises(NH2STError, match=rf"sample BAD2: .*BAD2.tif: tile {index} of level 0 cannot be decoded"):
        run_extract("zen", data_root=root, store_path=store_path, weights="random", samples=["GOOD1", "BAD2"],
                    device="cpu", batch_size=8, progress=False)
    store = EmbeddingStore.open(store_path)
    assert store.sample_ids() == ["GOOD1"] and not store.is_complete("BAD2")
    assert len(store.read_sample("GOOD1", ("features",))["features"]) == len(make_hest_sample(
        tmp_path / "again", "GOOD1", genes, seed=1, compression="jpeg").pixel_xy)
