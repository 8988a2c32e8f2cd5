"""A fold's data: which samples train, validate and test, and their spots as device tensors.

The whole fold sits in device memory (`FoldSpots`); batches are planned on the host a pass at a
time (nh2st.model.batching) and their rows gathered on the device. No DataLoader, no Python per spot.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from nh2st.config import Config
from nh2st.errors import NH2STError
from nh2st.model.hypergraph import neighborhood_operators
from nh2st.predictor import feature_dtype
from nh2st.splits import KNOWN_SAMPLES, Fold, folds as dataset_folds, patients_from_store
from nh2st.store import EmbeddingStore, load_spots

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class FoldSpots:
    """One fold's spots as device tensors; a split is an index tensor of rows."""

    features: torch.Tensor         # (N, C, H, W) float16 on CUDA, float32 on CPU
    targets: torch.Tensor          # (N, G) float32
    neighbors: torch.Tensor        # (N, k) int64 rows of this table, self first
    operator: torch.Tensor | None  # (N, k, k) hypergraph operator of each spot's neighbourhood
    split: dict                    # "train" / "val" / "test" -> (n,) int64 rows
    sample_index: torch.Tensor     # (N,) int64 position of each spot's sample in `sample_ids`
    sample_ids: list
    views: torch.Tensor | None = None     # (N, V-1, C, H, W) the maps of dihedral views 1..V-1 (extract --views V)
    view_of: torch.Tensor | None = None   # (N,) int64 the view each spot's query uses this epoch, 0 = `features`
    _host: dict = field(default_factory=dict, repr=False, compare=False)

    def draw_views(self, generator: torch.Generator) -> None:
        """A view per spot for the next epoch, drawn on the host; in place, so a captured step sees it."""
        drawn = torch.randint(0, self.views.shape[1] + 1, (len(self.view_of),), generator=generator)
        self.view_of.copy_(drawn, non_blocking=True)

    def query_maps(self, rows: torch.Tensor) -> torch.Tensor:
        """(b,) rows -> (b, C, H, W) their maps in this epoch's views."""
        view = self.view_of[rows]
        turned = self.views[rows, (view - 1).clamp(min=0)]
        return torch.where((view == 0).view(-1, 1, 1, 1), self.features[rows], turned)

    def host(self, name: str) -> torch.Tensor:
        """A CPU copy of `neighbors` or of a split's rows, made once: batches are planned on the host."""
        if name not in self._host:
            self._host[name] = (self.neighbors if name == "neighbors" else self.split[name]).cpu()
        return self._host[name]

    @classmethod
    def from_arrays(cls, arrays: dict, split_ids: dict, device="cpu", hyperedge_k: int | None = 3) -> "FoldSpots":
        """From `load_spots` output whose samples were loaded in split order (train, val, test).

        hyperedge_k=None skips the hypergraph operators (models without a neighbour branch). With a
        "views" array the targets' queries can be drawn from their views (`draw_views`, `query_maps`).
        """
        device = torch.device(device)
        sample_ids = [s for ids in split_ids.values() for s in ids]
        features = torch.from_numpy(np.ascontiguousarray(arrays["features"])).to(device=device,
                                                                                 dtype=feature_dtype(device))
        targets = torch.from_numpy(np.ascontiguousarray(arrays["targets"])).to(device=device, dtype=torch.float32)
        neighbors = torch.from_numpy(arrays["neighbors"].astype(np.int64)).to(device)
        sample_index = torch.from_numpy(arrays["sample_index"].astype(np.int64)).to(device)
        split, start = {}, 0
        for name, ids in split_ids.items():
            positions = torch.arange(start, start + len(ids), device=device)
            split[name] = torch.nonzero(torch.isin(sample_index, positions)).flatten()
            start += len(ids)
        operator = None if hyperedge_k is None else neighborhood_operators(features, neighbors, hyperedge_k)
        views = view_of = None
        if "views" in arrays:
            views = torch.from_numpy(np.ascontiguousarray(arrays["views"])).to(device=device, dtype=features.dtype)
            view_of = torch.zeros(len(features), dtype=torch.int64, device=device)
        return cls(features, targets, neighbors, operator, split, sample_index, sample_ids, views, view_of)

    @classmethod
    def load(cls, store: EmbeddingStore, split_ids: dict, device="cpu", hyperedge_k: int | None = 3,
             views: bool = False) -> "FoldSpots":
        """views: also load the store's other dihedral views, if it has them (training with TRAINING.augment)."""
        ids = [s for group in split_ids.values() for s in group]
        fields = ("features", "targets", "neighbors") + (("views",) if views and store.meta.views > 1 else ())
        arrays = load_spots(store, ids, fields=fields)
        return cls.from_arrays(arrays, split_ids, device, hyperedge_k)


def store_folds(store: EmbeddingStore, split: str = "paper", patients: dict[str, str] | None = None) -> list[Fold]:
    """The folds of `split` over the store's complete samples (patients: sample -> patient for the
    patient splits; default: the paper's datasets' known patients, for other stores what the readers
    recorded at extraction)."""
    if split.startswith("patient") and patients is None and store.meta.dataset not in KNOWN_SAMPLES:
        patients = patients_from_store(store) or None
    return dataset_folds(store.meta.dataset, store.sample_ids(), split, patients=patients)


def carve_validation(train_ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split training samples into (train, validation) by whole slides, seeded; fraction 0 -> no validation."""
    if fraction <= 0:
        return sorted(train_ids), []
    if len(train_ids) < 2:
        raise NH2STError(f"TRAINING.val_fraction={fraction}: a validation split needs whole slides but this fold "
                         f"has {len(train_ids)} training sample; set TRAINING.val_fraction=0 or use --protocol paper")
    n_val = min(len(train_ids) - 1, max(1, round(fraction * len(train_ids))))
    order = np.random.default_rng(seed).permutation(sorted(train_ids))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def fold_split_ids(fold: Fold, cfg: Config, protocol: str) -> tuple[dict, str | None]:
    """({"train", "val", "test"} sample ids, the split that selects the checkpoint or None)."""
    if protocol == "paper":
        return {"train": sorted(fold.train), "val": [], "test": sorted(fold.test)}, "test"
    train, val = carve_validation(fold.train, cfg.TRAINING.val_fraction, cfg.GENERAL.seed)
    return {"train": train, "val": val, "test": sorted(fold.test)}, ("val" if val else None)
