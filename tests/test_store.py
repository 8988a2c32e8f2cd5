import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nh2st.errors import NH2STError
from nh2st.store import EmbeddingStore, StoreMeta, load_spots

META = StoreMeta(dataset="demo", genes=("G1", "G2", "G3"), backbone="resnet18-trunk",
                 weights="random:seed=0", weights_sha256="abc123")


def write_sample(store, sample_id, n, seed=0, commit=True):
    rng = np.random.default_rng(seed)
    arrays = {
        "features": rng.standard_normal((n, 512, 7, 7)).astype(np.float16),
        "pooled": rng.standard_normal((n, 512)).astype(np.float32),
        "counts": rng.poisson(4, (n, 3)).astype(np.float32),
        "targets": rng.random((n, 3)).astype(np.float32),
        "pixel_xy": rng.random((n, 2)) * 1000,
        "grid_xy": np.stack([np.arange(n), np.zeros(n, int)], 1),
        "barcodes": np.array([f"{sample_id}-{i}" for i in range(n)]),
        "neighbors": np.stack([np.arange(n), (np.arange(n) + 1) % n], 1).astype(np.int32),
    }
    writer = store.begin_sample(sample_id, n, {"source": f"{sample_id}.h5ad"})
    for start in range(0, n, 50):  # batches that do not align with the 128-spot chunks
        writer.write_features(arrays["features"][start:start + 50], arrays["pooled"][start:start + 50])
    for name in ("counts", "targets", "pixel_xy", "grid_xy", "barcodes", "neighbors"):
        writer.write_array(name, arrays[name])
    if commit:
        writer.commit()
    return arrays


def test_roundtrip_and_load_spots_reindexes_neighbours(tmp_path):
    path = tmp_path / "s.zarr"
    with EmbeddingStore.open_for_writing(path, META) as store:
        a = write_sample(store, "S1", 300, seed=1)
        b = write_sample(store, "S2", 7, seed=2)
    store = EmbeddingStore.open(path)
    assert store.meta == META and store.sample_ids() == ["S1", "S2"]
    got = store.read_sample("S1")
    for name, values in a.items():
        np.testing.assert_array_equal(got[name], values)
    assert store.sample_info("S2")["source"] == "S2.h5ad"
    spots = load_spots(store, ["S2", "S1"], ("features", "targets", "neighbors", "barcodes"))
    assert spots["features"].shape == (307, 512, 7, 7)
    np.testing.assert_array_equal(spots["neighbors"][:7], b["neighbors"])
    np.testing.assert_array_equal(spots["neighbors"][7:], a["neighbors"] + 7)
    # a neighbour index points at the same spot's barcode after concatenation
    assert spots["barcodes"][spots["neighbors"][7, 1]] == "S1-1"
    assert spots["sample_index"].tolist() == [0] * 7 + [1] * 300


def test_half_written_sample_is_invisible_and_redone(tmp_path):
    path = tmp_path / "s.zarr"
    with EmbeddingStore.open_for_writing(path, META) as store:
        write_sample(store, "S1", 20)
        write_sample(store, "S2", 20, commit=False)
    store = EmbeddingStore.open(path)
    assert store.sample_ids() == ["S1"] and store.all_sample_ids() == ["S1", "S2"]
    with pytest.raises(NH2STError, match="no complete sample 'S2'"):
        store.read_sample("S2")
    with EmbeddingStore.open_for_writing(path, META) as store:
        write_sample(store, "S2", 9, seed=5)
    assert EmbeddingStore.open(path).n_spots("S2") == 9


def test_commit_refuses_missing_arrays(tmp_path):
    with EmbeddingStore.open_for_writing(tmp_path / "s.zarr", META) as store:
        writer = store.begin_sample("S1", 4)
        writer.write_features(np.zeros((4, 512, 7, 7)), np.zeros((4, 512)))
        with pytest.raises(RuntimeError, match="counts"):
            writer.commit()


def test_other_identity_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    with EmbeddingStore.open_for_writing(path, META) as store:
        write_sample(store, "S1", 5)
    other = StoreMeta(**{**META.to_dict(), "weights_sha256": "fff", "patch_size": 256})
    with pytest.raises(NH2STError, match=r"other weights_sha256, patch_size.*--overwrite"):
        with EmbeddingStore.open_for_writing(path, other):
            pass
    assert EmbeddingStore.open(path).sample_ids() == ["S1"]  # nothing lost
    with EmbeddingStore.open_for_writing(path, other, overwrite=True) as store:
        assert store.sample_ids() == []
    assert EmbeddingStore.open(path).meta.patch_size == 256
    # a different weights path with the same checksum is the same store
    same = StoreMeta(**{**other.to_dict(), "weights": "/elsewhere/w.ckpt"})
    with EmbeddingStore.open_for_writing(path, same):
        pass


def test_not_a_store_errors(tmp_path):
    with pytest.raises(NH2STError, match="not an nh2st store"):
        EmbeddingStore.open(tmp_path)
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(NH2STError, match="not an nh2st store"):
        with EmbeddingStore.open_for_writing(tmp_path, META, overwrite=True):
            pass
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_second_writer_in_another_process_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    child = textwrap.dedent(f"""
        from nh2st.store import EmbeddingStore, StoreMeta
        from nh2st.errors import NH2STError
        meta = StoreMeta(**{META.to_dict()!r})
        try:
            with EmbeddingStore.open_for_writing({str(path)!r}, meta):
                print("acquired")
        except NH2STError as exc:
            print("refused:", exc)
    """)
    with EmbeddingStore.open_for_writing(path, META):
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
        assert out.startswith("refused:") and f"pid {os.getpid()}" in out
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "acquired"
