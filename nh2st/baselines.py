"""Baselines on the same cache: the per-gene training mean, and HEST-Bench's ridge on pooled features.

Both are affine maps of the pooled 512-d feature (the ResNet's global average pool of the stored
512x7x7 map), so both are stored and applied as one `LinearBaseline(weight, bias)`.

Ridge follows the HEST-Benchmark protocol: StandardScaler -> PCA(256) -> Ridge(solver="lsqr",
alpha = 100 / (n_components * n_genes)). HEST fits the ridge without intercept; the PCA scores
are centred on the training spots, so the coefficients are the same with or without one, and
fitting the intercept only adds the training mean: PCC is unchanged and MSE becomes meaningful.
"""

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler


from nh2st.runs import BASELINE_KINDS as BASELINES


def pool(features: torch.Tensor) -> torch.Tensor:
    """Global average pool of feature maps: (N, C, H, W) -> (N, C) float32."""
    return features.float().mean(dim=(2, 3))


@dataclass
class LinearBaseline:
    """prediction = pooled @ weight + bias. pooled (N, C) -> (N, G)."""

    kind: str
    weight: torch.Tensor    # (C, G) float32
    bias: torch.Tensor      # (G,) float32

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled.float() @ self.weight.to(pooled.device) + self.bias.to(pooled.device)

    def state_dict(self) -> dict:
        return {"weight": self.weight.cpu(), "bias": self.bias.cpu()}

    @classmethod
    def from_state(cls, kind: str, state: dict) -> "LinearBaseline":
        return cls(kind, state["weight"].float(), state["bias"].float())


def fit_mean(pooled: np.ndarray, targets: np.ndarray) -> LinearBaseline:
    """Predicts every gene's mean over the training spots, whatever the image."""
    mean = np.asarray(targets, dtype=np.float64).mean(0)
    return LinearBaseline("mean", torch.zeros(pooled.shape[1], len(mean)), torch.tensor(mean, dtype=torch.float32))


def fit_ridge(pooled: np.ndarray, targets: np.ndarray, n_components: int = 256, seed: int = 0) -> LinearBaseline:
    """HEST-Bench: StandardScaler + PCA(n_components) + Ridge, folded into one affine map."""
    x = np.asarray(pooled, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    scaler = StandardScaler().fit(x)
    pca = PCA(n_components=min(n_components, *x.shape), random_state=seed).fit(scaler.transform(x))
    scores = pca.transform(scaler.transform(x))
    ridge = Ridge(alpha=100.0 / (scores.shape[1] * y.shape[1]), solver="lsqr", fit_intercept=True,
                  random_state=seed).fit(scores, y)
    # z = ((x - mu) / sd - m) Cᵀ ; y = z coefᵀ + b  =>  y = x W + b'
    to_scores = pca.components_.T / scaler.scale_[:, None]                      # (C, n_components)
    weight = to_scores @ ridge.coef_.T                                          # (C, G)
    bias = ridge.intercept_ - (scaler.mean_ / scaler.scale_ + pca.mean_) @ pca.components_.T @ ridge.coef_.T
    return LinearBaseline("ridge", torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32))


def fit_baseline(kind: str, pooled: np.ndarray, targets: np.ndarray, seed: int = 0) -> LinearBaseline:
    if kind == "mean":
        return fit_mean(pooled, targets)
    if kind == "ridge":
        return fit_ridge(pooled, targets, seed=seed)
    raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(BASELINES)}")
