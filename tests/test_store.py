import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from nh2st.errors import NH2STError
from nh2st.store import EmbeddingStore, SampleClaims, StoreMeta, load_spots

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


def _python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


HOLD_S1 = """
    import sys, time
    import numpy as np
    from nh2st.store import EmbeddingStore, StoreMeta
    meta = StoreMeta(**eval(sys.argv[2]))
    with EmbeddingStore.open_for_writing(sys.argv[1], meta) as store:
        writer = store.begin_sample("S1", 300)  # claims S1 and writes part of it
        writer.write_features(np.ones((256, 512, 7, 7)), np.ones((256, 512)))
        print("writing", flush=True)
        time.sleep(600)
"""


def test_writers_share_a_store_one_sample_each(tmp_path):
    path = tmp_path / "s.zarr"
    with EmbeddingStore.open_for_writing(path, META) as store:
        claim = store.claims.try_claim("S1")
        assert claim is not None and SampleClaims(path).try_claim("S1") is None  # threads of this process too
        child = _python("""
            import sys
            from nh2st.errors import NH2STError
            from nh2st.store import EmbeddingStore, StoreMeta
            sys.path.insert(0, sys.argv[3])
            from test_store import write_sample
            meta = StoreMeta(**eval(sys.argv[2]))
            with EmbeddingStore.open_for_writing(sys.argv[1], meta) as store:
                try:
                    store.begin_sample("S1", 5)
                except NH2STError as exc:
                    print("refused:", exc)
                write_sample(store, "S2", 7, seed=2)
                print("wrote S2")
        """, path, repr(META.to_dict()), Path(__file__).parent)
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert f"refused: {path}: sample S1 is being written by pid {os.getpid()} on " in out and "wrote S2" in out
        assert store.sample_ids() == ["S2"]
        a = write_sample(store, "S1", 20, seed=1)
        claim.release()
    store = EmbeddingStore.open(path)
    assert store.sample_ids() == ["S1", "S2"]
    np.testing.assert_array_equal(store.read_sample("S1", ["features"])["features"], a["features"])
    assert list((path / ".claims").iterdir()) == []  # released claims leave nothing behind


def test_dead_writers_sample_is_taken_over_and_redone(tmp_path):
    path = tmp_path / "s.zarr"
    with EmbeddingStore.open_for_writing(path, META) as store:
        write_sample(store, "S0", 5)
    child = _python(HOLD_S1, path, repr(META.to_dict()))
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
        claims = SampleClaims(path)
        assert claims.holder("S1").startswith(f"pid {child.pid} on ") and claims.try_claim("S1") is None
        assert claims.holders() == {"S1": claims.holder("S1")}
        # a rebuild must not pull the store from under a live writer
        other = StoreMeta(**{**META.to_dict(), "weights_sha256": "fff"})
        with pytest.raises(NH2STError, match=rf"being written by pid {child.pid} on .*\(sample S1\)"):
            with EmbeddingStore.open_for_writing(path, other, overwrite=True):
                pass
        assert EmbeddingStore.open(path).sample_ids() == ["S0"]
    finally:
        child.kill()
        child.wait()
    claims = SampleClaims(path)
    assert claims.holder("S1") is None and claims.holders() == {}
    with EmbeddingStore.open_for_writing(path, META) as store:
        assert store.all_sample_ids() == ["S0", "S1"] and not store.is_complete("S1")
        with store.claims.try_claim("S1") as claim:
            assert claim is not None
            b = write_sample(store, "S1", 3, seed=4)
    store = EmbeddingStore.open(path)
    assert store.sample_ids() == ["S0", "S1"] and store.n_spots("S1") == 3
    np.testing.assert_array_equal(store.read_sample("S1", ["pooled"])["pooled"], b["pooled"])


# A child that performs one store operation and SIGKILLs itself just before its n-th filesystem
# change (every os-level mkdir/rename/replace/unlink/rmdir/link that changes something, and every
# zarr file write); with n = 0 it runs to the end and prints the list of changes it made.
KILL_AT_STEP = """
    import json, os, shutil, signal, sys
    import zarr.storage._local as zarr_local
    from nh2st.store import EmbeddingStore, StoreMeta
    scenario, path, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    meta, other = StoreMeta(**eval(sys.argv[4])), StoreMeta(**eval(sys.argv[5]))
    steps, removing = [], []

    def hook(module, name):
        real = getattr(module, name)

        def step(*args, **kwargs):
            if "dir_fd" not in kwargs and (name, os.path.lexists(args[0])) in (("mkdir", True), ("unlink", False)):
                return real(*args, **kwargs)  # changes nothing: not a step
            steps.append([name, str(args[0]), removing[-1] if removing else None])
            if len(steps) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(module, name, step)

    def rmtree(target, *args, _real=shutil.rmtree, **kwargs):
        removing.append(str(target))
        try:
            return _real(target, *args, **kwargs)
        finally:
            removing.pop()

    for name in ("mkdir", "rename", "replace", "unlink", "rmdir", "link"):
        hook(os, name)
    hook(zarr_local, "_put")
    shutil.rmtree = rmtree
    if scenario == "create":
        with EmbeddingStore.open_for_writing(path, meta):
            pass
    elif scenario == "overwrite":
        with EmbeddingStore.open_for_writing(path, other, overwrite=True):
            pass
    elif scenario == "redo":
        with EmbeddingStore.open_for_writing(path, meta) as store:
            store.begin_sample("S2", 9)
    print(json.dumps(steps))
"""


