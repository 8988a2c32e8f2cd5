"""Configuration as data: the paper's YAML sections (GENERAL, TRAINING, MODEL, DATASET) as dataclasses.

    cfg = load_config("configs/zen.yaml", ["TRAINING.num_epochs=50"])

Every key acts. `load_config` reads a YAML file, applies `--set SECTION.key=value` overrides
(values parsed as YAML) and validates every value before anything is written: unknown keys,
wrong types and values out of range are NH2STErrors in scikit-learn's style
("The 'TRAINING.num_epochs' parameter ... must be an int in the range [1, inf). Got 'ten' instead.").
Keys of the paper's config that no code here reads (REMOVED) are refused with the reason in a
user's file, and dropped silently from configs saved in old run folders and checkpoints, so those
still load (`config_from_checkpoint`).

Presets. `MODEL.preset` names a set of defaults for the training recipe's keys (PRESETS):
"paper" (the default) leaves every key as the released code has it; "nh2st+" is the recommended
recipe measured in benchmarks/quality.py (decoder started at the training mean, validation PCC
with an MSE tie-break, warm-up and cosine decay, clipped outputs; weight decay was measured and
left out: as Adam's L2 it cost validation PCC, decoupled (AdamW) it changed nothing). Precedence, lowest
first: built-in defaults, the preset, the YAML file, `--set`. A key written in the file or on the
command line always wins, so the paper's configs/<dataset>.yaml files keep their meaning and
`--set MODEL.preset=nh2st+` adds the recipe on top of them.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nh2st.errors import NH2STError
from nh2st.paper import NEIGHBORS_K, PATCH_SIZE

# Keys of the first build (and the paper's YAML) that nothing reads, with what to do instead.
REMOVED = {
    "GENERAL.log_path": "runs land in --runs-dir",
    "TRAINING.num_k": "the fold scheme sets the number of folds (DATASET.fold_scheme, e.g. kfold:5)",
    "TRAINING.loss": "the regression loss is the paper's MSE, always",
    "MODEL.name": "the model is NH²2ST (--model picks a baseline)",
    "MODEL.res_neighbor": "the paper's code never reads it; neighbours are DATASET.num_neighbors nearest spots",
    "DATASET.type": "the store records its dataset",
    "DATASET.data_dir": "give --data-root to `nh2st extract`",
    "DATASET.gene_list": "the store records its genes (`nh2st extract --genes`)",
}
MONITORS = {"R": ("val_R", "max"), "pcc": ("val_pcc", "max"), "loss": ("val_loss", "min")}
TIE_BREAKS = ("none", "mse")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("step", "cosine")
DECODER_INITS = ("default", "mean")
PREDICT_FROM = ("query", "query+neighbors")
INPUT_NORMS = ("none", "channel")


@dataclass
class General:
    seed: int = 2021


@dataclass
class EarlyStopping:
    monitor: str = "R"
    patience: int = 20
    mode: str = "auto"     # the monitor's own direction (max for R and pcc, min for loss); explicit must agree
    min_delta: float = 0.0     # a change of the monitor smaller than this is not an improvement
    tie_break: str = "none"    # mse: within min_delta of the best monitor value so far, lower validation MSE wins


@dataclass
class LRScheduler:
    name: str = "step"            # step: StepLR per epoch (the paper); cosine: cosine decay per optimizer step
    step_size: int = 50           # step only: epochs between decays
    gamma: float = 0.9            # step only: decay factor
    warmup_epochs: float = 0.0    # linear warm-up from 0 over this many epochs (per optimizer step), either schedule
    min_lr_ratio: float = 0.0     # cosine only: the last step's learning rate / learning_rate


@dataclass
class Training:
    batch_size: int = 8
    eval_batch_size: int = 1024
    optimizer: str = "adam"
    learning_rate: float = 5e-4
    num_epochs: int = 200
    weight_decay: float = 0.0      # adam: L2 in the gradient; adamw: decoupled; never on biases and norm weights
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    val_fraction: float = 0.15
    augment: bool = True           # a store made with --views V: each target spot's map is one of its V views, drawn per epoch


@dataclass
class Model:
    emb_dim: int = 512
    depth1: int = 1
    num_heads1: int = 8
    mlp_ratio1: float = 1.0
    dropout1: float = 0.5
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
    preset: str = "paper"          # paper | nh2st+: the defaults of the recipe keys (PRESETS)
    decoder_init: str = "default"  # mean: the decoder's output starts at the training targets' mean (output bias)
    clip_output: bool = False      # clip predictions to the target space's range (nh2st.expression.TARGET_RANGE)


@dataclass
class Dataset:
    fold_scheme: str = "paper"     # paper | patient | patient:K | kfold:K | loo (nh2st.splits); --split overrides
    num_neighbors: int = NEIGHBORS_K   # must equal the store's neighbour index width
    radius: int = PATCH_SIZE           # the patch side in pixels; must equal the store's patch size


@dataclass
class Config:
    GENERAL: General = field(default_factory=General)
    TRAINING: Training = field(default_factory=Training)
    MODEL: Model = field(default_factory=Model)
    DATASET: Dataset = field(default_factory=Dataset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- validation -------------------------------------------------------------------------------------------
INF = math.inf
# key -> (kind, low, high, low_open, high_open) for numbers; key -> tuple of choices or a regex for strings
RANGES = {
    "GENERAL.seed": ("int", 0, INF, False, False),
    "TRAINING.batch_size": ("int", 1, INF, False, False),
    "TRAINING.eval_batch_size": ("int", 1, INF, False, False),
    "TRAINING.learning_rate": ("float", 0, INF, True, False),
    "TRAINING.num_epochs": ("int", 1, INF, False, False),
    "TRAINING.early_stopping.patience": ("int", 0, INF, False, False),
    "TRAINING.early_stopping.min_delta": ("float", 0, INF, False, False),
    "TRAINING.weight_decay": ("float", 0, INF, False, False),
    "TRAINING.lr_scheduler.warmup_epochs": ("float", 0, INF, False, False),
    "TRAINING.lr_scheduler.min_lr_ratio": ("float", 0, 1, False, False),
    "TRAINING.lr_scheduler.step_size": ("int", 1, INF, False, False),
    "TRAINING.lr_scheduler.gamma": ("float", 0, 1, True, False),
    "TRAINING.val_fraction": ("float", 0, 1, False, True),
    "MODEL.emb_dim": ("int", 1, INF, False, False),
    "MODEL.depth1": ("int", 1, INF, False, False),
    "MODEL.num_heads1": ("int", 1, INF, False, False),
    "MODEL.mlp_ratio1": ("float", 0, INF, True, False),
    "MODEL.dropout1": ("float", 0, 1, False, True),
    "MODEL.temperature1": ("float", 0, INF, True, False),
    "MODEL.temperature2": ("float", 0, INF, True, False),
    "MODEL.loss_ratio1": ("float", 0, INF, False, False),
    "MODEL.loss_ratio2": ("float", 0, INF, False, False),
    "MODEL.negative_weight": ("float", 0, INF, False, False),
    "MODEL.hyperedge_k": ("int", 0, INF, False, False),
    "MODEL.hypergraph_dim": ("int", 1, INF, False, False),
    "MODEL.decoder_dim": ("int", 1, INF, False, False),
    "DATASET.num_neighbors": ("int", 1, INF, False, False),
    "DATASET.radius": ("int", 1, INF, False, False),
}
CHOICES = {
    "TRAINING.optimizer": OPTIMIZERS,
    "TRAINING.early_stopping.monitor": tuple(MONITORS),
    "TRAINING.early_stopping.mode": ("auto", "max", "min"),
    "TRAINING.early_stopping.tie_break": TIE_BREAKS,
    "TRAINING.lr_scheduler.name": LR_SCHEDULES,
    "MODEL.decoder_init": DECODER_INITS,
    "MODEL.predict_from": PREDICT_FROM,
    "MODEL.input_norm": INPUT_NORMS,
}
# MODEL.preset -> defaults of the recipe keys, as nested sections (see the module docstring)
PRESETS = {
    "paper": {},
    "nh2st+": {
        "TRAINING": {"early_stopping": {"monitor": "pcc", "min_delta": 0.005, "tie_break": "mse"},
                     "lr_scheduler": {"name": "cosine", "warmup_epochs": 1.0, "min_lr_ratio": 0.0}},
        "MODEL": {"decoder_init": "mean", "clip_output": True},
    },
}
CHOICES["MODEL.preset"] = tuple(PRESETS)


def _invalid(key: str, where: str, expected: str, value) -> NH2STError:
    return NH2STError(f"The '{key}' parameter of {where} must be {expected}. Got {value!r} instead.")


def _interval(low, high, low_open, high_open) -> str:
    return f"{'(' if low_open else '['}{low}, {'inf' if high == INF else high}{')' if high_open or high == INF else ']'}"


def _check_value(key: str, value, where: str):
    """The value, coerced where lossless (an int for a float key); NH2STError otherwise."""
    if key in RANGES:
        kind, low, high, low_open, high_open = RANGES[key]
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "int" and not (numeric and float(value).is_integer()):
            raise _invalid(key, where, f"an int in the range {_interval(low, high, low_open, high_open)}", value)
        if not numeric or not math.isfinite(value):
            raise _invalid(key, where, f"a float in the range {_interval(low, high, low_open, high_open)}", value)
        value = int(value) if kind == "int" else float(value)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise _invalid(key, where, f"a{'n int' if kind == 'int' else ' float'} in the range "
                           f"{_interval(low, high, low_open, high_open)}", value)
        return value
    if key == "DATASET.fold_scheme":
        from nh2st.splits import SPLITS, parse_split

        try:
            parse_split(value if isinstance(value, str) else repr(value))
        except NH2STError:
            raise _invalid(key, where, f"one of {', '.join(SPLITS)}", value) from None
        return value
    if key in CHOICES:
        choices = CHOICES[key]
        if value not in choices:
            raise _invalid(key, where, f"a str among {{{', '.join(repr(c) for c in choices)}}}", value)
        return value
    return value


def _check_bool(key: str, value, where: str):
    if not isinstance(value, bool):
        raise _invalid(key, where, "a bool (true or false)", value)
    return value


def _fill(cls, values: dict, where: str, prefix: str, legacy: bool):
    if not isinstance(values, dict):
        raise NH2STError(f"{where}: {prefix or 'the config'} must be a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if key in REMOVED:
            if legacy:
                continue
            raise NH2STError(f"{where}: {key} was removed because it did nothing ({REMOVED[key]}); delete it")
        if name not in fields:
            raise NH2STError(f"{where}: unknown key {key}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                             f"{', '.join(fields)}")
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _fill(type(default), value, where, f"{key}.", legacy)
        elif isinstance(default, bool):
            kwargs[name] = _check_bool(key, value, where)
        else:
            kwargs[name] = _check_value(key, value, where)
    return cls(**kwargs)


def validate(cfg: Config, where: str = "config") -> Config:
    """Checks that tie several keys together; returns cfg."""
    m, t = cfg.MODEL, cfg.TRAINING
    if m.emb_dim % m.num_heads1:
        raise NH2STError(f"{where}: MODEL.emb_dim={m.emb_dim} must be divisible by MODEL.num_heads1={m.num_heads1}")
    if m.predict_from == "query+neighbors" and not m.neighbor_branch:
        raise NH2STError(f"{where}: MODEL.predict_from=query+neighbors needs MODEL.neighbor_branch=true")
    natural = MONITORS[t.early_stopping.monitor][1]
    if t.early_stopping.mode not in ("auto", natural):
        raise NH2STError(f"{where}: TRAINING.early_stopping.mode={t.early_stopping.mode} with monitor "
                         f"{t.early_stopping.monitor}; set mode: {natural}")
    return cfg


def _under(defaults: dict, data: dict) -> dict:
    """`data` with `defaults` filled in where it has no key (nested sections merged); data wins."""
    merged = dict(defaults)
    for key, value in data.items():
        merged[key] = _under(defaults[key], value) if isinstance(value, dict) and isinstance(defaults.get(key), dict) \
            else value
    return merged


def with_preset(data: dict, where: str) -> dict:
    """The preset's recipe defaults under the user's keys (MODEL.preset, default paper)."""
    data = data or {}
    model = data.get("MODEL")
    preset = model.get("preset", "paper") if isinstance(model, dict) else "paper"
    _check_value("MODEL.preset", preset, where)
    return _under(PRESETS[preset], data)


def config_from_dict(data: dict, where: str = "config") -> Config:
    """A validated Config from nested dicts (a user's file: removed keys are refused)."""
    return validate(_fill(Config, with_preset(data, where), where, "", legacy=False), where)


def config_from_checkpoint(data: dict, where: str = "checkpoint config") -> Config:
    """A Config saved by any nh2st version: keys that were removed since are dropped."""
    return validate(_fill(Config, with_preset(data, where), where, "", legacy=True), where)


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
            if not isinstance(node, dict):
                raise NH2STError(f"--set {item!r}: {part} is a value, not a section")
        node[leaf] = yaml.safe_load(raw)
    where = f"{path}" + (" with --set" if overrides else "") if path else ("--set" if overrides else "config")
    return config_from_dict(data, where)


def save_config(config: Config, path: Path) -> None:
    from nh2st.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False)))


def default_config_path(dataset: str) -> Path | None:
    """configs/<dataset>.yaml in the working directory or next to the package, if present."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        path = root / "configs" / f"{dataset}.yaml"
        if path.is_file():
            return path
    return None


def resolve_config(dataset: str, config_path=None, overrides=()) -> tuple[Config, Path | None]:
    """The config for training on a `dataset` store: --config, else configs/<dataset>.yaml, else defaults; plus --set."""
    path = Path(config_path) if config_path else default_config_path(dataset)
    return load_config(path, overrides), path
