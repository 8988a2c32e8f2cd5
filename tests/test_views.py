"""Augmentation-aware cache: `extract --views V` encodes each patch's dihedral views; training draws one
per target spot per epoch (TRAINING.augment), neighbours and evaluation use the patch as it is."""

import numpy as np
import pytest
import torch

from hest_fixtures import make_hest_sample
from nh2st.config import load_config
from nh2st.datasets import get_dataset
from nh2st.encoder import FrozenEncoder
from nh2st.errors import NH2STError
from nh2st.extract import describe_store, run_extract
from nh2st.splits import folds
from nh2st.store import EmbeddingStore, StoreMeta
from nh2st.training import FoldSpots, train_fold
from nh2st.views import dihedral
from store_fixtures import smooth_latent, write_spots

torch.set_num_threads(2)


# ---- the eight views ------------------------------------------------------------------------------
def test_dihedral_views_are_the_eight_symmetries_of_the_square():
    patch = torch.arange(2 * 5 * 5 * 3, dtype=torch.int64).view(2, 5, 5, 3)      # no symmetry of its own
    views = [dihedral(patch, v) for v in range(8)]
    assert torch.equal(views[0], patch)
    assert len({tuple(v[0].flatten().tolist()) for v in views}) == 8               # all different
    for v in range(8):                                                               # as numpy turns and mirrors
        expected = np.rot90(patch.numpy(), v % 4, axes=(1, 2))
        expected = expected[:, :, ::-1] if v >= 4 else expected
        assert np.array_equal(views[v].numpy(), expected) and views[v].is_contiguous()
    assert torch.equal(dihedral(dihedral(patch, 1), 3), patch)                      # a quarter turn and back
    assert torch.equal(dihedral(dihedral(patch, 4), 4), patch)                      # a mirror is its own inverse
    with pytest.raises(ValueError, match="0..7"):
        dihedral(patch, 8)


# ---- extraction -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hest_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    make_hest_sample(root, "ZEN40", get_dataset("zen").genes(), n_rows=3, per_row=4, off_tissue=2, seed=1)
    return root


def test_extract_views_stores_each_view_as_the_encoder_sees_it(hest_root, tmp_path):
    plain, turned = tmp_path / "plain.zarr", tmp_path / "views.zarr"
    run_extract("zen", data_root=hest_root, store_path=plain, weights="random", device="cpu", batch_size=4,
                progress=False)
    summary = run_extract("zen", data_root=hest_root, store_path=turned, weights="random", device="cpu",
                          batch_size=4, progress=False, views=8)
    assert summary["views"] == 8 and EmbeddingStore.open(turned).meta.views == 8
    assert describe_store(turned)["attributes"]["views"] == 8
    one, eight = EmbeddingStore.open(plain).read_sample("ZEN40"), EmbeddingStore.open(turned).read_sample(
        "ZEN40", ("features", "pooled", "views"))
    n = len(one["features"])
    assert n == 10 and eight["views"].shape == (n, 7, 512, 7, 7) and eight["views"].dtype == np.float16
    for name in ("features", "pooled"):        # view 0 is the store a plain run makes
        np.testing.assert_allclose(eight[name].astype(np.float32), one[name].astype(np.float32), rtol=1e-2, atol=2e-3)

    sample = get_dataset("zen").load_sample(hest_root, "ZEN40")
    crops = torch.from_numpy(np.stack([sample.slide.crop(x, y) for x, y in sample.pixel_xy]))
    sample.slide.close()
    encoder = FrozenEncoder("random", device="cpu")
    for v in (1, 4, 7):
        maps, _ = encoder.encode(dihedral(crops, v))
        np.testing.assert_allclose(eight["views"][:, v - 1].astype(np.float32), maps.astype(np.float32),
                                   rtol=1e-2, atol=2e-3)
    # a turned patch is not the same patch: the views carry something the identity does not
    assert np.abs(eight["views"][:, 0].astype(np.float32) - eight["features"].astype(np.float32)).mean() > 1e-2


def test_views_must_match_the_store_and_be_a_dihedral_count(hest_root, tmp_path):
    store = tmp_path / "zen.zarr"
    run_extract("zen", data_root=hest_root, store_path=store, weights="random", device="cpu", progress=False)
    with pytest.raises(NH2STError, match="other views.*--overwrite"):
        run_extract("zen", data_root=hest_root, store_path=store, weights="random", device="cpu", progress=False,
                    views=8)
    assert EmbeddingStore.open(store).is_complete("ZEN40")           # nothing lost
    with pytest.raises(NH2STError, match="--views 3: use one of 1, 4, 8"):
        run_extract("zen", data_root=hest_root, store_path=tmp_path / "other.zarr", weights="random",
                    device="cpu", progress=False, views=3)


