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
