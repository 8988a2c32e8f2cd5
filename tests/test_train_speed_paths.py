"""The sync-free training paths compute what the per-batch `torch.unique` loop computed.

The reference functions below are the training step and the inference loop as they were before
batches were planned on the host (nh2st 13738a4), kept here to compare against.
"""

import math

import numpy as np
import pytest
import torch

from nh2st import metrics
from nh2st.config import load_config
from nh2st.errors import NH2STError
from nh2st.model import NH2ST, nh2st_loss, plan_batches
from nh2st.neighbors import knn_index
from nh2st.predictor import Predictor
from nh2st.training import FoldSpots
from nh2st.training.loop import make_optimizer, train_epoch
from nh2st.training.monitor import monitor_scores, validation_scores
from nh2st.training.step import TrainStep, resolve_step_mode

torch.set_num_threads(2)

SHAPE = (8, 3, 3)
N_GENES = 60
SMALL = ["MODEL.emb_dim=16", "MODEL.num_heads1=4", "MODEL.hypergraph_dim=24", "MODEL.decoder_dim=12",
         "MODEL.dropout1=0.2", "TRAINING.batch_size=16", "TRAINING.eval_batch_size=32", "TRAINING.learning_rate=0.003"]


def reference_epoch(net, spots, rows, optimizer, cfg):
    """The pre-change train_epoch: torch.unique per batch, loss summed on the device."""
    operator = spots.operator if cfg.MODEL.neighbor_branch else None
    loss_sum = torch.zeros(())
    for batch in rows.split(cfg.TRAINING.batch_size):
        unique, local = torch.unique(spots.neighbors[batch], return_inverse=True)
        out = net(spots.features[unique], local, None if operator is None else operator[batch], spots.targets[unique])
        loss, _ = nh2st_loss(out, spots.targets[batch], cfg.MODEL)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def reference_predict(model, spots, rows, chunk):
    """The pre-change Predictor loop: per chunk, torch.unique of the neighbourhoods (or of the targets)."""
    model.eval()
    out = []
    for part in rows.split(chunk):
        wanted = spots.neighbors[part] if model.neighbors_at_inference else spots.neighbors[part][:, :1]
        unique, local = torch.unique(wanted, return_inverse=True)
        ops = spots.operator[part] if model.neighbors_at_inference else None
        out.append(model.predict(spots.features[unique], local, ops))
    return torch.cat(out)


def synthetic_fold(seed=0, n_slides=3, per_slide=45):
    rng = np.random.default_rng(seed)
    n = n_slides * per_slide
    xy = rng.random((n, 2)) * 1000
    slide = np.arange(n) // per_slide
    neighbors = np.concatenate([knn_index(xy[slide == s], 9) + s * per_slide for s in range(n_slides)])
    maps = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    targets = (maps.mean(axis=(2, 3)) @ rng.normal(size=(SHAPE[0], N_GENES))).astype(np.float32)
    targets[:, :3] = 1.0                                             # constant genes: NaN PCCs
    arrays = {"features": maps, "targets": targets, "neighbors": neighbors, "sample_index": slide.astype(np.int32)}
    return FoldSpots.from_arrays(arrays, {"train": ["S0", "S1"], "val": ["S2"]}, "cpu", 3)


def twin_models(cfg, spots):
    models = []
    for _ in range(2):
        torch.manual_seed(7)
        model = NH2ST.from_config(cfg.MODEL, N_GENES, SHAPE)
        if model.input_norm != "none":
            model.set_feature_stats(spots.features[spots.split["train"]])
        models.append(model.train())
    return models


VARIANTS = [[], ["MODEL.predict_from=query+neighbors"], ["MODEL.neighbor_branch=false"], ["MODEL.input_norm=channel"]]


