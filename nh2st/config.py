"""Configuration as data: the paper's YAML keys (GENERAL, TRAINING, MODEL, DATASET) as dataclasses.

`load_config(path, overrides)` reads a YAML file from configs/, applies `--set SECTION.key=value`
overrides (values parsed as YAML), and refuses unknown sections or keys with a message that
lists the valid ones.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nh2st.errors import NH2STError


@dataclass
class General:
    seed: int = 2021
    log_path: str = "runs"


@dataclass
class EarlyStopping:
    monitor: str = "R"
    patience: int = 20
    mode: str = "max"


@dataclass
class LRScheduler:
    step_size: int = 50
    gamma: float = 0.9


@dataclass
class Training:
    num_k: int = 4
    batch_size: int = 8
    eval_batch_size: int = 1024
    loss: str = "MSE"
    optimizer: str = "adam"
    learning_rate: float = 5e-4
    num_epochs: int = 200
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    val_fraction: float = 0.15


@dataclass
class Model:
    name: str = "NH2ST"
    emb_dim: int = 512
    depth1: int = 1
    num_heads1: int = 8
    mlp_ratio1: float = 1.0
    dropout1: float = 0.5
    res_neighbor: list = field(default_factory=lambda: [5, 5])
    temperature1: float = 0.05
    temperature2: float = 0.05
    loss_ratio1: float = 1.0
    loss_ratio2: float = 0.5
    negative_weight: float = 0.1
    hyperedge_k: int = 3
    hypergraph_dim: int = 1024
    decoder_dim: int = 256
    predict_from: str = "query"
    neighbor_branch: bool = True
    input_norm: str = "none"


@dataclass
class Dataset:
    type: str = ""
    data_dir: str = ""
    gene_list: str = ""
    num_neighbors: int = 9
    radius: int = 224
    fold_scheme: str = ""


@dataclass
class Config:
    GENERAL: General = field(default_factory=General)
    TRAINING: Training = field(default_factory=Training)
    MODEL: Model = field(default_factory=Model)
    DATASET: Dataset = field(default_factory=Dataset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fill(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise NH2STError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise NH2STError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _fill(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "config") -> Config:
    return _fill(Config, data or {}, where)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Config from a YAML file (or the defaults if `path` is None) plus `SECTION.key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise NH2STError(f"{path}: config file not found; the shipped ones are in configs/")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise NH2STError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the file") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise NH2STError(f"--set {item!r}: expected SECTION.key=value, e.g. TRAINING.num_epochs=50")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return config_from_dict(data, str(path) if path else "config")


def save_config(config: Config, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