def _kill_points(steps, until: str | None = None) -> list[int]:
    """1-based steps to kill at: every step before the first that touches `until`, except that inside
    the removal of something already moved to .trash (invisible to readers) only its first step."""
    points = []
    for i, (_, target, removing) in enumerate(steps):
        if until is not None and until in target:
            break
        in_trash = removing is not None and "/.trash/" in removing
        if not (in_trash and steps[i - 1][2] == removing):
            points.append(i + 1)
    return points


def _readable_or_refused(path):
    """A killed store is either read whole (every complete sample, and what `nh2st info` shows) or
    refused with an NH2STError."""
    from nh2st.extract import describe_store

    try:
        store = EmbeddingStore.open(path)
    except NH2STError:
        with pytest.raises(NH2STError):
            describe_store(path)
        return None
    for sid in store.sample_ids():
        store.read_sample(sid)
    described = describe_store(path)
    assert [s["id"] for s in described["samples"] if s["complete"]] == store.sample_ids()
    return store


@pytest.mark.parametrize("scenario", ["create", "overwrite", "redo"])
def test_a_kill_at_any_step_leaves_a_store_the_next_run_repairs(tmp_path, scenario):
    other = StoreMeta(**{**META.to_dict(), "weights_sha256": "fff"})
    template = tmp_path / "template.zarr"
    if scenario != "create":
        with EmbeddingStore.open_for_writing(template, META) as store:
            s1 = write_sample(store, "S1", 20, seed=1)
            write_sample(store, "S2", 9, commit=False)  # a half-written sample for "redo" to remove
        (template / "extract.json").write_text("{}")
    args = [repr(META.to_dict()), repr(other.to_dict())]

    def run_child(path, kill_at):
        if template.exists():
            shutil.copytree(template, path)
        child = _python(KILL_AT_STEP, scenario, path, kill_at, *args, cwd=Path(__file__).parents[1])
        out, err = child.communicate(timeout=120)
        return child.returncode, out, err

    code, out, err = run_child(tmp_path / "trace.zarr", 0)
    assert code == 0, err
    # "redo": the removal of the half-written S2 and its new group, up to its first array
    points = _kill_points(json.loads(out), until="S2/features" if scenario == "redo" else None)
    assert len(points) >= 5
    for n in points:
        path = tmp_path / f"kill{n}.zarr"
        code, _, err = run_child(path, n)
        assert code == -signal.SIGKILL, f"step {n} not reached: {err}"
        store = _readable_or_refused(path)
        if scenario == "redo":  # the store stays readable and its complete sample intact
            assert store is not None and store.sample_ids() == ["S1"]
            np.testing.assert_array_equal(store.read_sample("S1", ["features"])["features"], s1["features"])
        if scenario == "overwrite" and store is not None:  # the old store whole, or the new one empty
            assert (store.meta, store.sample_ids()) in [(META, ["S1"]), (other, [])]
        # the next run: the same command again, then a sample written and read back
        meta = other if scenario == "overwrite" else META
        with EmbeddingStore.open_for_writing(path, meta, overwrite=scenario == "overwrite") as store:
            s2 = write_sample(store, "S2", 9, seed=3)
        store = EmbeddingStore.open(path)
        assert store.meta == meta
        assert store.sample_ids() == (["S1", "S2"] if scenario == "redo" else ["S2"]), f"after a kill at step {n}"
        np.testing.assert_array_equal(store.read_sample("S2", ["features"])["features"], s2["features"])
        assert not any((path / ".trash").glob("*"))


def test_store_left_by_older_kills_is_repaired(tmp_path):
    """The two crash windows of nh2st <= 0.1's store creation: a root zarr.json without the nh2st
    attribute, and the attribute without the samples group."""
    bare = tmp_path / "bare.zarr"
    zarr.create_group(str(bare))
    with pytest.raises(NH2STError, match="not an nh2st store.*--overwrite"):
        EmbeddingStore.open(bare)
    no_samples = tmp_path / "no-samples.zarr"
    zarr.create_group(str(no_samples), attributes={"nh2st": META.to_dict()})
    assert EmbeddingStore.open(no_samples).sample_ids() == [] and _readable_or_refused(no_samples) is not None
    for path in (bare, no_samples):
        with EmbeddingStore.open_for_writing(path, META) as store:
            write_sample(store, "S1", 4)
        assert EmbeddingStore.open(path).sample_ids() == ["S1"]
