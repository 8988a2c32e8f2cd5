"""One Predictor: a trained NH²2ST model or baseline that maps cached feature maps to expression.

    predictor = Predictor.load("runs/demo/fold-0")
    values = predictor.predict(features, neighbors)          # (N, C, H, W), (N, k) -> (N, G)

Training's validation, `nh2st eval`, `nh2st predict` and `nh2st plot` all predict through it, so
a spot gets the same value whichever path asks. Inputs are maps and the neighbour index only:
expression has no way in.

Under torch.distributed the rows are cut into fixed chunks, rank r computes chunks r, r + world,
... and the chunks are gathered, so a prediction does not depend on the number of processes.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nh2st.baselines import LinearBaseline, MLPProbe, baseline_from_state, pool
from nh2st.config import Config, config_from_checkpoint
from nh2st.devices import resolve_device
from nh2st.errors import NH2STError
from nh2st.expression import TARGET_RANGE
from nh2st.model import NH2ST, plan_batches
from nh2st.runs import CHECKPOINT, RUN_JSON, load_checkpoint, read_info


def autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA; CPU runs in float32 (bf16 matmuls are slower there).

    cache=False recasts weights at every use (required inside a CUDA graph capture; same values).
    """
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache) if device.type == "cuda" else nullcontext()


def feature_dtype(device: torch.device) -> torch.dtype:
    """Maps live in float16 on CUDA (as stored) and float32 on CPU (fp16 matmuls are slow there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Predictor:
    """``predict(features, neighbors, rows) -> (len(rows), G)`` from feature maps only.

    kind: nh2st | mean | ridge | mlp; genes: the output columns; config: the run's Config;
    info: the run's RunInfo (None for a model that is still training).
    """

    def __init__(self, kind: str, genes: list[str], config: Config, feature_shape, model: NH2ST | None = None,
                 baseline: LinearBaseline | MLPProbe | None = None, device="cpu", batch_size: int | None = None, info=None):
        self.kind, self.genes, self.config, self.info = kind, list(genes), config, info
        self.feature_shape = tuple(feature_shape)
        self.model, self.baseline = model, baseline
        self.device = torch.device(device)
        self.batch_size = batch_size or config.TRAINING.eval_batch_size

    @property
    def meta(self) -> dict:
        """The run's run.json as a dict ({} for a model in training)."""
        return self.info.to_dict() if self.info is not None else {}

    @classmethod
    def load(cls, fold_dir, device="cpu") -> "Predictor":
        """The selected checkpoint of a fold folder (NH²2ST or a baseline)."""
        fold_dir = Path(fold_dir)
        ckpt = load_checkpoint(fold_dir / CHECKPOINT)
        info = read_info(fold_dir) if (fold_dir / RUN_JSON).is_file() else None
        cfg = config_from_checkpoint(ckpt["config"], f"{fold_dir / CHECKPOINT} config")
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        kind, genes, shape = ckpt["model_kind"], ckpt["genes"], ckpt["feature_shape"]
        if kind == "nh2st":
            model = NH2ST.from_config(cfg.MODEL, len(genes), shape)
            model.load_state_dict(ckpt["model"])
            return cls(kind, genes, cfg, shape, model=model.to(device).eval(), device=device, info=info)
        return cls(kind, genes, cfg, shape, baseline=baseline_from_state(kind, ckpt["model"]), device=device,
                   info=info)

    def _check(self, features: torch.Tensor, neighbors: torch.Tensor) -> None:
        if tuple(features.shape[1:]) != self.feature_shape:
            raise NH2STError(f"features of shape {tuple(features.shape)} do not match the run's "
                             f"(N, {', '.join(map(str, self.feature_shape))}); use a store made like the training one")
        index = neighbors.numpy()            # on the host (predict_tensor), so this never waits on a device
        if len(neighbors) != len(features) or (index.size and not 0 <= index.min() <= index.max() < len(features)):
            raise NH2STError(f"neighbors {tuple(neighbors.shape)} must have one row per spot ({len(features)}) "
                             "and index rows of features")

    @torch.no_grad()
    def predict_tensor(self, features, neighbors, rows=None, operator=None) -> torch.Tensor:
        """(len(rows), G) float32 on the predictor's device.

        features (N, C, H, W) maps of every spot (tensor or array, any float dtype, any device);
        neighbors (N, k) rows of `features`, self first; rows: the spots to predict (default all);
        operator (N, k, k): precomputed hypergraph operators (else computed from the maps if needed).
        The chunks are planned on the host (pass host `neighbors` and `rows` to avoid copying them
        back) and their index tensors sent to the maps' device once; no chunk waits on the device.
        """
        features = torch.as_tensor(features)
        neighbors = torch.as_tensor(neighbors).long().cpu()
        self._check(features, neighbors)
        rows = torch.arange(len(features)) if rows is None else torch.as_tensor(rows).long().cpu()
        rank, world = _rank_world()
        chunks = rows.split(self.batch_size)
        dtype = feature_dtype(self.device)
        mine = []
        if self.baseline is not None:
            for chunk in chunks[rank::world]:
                pooled = pool(features[chunk.to(features.device)].to(self.device))
                mine.append(self.baseline.predict(pooled).float())
        else:
            model = self.model.eval()
            plan = [group.to(features.device, non_blocking=True)
                    for group in plan_batches(neighbors, rows, self.batch_size, model.neighbors_at_inference)]
            batches = [(group, i) for group in plan for i in range(len(group))]      # one per chunk, in order
            for group, i in batches[rank::world]:
                maps = features[group.gather[i, :int(group.counts[i])]].to(self.device, dtype)
                ops = None
                if operator is not None and model.neighbors_at_inference:
                    ops = operator[group.rows[i].to(operator.device)].to(self.device)
                with autocast(self.device):
                    mine.append(model.predict(maps, group.local[i].to(self.device), ops).float())
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, [m.cpu() for m in mine])
            mine = [gathered[i % world][i // world].to(self.device) for i in range(len(chunks))]
        if not mine:
            return torch.zeros((0, len(self.genes)), device=self.device)
        out = torch.cat(mine)
        if self.model is not None and self.config.MODEL.clip_output:
            out = out.clamp_(*TARGET_RANGE)    # no target lies outside it (nh2st.expression)
        return out

    def predict(self, features, neighbors, rows=None, operator=None) -> np.ndarray:
        """As predict_tensor, as a float32 numpy array on the host."""
        return self.predict_tensor(features, neighbors, rows, operator).cpu().numpy()
