import pytest

from nh2st.config import load_config, save_config
from nh2st.errors import NH2STError


def test_overrides_and_nested_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("TRAINING:\n  num_epochs: 3\n  early_stopping:\n    patience: 2\nMODEL:\n  dropout1: 0.1\n")
    cfg = load_config(path, ["TRAINING.num_epochs=50", "MODEL.predict_from=query+neighbors",
                             "TRAINING.early_stopping.monitor=loss"])
    assert cfg.TRAINING.num_epochs == 50
    assert cfg.TRAINING.early_stopping.patience == 2 and cfg.TRAINING.early_stopping.monitor == "loss"
    assert cfg.MODEL.dropout1 == 0.1 and cfg.MODEL.predict_from == "query+neighbors"
    assert cfg.MODEL.temperature1 == 0.05  # paper default kept
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").to_dict() == cfg.to_dict()


def test_unknown_key_and_bad_override_are_clear_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("TRAINING:\n  num_epoch: 3\n")
    with pytest.raises(NH2STError, match=r"TRAINING.*num_epoch.*valid keys"):
        load_config(path)
    with pytest.raises(NH2STError, match="SECTION.key=value"):
        load_config(None, ["num_epochs=3"])
    with pytest.raises(NH2STError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["stnet", "skin", "pcw", "mouse", "int", "zen"])
def test_shipped_configs_hold_the_papers_settings(name):
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    t, m, d = config.TRAINING, config.MODEL, config.DATASET
    assert (config.GENERAL.seed, t.batch_size, t.learning_rate, t.num_epochs, t.optimizer) == (2021, 8, 5e-4, 200, "adam")
    assert (t.early_stopping.monitor, t.early_stopping.patience) == ("R", 20)
    assert (t.lr_scheduler.step_size, t.lr_scheduler.gamma) == (50, 0.9)
    assert (m.emb_dim, m.depth1, m.num_heads1, m.mlp_ratio1, m.dropout1) == (512, 1, 8, 1.0, 0.5)
    assert (m.temperature1, m.temperature2, m.loss_ratio1, m.loss_ratio2) == (0.05, 0.05, 1.0, 0.5)
    assert (m.predict_from, m.neighbor_branch, m.input_norm) == ("query", True, "none")
    assert (d.num_neighbors, d.radius, d.fold_scheme) == (9, 224, "paper")


@pytest.mark.parametrize("override, message", [
    ("TRAINING.num_epochs=ten", r"The 'TRAINING.num_epochs' parameter of --set must be an int in the range \[1, inf\). "
                                r"Got 'ten' instead."),
    ("TRAINING.num_epochs=2.5", r"'TRAINING.num_epochs' .* must be an int"),
    ("TRAINING.learning_rate=0", r"'TRAINING.learning_rate' .* must be a float in the range \(0, inf\)\. Got 0"),
    ("TRAINING.val_fraction=1", r"'TRAINING.val_fraction' .* range \[0, 1\)"),
    ("MODEL.neighbor_branch=yes please", r"'MODEL.neighbor_branch' .* must be a bool"),
    ("TRAINING.early_stopping.monitor=acc", r"'TRAINING.early_stopping.monitor' .* among \{'R', 'pcc', 'loss'\}"),
    ("TRAINING.early_stopping.mode=max", None),
    ("DATASET.fold_scheme=kfold:1", r"'DATASET.fold_scheme' .* one of paper, patient, patient:K, kfold:K, loo"),
    ("MODEL.num_heads1=7", r"MODEL.emb_dim=512 must be divisible by MODEL.num_heads1=7"),
])
def test_values_are_validated_when_loaded(override, message):
    if message is None:   # an explicit mode that matches the monitor is fine; one that contradicts it is not
        assert load_config(None, [override]).TRAINING.early_stopping.mode == "max"
        with pytest.raises(NH2STError, match="set mode: min"):
            load_config(None, [override, "TRAINING.early_stopping.monitor=loss"])
        return
    with pytest.raises(NH2STError, match=message):
        load_config(None, [override])


def test_removed_keys_are_refused_in_files_but_old_checkpoints_still_load(tmp_path):
    from nh2st.config import config_from_checkpoint

    path = tmp_path / "old.yaml"
    path.write_text("GENERAL:\n  log_path: runs\nDATASET:\n  fold_scheme: patient\n")
    with pytest.raises(NH2STError, match=r"GENERAL.log_path was removed because it did nothing \(runs land in --runs-dir\)"):
        load_config(path)
    old = {"GENERAL": {"seed": 3, "log_path": "runs"}, "TRAINING": {"num_k": 3, "loss": "MSE", "num_epochs": 4},
           "MODEL": {"name": "NH2ST", "res_neighbor": [5, 5], "dropout1": 0.2},
           "DATASET": {"type": "zen", "data_dir": "data", "gene_list": "ZEN", "num_neighbors": 9, "radius": 224,
                       "fold_scheme": "patient"}}
    cfg = config_from_checkpoint(old)
    assert (cfg.GENERAL.seed, cfg.TRAINING.num_epochs, cfg.MODEL.dropout1, cfg.DATASET.fold_scheme) == (3, 4, 0.2, "patient")


def test_every_config_key_is_read_by_some_code():
    """A key that no module reads is a key that silently does nothing."""
    import dataclasses
    import re
    from pathlib import Path

    from nh2st.config import Config

    root = Path(__file__).parents[1]
    code = "\n".join(p.read_text() for p in [*(root / "nh2st").rglob("*.py"), *(root / "cli").rglob("*.py")]
                     if p.name != "config.py")

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.name
    acts_while_loading = {"MODEL.preset"}      # picks the recipe keys' defaults in load_config (tested there)
    unread = [key for key, name in keys(Config()) if not re.search(rf"\.{name}\b", code)]
    assert sorted(unread) == sorted(acts_while_loading)