@pytest.mark.parametrize("extra", VARIANTS, ids=["paper", "query+neighbors", "no-neighbor-branch", "input-norm"])
def test_same_seed_trains_to_the_same_model_and_scores_as_the_unique_loop(extra):
    cfg = load_config(None, [*SMALL, *extra])
    spots = synthetic_fold()
    new, old = twin_models(cfg, spots)
    new_opt, old_opt = make_optimizer(new, cfg.TRAINING), make_optimizer(old, cfg.TRAINING)
    step = TrainStep(new, spots, new_opt, cfg)
    assert step.mode == "eager"
    train = spots.split["train"]
    for epoch in range(3):                                          # the last batch is short: 90 = 5 x 16 + 10
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        torch.manual_seed(100 + epoch)                              # the same dropout masks for both
        new_loss, steps = train_epoch(new, spots, train[order], new_opt, cfg, step=step)
        torch.manual_seed(100 + epoch)
        old_loss = reference_epoch(old, spots, train[order], old_opt, cfg)
        assert steps == math.ceil(len(train) / cfg.TRAINING.batch_size)
        torch.testing.assert_close(new_loss, old_loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)

    genes = [f"g{i}" for i in range(N_GENES)]
    val = spots.split["val"]
    predictor = Predictor("nh2st", genes, cfg, SHAPE, model=new, device="cpu")
    predicted = predictor.predict_tensor(spots.features, spots.host("neighbors"), spots.host("val"), spots.operator)
    reference = reference_predict(old, spots, val, cfg.TRAINING.eval_batch_size)
    torch.testing.assert_close(predicted, reference, rtol=1e-4, atol=1e-5)
    hvg = metrics.hvg_indices(spots.targets[train].numpy())
    expected = metrics.score(reference.numpy(), spots.targets[val].numpy(), genes, hvg)
    got = validation_scores(predictor, spots, "val", hvg)
    for key in ("mse", "pcc_mean", "R", "hvg50_pcc"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    assert expected["n_nan_genes"] == 3


def test_a_plan_is_torch_unique_of_each_batch_and_padding_is_never_referenced():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(3, 50, (1,), generator=gen))
        k = int(torch.randint(1, 6, (1,), generator=gen))
        table = torch.randint(0, n, (n, k), generator=gen)
        table[:, 0] = torch.arange(n)
        rows = torch.randperm(n, generator=gen)[:int(torch.randint(1, n + 1, (1,), generator=gen))]
        size = int(torch.randint(1, 10, (1,), generator=gen))
        for with_neighbors in (True, False):
            groups = plan_batches(table, rows, size, with_neighbors)
            planned = [(g, i) for g in groups for i in range(len(g))]
            assert [len(g.rows[0]) for g in groups] == sorted({len(b) for b in rows.split(size)}, reverse=True)
            for (g, i), batch in zip(planned, rows.split(size), strict=True):
                wanted = table[batch] if with_neighbors else batch[:, None]
                unique, inverse = torch.unique(wanted, return_inverse=True)
                count = int(g.counts[i])
                assert torch.equal(g.rows[i], batch)
                assert torch.equal(g.gather[i, :count], unique) and torch.equal(g.local[i], inverse)
            widths = {g.size: g.width + 5 for g in groups}
            for g in plan_batches(table, rows, size, with_neighbors, widths):
                assert g.width == widths[g.size]
                for i in range(len(g)):
                    assert int(g.local[i].max()) < g.counts[i]                   # padding is never read
                    assert torch.equal(g.gather[i][g.local[i]], (table[g.rows[i]] if with_neighbors
                                                                  else g.rows[i][:, None]))


