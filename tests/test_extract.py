"""Stage one end to end on small HEST-1k-format samples (h5ad + pyramidal TIFF + metadata JSON)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from checkpoint_fixtures import write_checkpoint
from nh2st.datasets import get_dataset
from nh2st.datasets.demo import write_hest_sample
from nh2st.encoder import FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.expression import process_expression
from nh2st.extract import SUMMARY_FILE, describe_store, run_extract
from nh2st.neighbors import knn_index
from nh2st.store import EmbeddingStore, SampleClaims

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SPOTS = {"ZEN40": (6, 10), "ZEN41": (10, 15), "ZEN42": (4, 10)}  # (rows, per row); in tissue: 59, 149, 39


def _write_sample(root: Path, sample_id: str, rows: int, per_row: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    genes = get_dataset("zen").genes()
    var_names = genes[::-1] + ["MT-CO1", "EXTRA1"]  # var order differs from the list order
    array_row = np.repeat(np.arange(rows), per_row)
    array_col = 2 * np.tile(np.arange(per_row), rows) + array_row % 2  # Visium hex grid
    x = 150 + 60.0 * array_col + rng.uniform(-0.4, 0.4, len(array_col))
    y = 150 + 104.0 * array_row
    height, width = int(y.max()) + 150, int(x.max()) + 150
    # blurred noise with a colour gradient: every crop differs, JPEG keeps it small
    image = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(image, 8, 0), 8, 1)[:height, :width]
    image[..., 0] = (image[..., 0] // 2 + (np.arange(width) * 127 // width)[None, :]).astype(np.uint8)
    n = len(array_row)
    obs = pd.DataFrame({"in_tissue": 1, "array_row": array_row, "array_col": array_col,
                        "pxl_col_in_fullres": x, "pxl_row_in_fullres": y},
                       index=[f"{sample_id}-{i:04d}-1" for i in range(n)])
    obs.iloc[0, 0] = 0  # one spot off tissue: dropped by the reader
    counts = sparse.csr_matrix(rng.poisson(rng.gamma(1.0, 3.0, (n, len(var_names)))).astype(np.float32))
    write_hest_sample(root, sample_id, image=image, mpp=0.5, obs=obs, X=counts, var_names=var_names,
                      metadata={"id": sample_id, "pixel_size_um_estimated": 0.5, "oncotree_code": float("nan")})


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hest")
    for seed, (sid, (rows, per_row)) in enumerate(SPOTS.items()):
        _write_sample(root, sid, rows, per_row, seed)
    return root


@pytest.fixture(scope="module")
def extracted(hest_root, tmp_path_factory) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("stores") / "zen.zarr"
    summary = run_extract("zen", data_root=hest_root, store_path=store, weights="random", samples=["ZEN40", "ZEN42"],
                          device="cpu", batch_size=16, progress=False)
    return store, summary


def _encode_directly(hest_root, sample_id, encoder):
    sample = get_dataset("zen").load_sample(hest_root, sample_id)
    crops = np.stack([sample.slide.crop(x, y) for x, y in sample.pixel_xy])
    sample.slide.close()
    return sample, encoder.encode(crops)


def test_store_contents(hest_root, extracted):
    store_path, summary = extracted
    store = EmbeddingStore.open(store_path)
    encoder = FrozenEncoder("random", device="cpu")
    assert store.sample_ids() == ["ZEN40", "ZEN42"]
    assert store.meta.weights == "random:seed=0" and store.meta.weights_sha256 == encoder.weights_sha256
    assert list(store.meta.genes) == get_dataset("zen").genes() and store.meta.backbone == "resnet18-trunk"
    for sid in ("ZEN40", "ZEN42"):
        sample, (maps, pooled) = _encode_directly(hest_root, sid, encoder)
        data = store.read_sample(sid)
        assert data["features"].dtype == np.float16 and data["features"].shape == (sample.n_spots, 512, 7, 7)
        np.testing.assert_allclose(data["features"].astype(np.float32), maps.astype(np.float32), rtol=1e-2, atol=2e-3)
        np.testing.assert_allclose(data["pooled"], pooled, rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(data["counts"], sample.counts)
        np.testing.assert_array_equal(data["targets"], process_expression(sample.counts, sample.grid_xy))
        np.testing.assert_array_equal(data["neighbors"], knn_index(sample.pixel_xy, 9))
        np.testing.assert_array_equal(data["pixel_xy"], sample.pixel_xy)
        np.testing.assert_array_equal(data["grid_xy"], sample.grid_xy)
        np.testing.assert_array_equal(data["barcodes"], sample.barcodes)
        assert f"{sid}-0000-1" not in set(data["barcodes"])  # off-tissue spot dropped
        assert store.thumbnail(sid) is not None
    # different spots give different features: the crops really follow the spot centres
    features = store.read_sample("ZEN40", ["pooled"])["pooled"]
    assert np.abs(features[0] - features[1]).max() > 1e-3
    saved = json.loads((store_path / SUMMARY_FILE).read_text())
    assert saved["n_extracted"] == summary["n_extracted"] == 2
    assert saved["spots_extracted"] == 59 + 39


def test_rerun_does_no_work(hest_root, extracted):
    store_path, _ = extracted
    before = {sid: EmbeddingStore.open(store_path).sample_info(sid)["completed_at"] for sid in ("ZEN40", "ZEN42")}
    features_file = next((store_path / "samples" / "ZEN40" / "features").rglob("c/*/*/*/*"))
    mtime = features_file.stat().st_mtime_ns
    summary = run_extract("zen", data_root=hest_root, store_path=store_path, weights="random",
                          samples=["ZEN40", "ZEN42"], device="cpu", progress=False)
    assert summary["up_to_date"] and summary["n_extracted"] == 0 and summary["n_skipped"] == 2
    after = {sid: EmbeddingStore.open(store_path).sample_info(sid)["completed_at"] for sid in ("ZEN40", "ZEN42")}
    assert after == before and features_file.stat().st_mtime_ns == mtime


def test_other_weights_or_genes_refused(hest_root, extracted):
    store_path, _ = extracted
    with pytest.raises(NH2STError, match="other weights_sha256.*--overwrite"):
        run_extract("zen", data_root=hest_root, store_path=store_path, weights="random:seed=1",
                    samples=["ZEN40"], device="cpu", progress=False)
    with pytest.raises(NH2STError, match="other dataset, genes"):
        run_extract("int", data_root=hest_root, store_path=store_path, weights="random",
                    samples=["ZEN40"], device="cpu", progress=False, allow_missing_genes=True)
    assert EmbeddingStore.open(store_path).sample_ids() == ["ZEN40", "ZEN42"]  # nothing lost


def test_overwrite_with_checkpoint_weights(hest_root, tmp_path):
    store_path = tmp_path / "zen.zarr"
    run_extract("zen", data_root=hest_root, store_path=store_path, weights="random", samples=["ZEN42"],
                device="cpu", progress=False)
    ckpt = tmp_path / "weights" / "tenpercent_resnet18.ckpt"
    write_checkpoint(ckpt, seed=4)
    summary = run_extract("zen", data_root=hest_root, store_path=store_path, weights=ckpt, samples=["ZEN42"],
                          device="cpu", progress=False, overwrite=True)
    store = EmbeddingStore.open(store_path)
    assert summary["n_extracted"] == 1
    assert store.meta.weights_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    _, (maps, _) = _encode_directly(hest_root, "ZEN42", FrozenEncoder(ckpt, device="cpu"))
    np.testing.assert_allclose(store.read_sample("ZEN42", ["features"])["features"].astype(np.float32),
                               maps.astype(np.float32), rtol=1e-2, atol=2e-3)


def test_unknown_dataset_and_missing_weights(hest_root, tmp_path):
    with pytest.raises(NH2STError, match="unknown --dataset 'zenn'; choose one of: demo, zen"):
        run_extract("zenn", data_root=hest_root, store_path=tmp_path / "s.zarr")
    missing = tmp_path / "nowhere" / "tenpercent_resnet18.ckpt"
    with pytest.raises(NH2STError, match="weights not found at .*nowhere.*--weights random"):
        run_extract("zen", data_root=hest_root, store_path=tmp_path / "s.zarr", weights=missing, device="cpu")
    assert not (tmp_path / "s.zarr").exists()  # refused before touching the store


def test_missing_sample_keeps_completed_ones(hest_root, tmp_path):
    store_path = tmp_path / "zen.zarr"
    with pytest.raises(NH2STError, match="ZEN49.h5ad: not found"):
        run_extract("zen", data_root=hest_root, store_path=store_path, weights="random",
                    samples=["ZEN42", "ZEN49"], device="cpu", progress=False)
    assert EmbeddingStore.open(store_path).sample_ids() == ["ZEN42"]


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"extract exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the extract process")
        time.sleep(0.01)


def test_sigkill_mid_sample_then_resume(hest_root, tmp_path):
    store_path = tmp_path / "zen.zarr"
    proc = _cli("extract", "--dataset", "zen", "--data-root", hest_root, "--store", store_path, "--weights",
                "random", "--device", "cpu", "--batch-size", "16", "--samples", "ZEN40,ZEN41")
    first_chunk = store_path / "samples" / "ZEN41" / "features" / "c"
    _wait_for(first_chunk.exists, proc)  # ZEN40 is complete, ZEN41 has a feature chunk on disk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = EmbeddingStore.open(store_path)
    assert store.sample_ids() == ["ZEN40"] and "ZEN41" in store.all_sample_ids()
    assert not store.is_complete("ZEN41")  # half-written, not mistaken for whole
    zen40_done = store.sample_info("ZEN40")["completed_at"]

    summary = run_extract("zen", data_root=hest_root, store_path=store_path, weights="random",
                          samples=["ZEN40", "ZEN41"], device="cpu", batch_size=16, progress=False)
    assert [(r["id"], r["status"]) for r in summary["samples"]] == [("ZEN40", "skipped"), ("ZEN41", "extracted")]
    store = EmbeddingStore.open(store_path)
    assert store.sample_ids() == ["ZEN40", "ZEN41"]
    assert store.sample_info("ZEN40")["completed_at"] == zen40_done
    sample, (maps, _) = _encode_directly(hest_root, "ZEN41", FrozenEncoder("random", device="cpu"))
    stored = store.read_sample("ZEN41", ["features", "barcodes"])
    assert stored["features"].shape[0] == sample.n_spots == 149
    np.testing.assert_allclose(stored["features"].astype(np.float32), maps.astype(np.float32), rtol=1e-2, atol=2e-3)


def test_second_extract_is_refused_at_once_while_first_runs(hest_root, tmp_path, monkeypatch):
    store_path = tmp_path / "zen.zarr"
    run_extract("zen", data_root=hest_root, store_path=store_path, weights="random", samples=["ZEN42"],
                device="cpu", progress=False)
    proc = _cli("extract", "--dataset", "zen", "--data-root", hest_root, "--store", store_path, "--weights",
                "random", "--device", "cpu", "--samples", "ZEN41")
    claim = store_path / ".claims" / "ZEN41"
    _wait_for(lambda: claim.exists() and "pid" in claim.read_text(), proc)
    try:
        # refused before its encoder loads: the claim is tried first
        monkeypatch.setattr("nh2st.extract.FrozenEncoder", lambda *a, **k: pytest.fail("encoder loaded"))
        with pytest.raises(NH2STError, match=rf"ZEN41 is being written by pid {proc.pid} on "):
            run_extract("zen", data_root=hest_root, store_path=store_path, weights="random",
                        samples=["ZEN42", "ZEN41"], device="cpu", progress=False)
        described = describe_store(store_path)
        assert [(s["id"], s["writer"] is not None) for s in described["samples"]] == [("ZEN41", True),
                                                                                       ("ZEN42", False)]
        assert proc.poll() is None  # the first one carries on
    finally:
        proc.kill()
        proc.wait()


def test_cli_info_and_errors(extracted, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    store_path, _ = extracted
    described = describe_store(store_path)
    assert [(s["id"], s["complete"], s["n_spots"]) for s in described["samples"]] == [("ZEN40", True, 59),
                                                                                      ("ZEN42", True, 39)]
    assert described["spots"] == 98 and described["bytes"] > 98 * 20_000
    result = CliRunner().invoke(app, ["info", str(store_path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "ZEN40" in result.output and "random:seed=0" in result.output and "2 complete of 2" in result.output
    result = CliRunner().invoke(app, ["extract", "--dataset", "nope", "--store", str(tmp_path / "x.zarr")])
    assert isinstance(result.exception, NH2STError) and "unknown --dataset 'nope'" in str(result.exception)
    proc = _cli("info", tmp_path / "not-a-store")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "error:" in err and "not an nh2st store" in err


# ---- several writers: claims, --gpus, a dask cluster ------------------------------------------------
TINY = {"TINY1": (2, 4), "TINY2": (3, 6), "TINY3": (2, 3)}  # in tissue: 7, 17, 5 spots


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for seed, (sid, (rows, per_row)) in enumerate(TINY.items()):
        _write_sample(root, sid, rows, per_row, seed + 10)
    return root


@pytest.fixture(scope="module")
def tiny_reference(tiny_root, tmp_path_factory) -> EmbeddingStore:
    """The three tiny samples extracted by one process: what every other way must give."""
    store = tmp_path_factory.mktemp("reference") / "zen.zarr"
    run_extract("zen", data_root=tiny_root, store_path=store, weights="random", samples=list(TINY), device="cpu",
                batch_size=4, progress=False)
    return EmbeddingStore.open(store)


def _assert_same_store(store_path, reference: EmbeddingStore):
    store = EmbeddingStore.open(store_path)
    assert store.meta == reference.meta and store.sample_ids() == reference.sample_ids() == list(TINY)
    for sid in TINY:
        got, want = store.read_sample(sid), reference.read_sample(sid)
        for name in want:  # other processes, other thread counts: float16 maps agree to rounding
            if name in ("features", "pooled"):
                np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32),
                                           rtol=1e-2, atol=2e-3)
            else:
                np.testing.assert_array_equal(got[name], want[name])


def test_sample_claimed_by_another_writer_is_left_to_it(tiny_root, tiny_reference, tmp_path):
    store_path = tmp_path / "zen.zarr"
    run_extract("zen", data_root=tiny_root, store_path=store_path, weights="random", samples=["TINY3"],
                device="cpu", batch_size=4, progress=False)
    with SampleClaims(store_path).try_claim("TINY1") as claim:  # a writer busy with TINY1
        assert claim is not None
        summary = run_extract("zen", data_root=tiny_root, store_path=store_path, weights="random",
                              samples=list(TINY), device="cpu", batch_size=4, progress=False)
    assert [(r["id"], r["status"]) for r in summary["samples"]] == [("TINY1", "claimed"), ("TINY2", "extracted"),
                                                                    ("TINY3", "skipped")]
    assert summary["samples"][0]["holder"].startswith(f"pid {os.getpid()} on ")
    assert summary["n_claimed"] == 1 and not summary["up_to_date"]
    assert EmbeddingStore.open(store_path).sample_ids() == ["TINY2", "TINY3"]
    summary = run_extract("zen", data_root=tiny_root, store_path=store_path, weights="random",
                          samples=list(TINY), device="cpu", batch_size=4, progress=False)
    assert [r["status"] for r in summary["samples"]] == ["extracted", "skipped", "skipped"]
    _assert_same_store(store_path, tiny_reference)


def test_dask_cluster_of_two_workers_equals_one_process(tiny_root, tiny_reference, tmp_path):
    from distributed import LocalCluster

    store_path = tmp_path / "zen.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        summary = run_extract("zen", data_root=tiny_root, store_path=store_path, weights="random",
                              samples=list(TINY), device="cpu", batch_size=4, progress=False,
                              scheduler=cluster.scheduler_address)
        assert [r["status"] for r in summary["samples"]] == ["extracted"] * 3
        assert summary["scheduler"] == cluster.scheduler_address and summary["spots_extracted"] == 7 + 17 + 5
        _assert_same_store(store_path, tiny_reference)
        again = run_extract("zen", data_root=tiny_root, store_path=store_path, weights="random",
                            samples=list(TINY), device="cpu", progress=False, scheduler=cluster.scheduler_address)
        assert again["up_to_date"] and again["n_skipped"] == 3


def test_gpus_one_encoder_per_device_and_a_worker_killed_mid_sample(tiny_root, tiny_reference, tmp_path):
    """--gpus simulated with two CPU "devices": one dask worker process each. The worker writing
    TINY2 is SIGKILLed half-way; dask reruns the task, which redoes TINY2."""
    store_path = tmp_path / "zen.zarr"
    group, claim = store_path / "samples" / "TINY2" / "zarr.json", store_path / ".claims" / "TINY2"
    killed, stop = {}, threading.Event()

    def kill_the_worker_writing_tiny2():
        while not stop.is_set():
            try:
                complete = json.loads(group.read_text())["attributes"]["complete"]
                holder = claim.read_text().split()
            except (OSError, ValueError, KeyError):
                time.sleep(0.002)
                continue
            if not complete and holder[:1] == ["pid"]:
                os.kill(int(holder[1]), signal.SIGKILL)
                killed.update(pid=int(holder[1]), at=time.time())
            return

    killer = threading.Thread(target=kill_the_worker_writing_tiny2)
    killer.start()
    try:
        summary = run_extract("zen", data_root=tiny_root, store_path=store_path, weights="random",
                              samples=list(TINY), devices=["cpu", "cpu"], batch_size=2, progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed and killed["pid"] != os.getpid(), "TINY2 was complete before its worker could be killed"
    assert [r["status"] for r in summary["samples"]] == ["extracted"] * 3 and summary["devices"] == ["cpu", "cpu"]
    # written by the worker processes, not by this one
    assert all(not r["writer"].startswith(f"pid {os.getpid()} ") for r in summary["samples"])
    store = EmbeddingStore.open(store_path)
    assert store.sample_info("TINY2")["started_at"] > killed["at"]  # redone after the kill
    assert not any((store_path / ".trash").glob("*")) and not any((store_path / ".claims").iterdir())
    _assert_same_store(store_path, tiny_reference)


def test_cli_gpus_and_scheduler_flags(hest_root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import app

    base = ["extract", "--dataset", "zen", "--data-root", str(hest_root), "--store", str(tmp_path / "s.zarr"),
            "--weights", "random", "--samples", "ZEN42"]
    result = CliRunner().invoke(app, base + ["--gpus", "0", "1", "--scheduler", "tcp://127.0.0.1:8786"])
    assert isinstance(result.exception, NH2STError) and "--gpus and --scheduler: pick one" in str(result.exception)
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, base + ["--gpus", "0", "1"])
        assert isinstance(result.exception, NH2STError) and "cuda:0: no CUDA GPU" in str(result.exception)
    monkeypatch.setattr("nh2st.extract.SCHEDULER_TIMEOUT", "1s")
    result = CliRunner().invoke(app, base + ["--scheduler", "tcp://127.0.0.1:1"])
    assert isinstance(result.exception, NH2STError)
    assert "--scheduler tcp://127.0.0.1:1: cannot reach a dask scheduler" in str(result.exception)
    assert not (tmp_path / "s.zarr").exists()