def test_cli_extract_takes_views_and_info_shows_them(hest_root, tmp_path):
    import typer
    from typer.testing import CliRunner

    from cli import extract as extract_cli
    app = typer.Typer()
    app.callback()(lambda: None)
    extract_cli.register(app)
    runner, store = CliRunner(), tmp_path / "zen.zarr"
    args = ["extract", "--dataset", "zen", "--data-root", str(hest_root), "--store", str(store), "--device", "cpu",
            "--weights", "random"]
    done = runner.invoke(app, [*args, "--views", "4"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "(4 views each)" in done.stdout and EmbeddingStore.open(store).meta.views == 4
    assert EmbeddingStore.open(store).read_sample("ZEN40", ("views",))["views"].shape[1] == 3
    info = runner.invoke(app, ["info", str(store)], env={"COLUMNS": "200"})
    assert info.exit_code == 0 and "views per patch" in info.stdout
    bad = runner.invoke(app, [*args, "--store", str(tmp_path / "other.zarr"), "--views", "2"])
    assert bad.exit_code != 0 and isinstance(bad.exception, NH2STError) and "--views 2" in str(bad.exception)


def test_views_written_in_uneven_batches_read_back_in_order(tmp_path):
    shape, n = (8, 2, 2), 300                       # several features chunks; views chunks of 16 spots
    meta = StoreMeta(dataset="demo", genes=["A"], backbone="synthetic", weights="none", weights_sha256="0" * 64,
                     feature_shape=shape, views=8)
    rng = np.random.default_rng(0)
    maps, views = rng.normal(size=(n, *shape)), rng.normal(size=(n, 7, *shape))
    with EmbeddingStore.open_for_writing(tmp_path / "s.zarr", meta) as store:
        writer = store.begin_sample("S1", n)
        with pytest.raises(ValueError, match="views of shape"):
            writer.write_features(maps[:5], maps[:5].mean(axis=(2, 3)))
        for start in range(0, n, 37):
            sl = slice(start, start + 37)
            writer.write_features(maps[sl], maps[sl].mean(axis=(2, 3)), views[sl])
        for name, values in (("counts", np.zeros((n, 1), np.float32)), ("targets", np.zeros((n, 1), np.float32)),
                             ("pixel_xy", np.zeros((n, 2))), ("grid_xy", np.zeros((n, 2), np.int64)),
                             ("barcodes", np.array([str(i) for i in range(n)])),
                             ("neighbors", np.zeros((n, 9), np.int32))):
            writer.write_array(name, values)
        writer.commit()
    back = EmbeddingStore.open(tmp_path / "s.zarr").read_sample("S1", ("features", "views"))
    np.testing.assert_array_equal(back["views"], views.astype(np.float16))
    np.testing.assert_array_equal(back["features"], maps.astype(np.float16))


# ---- training -------------------------------------------------------------------------------------
SHAPE = (16, 4, 4)
SAMPLES = [f"DEMO{i}" for i in range(1, 7)]
SMALL = ["MODEL.emb_dim=32", "MODEL.num_heads1=4", "MODEL.hypergraph_dim=32", "MODEL.decoder_dim=32",
         "MODEL.dropout1=0.1", "TRAINING.batch_size=64", "TRAINING.learning_rate=0.003", "TRAINING.num_epochs=10",
         "TRAINING.early_stopping.patience=30", "TRAINING.eval_batch_size=64", "TRAINING.val_fraction=0"]


def turn_maps(maps: np.ndarray, view: int) -> np.ndarray:
    """(N, C, H, W) maps of a patch in dihedral view `view`, for an encoder that turns with the patch."""
    return dihedral(torch.from_numpy(maps).permute(0, 2, 3, 1), view).permute(0, 3, 1, 2).numpy()


def build_store(path, views: int, turned_test: bool = False, same_views: bool = False, seed: int = 0):
    """6 samples whose expression follows a latent z drawn in each map as z-weighted spatial patterns.

    Training slides show the tissue upright; with `turned_test`, the test slides of fold 0 show each
    spot's patch turned by a random dihedral view. The store's extra views are the turned maps
    (`same_views`: copies of the identity, so augmentation changes nothing)."""
    rng = np.random.default_rng(seed)
    latent, n_genes = 4, 12
    patterns = rng.normal(size=(latent, *SHAPE))
    patterns -= patterns.mean(axis=(2, 3), keepdims=True)             # the pooled vector carries no signal
    mixing = rng.normal(scale=0.8, size=(latent, n_genes))
    meta = StoreMeta(dataset="demo", genes=[f"G{g}" for g in range(n_genes)], backbone="synthetic", weights="none",
                     weights_sha256="0" * 64, feature_shape=SHAPE, neighbors_k=9, views=views)
    test = folds("demo", SAMPLES)[0].test
    with EmbeddingStore.open_for_writing(path, meta) as store:
        for sample in SAMPLES:
            grid_xy, z = smooth_latent(rng, (10, 8), latent, 0.3)
            maps = np.einsum("nl,lchw->nchw", z, patterns) + 0.3 * rng.normal(size=(len(z), *SHAPE))
            if turned_test and sample in test:
                pose = rng.integers(0, 8, len(maps))
                maps = np.stack([turn_maps(maps[i:i + 1], int(pose[i]))[0] for i in range(len(maps))])
            counts = rng.poisson(np.exp(1.5 + z @ mixing)).astype(np.float32)
            other = None
            if views > 1:
                other = np.stack([maps if same_views else turn_maps(maps, v) for v in range(1, views)], axis=1)
            write_spots(store, sample, maps, counts, grid_xy, grid_xy * 100.0 + 50.0, views=other)
    return path


def config(*extra):
    return load_config(None, [*SMALL, *extra])


def test_fold_spots_draw_a_view_per_spot_and_gather_it(tmp_path):
    store = EmbeddingStore.open(build_store(tmp_path / "s.zarr", views=8))
    ids = folds("demo", SAMPLES)[0]
    spots = FoldSpots.load(store, {"train": ids.train, "val": [], "test": ids.test}, views=True)
    assert spots.views.shape == (len(spots.features), 7, *SHAPE)
    assert torch.equal(spots.view_of, torch.zeros(len(spots.features), dtype=torch.int64))
    spots.draw_views(torch.Generator().manual_seed(1))
    drawn = spots.view_of.clone()
    assert set(drawn.tolist()) == set(range(8))                        # every view, identity included
    spots.draw_views(torch.Generator().manual_seed(1))
    assert torch.equal(spots.view_of, drawn)                             # seeded
    rows = torch.arange(0, len(drawn), 7)
    query = spots.query_maps(rows)
    for i, row in enumerate(rows.tolist()):
        v = int(drawn[row])
        assert torch.equal(query[i], spots.features[row] if v == 0 else spots.views[row, v - 1])
    # without augmentation the views are not even loaded
    assert FoldSpots.load(store, {"train": ids.train, "val": [], "test": ids.test}).views is None


def test_identical_views_or_augment_off_train_exactly_as_one_view(tmp_path):
    one = train_fold(build_store(tmp_path / "a" / "s.zarr", views=1), 0, config(), tmp_path / "runs-a",
                     show_progress=False)
    same = train_fold(build_store(tmp_path / "b" / "s.zarr", views=8, same_views=True), 0, config(),
                      tmp_path / "runs-b", show_progress=False)
    off = train_fold(build_store(tmp_path / "c" / "s.zarr", views=8), 0, config("TRAINING.augment=false"),
                     tmp_path / "runs-c", show_progress=False)
    for name in ("pcc_mean", "mse", "R"):
        assert same[name] == pytest.approx(one[name], abs=1e-6) and off[name] == pytest.approx(one[name], abs=1e-6)


def test_views_teach_a_model_to_read_turned_tissue(tmp_path):
    """Known signal: training slides are upright, test spots are turned; only the views show turned tissue."""
    store = build_store(tmp_path / "s.zarr", views=8, turned_test=True)
    plain = train_fold(store, 0, config("TRAINING.augment=false"), tmp_path / "plain", show_progress=False)
    augmented = train_fold(store, 0, config(), tmp_path / "augmented", show_progress=False)
    assert augmented["pcc_mean"] > plain["pcc_mean"] + 0.15, (augmented["pcc_mean"], plain["pcc_mean"])
    assert augmented["mse"] < plain["mse"]