def test_padded_fixed_width_batches_give_the_same_step():
    """The CUDA graph path gathers a fixed number of rows per batch; padding changes nothing."""
    cfg = load_config(None, [*SMALL, "MODEL.dropout1=0.0", "MODEL.predict_from=query+neighbors"])
    spots = synthetic_fold(seed=1)
    rows = spots.split["train"][:32]
    results = []
    for pad in (0, 11):
        torch.manual_seed(3)
        model = NH2ST.from_config(cfg.MODEL, N_GENES, SHAPE).train()
        optimizer = make_optimizer(model, cfg.TRAINING)
        step = TrainStep(model, spots, optimizer, cfg)
        (group,) = plan_batches(spots.neighbors, rows, 16)
        group = group.padded(group.width + pad)
        for i in range(len(group)):
            step.step(group.rows[i], group.gather[i], group.local[i])
        results.append((step.loss_sum.clone(), [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n_spots", [1, 2, 40])
def test_device_monitor_equals_nh2st_metrics(n_spots):
    rng = np.random.default_rng(n_spots)
    genes = [f"g{i}" for i in range(70)]
    true = rng.normal(size=(n_spots, 70))
    pred = true * 0.5 + rng.normal(size=true.shape)
    true[:, 5] = 2.0                                               # constant truth
    pred[:, 9] = -1.0                                              # constant prediction
    hvg = np.arange(0, 70, 2)[:50]
    expected = metrics.score(pred, true, genes, hvg)
    got = monitor_scores(torch.tensor(pred, dtype=torch.float32), torch.tensor(true, dtype=torch.float32), hvg)
    for key in ("mse", "pcc_mean", "R", "hvg50_pcc"):
        if expected[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_step_mode_is_eager_off_cuda_and_can_be_forced(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_step_mode("auto", cpu, 1) == "eager"
    assert resolve_step_mode("auto", torch.device("cuda", 0), 1) == "graph"
    assert resolve_step_mode("auto", torch.device("cuda", 0), 2) == "eager"          # DDP steps eagerly
    monkeypatch.setenv("NH2ST_STEP", "eager")
    assert resolve_step_mode("auto", torch.device("cuda", 0), 1) == "eager"
    with pytest.raises(NH2STError, match="CUDA"):
        resolve_step_mode("graph", cpu, 1)
    monkeypatch.setenv("NH2ST_STEP", "fast")
    with pytest.raises(NH2STError, match="NH2ST_STEP"):
        resolve_step_mode("auto", cpu, 1)


# ---- folds sharing one device -------------------------------------------------------------------------------
def test_two_folds_on_one_device_give_the_results_of_one_fold_at_a_time(tmp_path):
    from test_training import build_store, small_config
    from nh2st.training import train_folds

    store = build_store(tmp_path / "synth.zarr", grid=(8, 6))
    cfg = small_config("TRAINING.num_epochs=2", "TRAINING.batch_size=32")
    together = train_folds(store, "all", cfg, tmp_path / "together", devices=["cpu"], folds_per_device=2,
                           show_progress=False)
    alone = train_folds(store, "all", cfg, tmp_path / "alone", devices=["cpu"], show_progress=False)
    assert [r["fold"] for r in together] == [r["fold"] for r in alone] == [0, 1, 2]
    for a, b in zip(together, alone):
        assert a["best_epoch"] == b["best_epoch"]
        for key in ("R", "pcc_mean", "mse", "mae"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["fold"], key)


def test_fold_slots_come_from_the_fold_footprint_and_free_memory(tmp_path, monkeypatch):
    from test_training import build_store
    from nh2st.training import parallel

    store = build_store(tmp_path / "synth.zarr", grid=(8, 6))
    small = load_config(None, SMALL)
    paper = load_config(None, [])
    fold = ["DEMO1", "DEMO2", "DEMO3", "DEMO4"]
    footprint = parallel.fold_footprint(store, small, fold)
    assert parallel.fold_footprint(store, small, fold + ["DEMO5", "DEMO6"]) > footprint           # more spots
    assert parallel.fold_footprint(store, load_config(None, [*SMALL, "TRAINING.batch_size=512"]), fold) > footprint
    n_params = sum(p.numel() for p in NH2ST.from_config(paper.MODEL, 24, (16, 4, 4)).parameters())
    assert parallel.fold_footprint(store, paper, fold) > n_params * 16 + parallel.CUDA_PROCESS_BYTES  # weights, Adam

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(7e9), int(80e9)))
    assert parallel.folds_per_device(cuda, int(3e9), n_folds=3) == 2                  # 0.9 x 7 GB / 3 GB
    assert parallel.folds_per_device(cuda, int(1e9), n_folds=3) == 3                  # never more than the folds
    assert parallel.folds_per_device(cuda, int(9e9), n_folds=3) == 1                  # at least one
    assert parallel.folds_per_device(torch.device("cpu"), int(1e6), n_folds=3) == 1   # a CPU's cores are the limit
    assert parallel.folds_per_device(torch.device("cpu"), int(1e6), n_folds=3, per_device=2) == 2
    slots = parallel.fold_slots(store, [0, 1, 2], small, [torch.device("cpu"), torch.device("cpu", 1)], "paper",
                                None, "default", "nh2st", per_device=2)
    assert slots == ["cpu", "cpu:1", "cpu", "cpu:1"]                                  # spread over the devices first
