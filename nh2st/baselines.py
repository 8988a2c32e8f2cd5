"""Baselines on the same cache: the per-gene training mean, HEST-Bench's ridge and an MLP probe on pooled features.

The mean and ridge are affine maps of the pooled 512-d feature (the ResNet's global average pool
of the stored 512x7x7 map), so both are stored and applied as one `LinearBaseline(weight, bias)`.
The MLP probe (`MLPProbe`) is the non-linear counterpart: one hidden layer on the standardised
pooled vector. It tells whether NH²2ST's gain over ridge needs the map and the neighbours or only
a non-linearity.

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


@dataclass
class MLPProbe:
    """prediction = relu(((pooled - mean) / std) @ w1 + b1) @ w2 + b2. pooled (N, C) -> (N, G)."""

    kind: str
    params: dict            # mean (C,), std (C,), w1 (C, H), b1 (H,), w2 (H, G), b2 (G,) float32

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        p = {k: v.to(pooled.device) for k, v in self.params.items()}
        hidden = torch.relu(((pooled.float() - p["mean"]) / p["std"]) @ p["w1"] + p["b1"])
        return hidden @ p["w2"] + p["b2"]

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.params.items()}

    @classmethod
    def from_state(cls, kind: str, state: dict) -> "MLPProbe":
        return cls(kind, {k: v.float() for k, v in state.items()})


# Chosen on the demo's validation slides (`python benchmarks/quality.py --tune-mlp`), never on a test fold:
# heavy dropout on the hidden layer mattered most (validation PCC 0.365 at 0.2, 0.445 at 0.9).
MLP_HIDDEN, MLP_EPOCHS, MLP_BATCH, MLP_LR, MLP_WEIGHT_DECAY, MLP_DROPOUT = 256, 60, 128, 1e-3, 1e-1, 0.9


def fit_mlp(pooled: np.ndarray, targets: np.ndarray, seed: int = 0, hidden: int = MLP_HIDDEN,
            epochs: int = MLP_EPOCHS, batch_size: int = MLP_BATCH, lr: float = MLP_LR,
            weight_decay: float = MLP_WEIGHT_DECAY, dropout: float = MLP_DROPOUT) -> MLPProbe:
    """One hidden layer (ReLU, dropout) trained with AdamW on MSE; output bias started at the mean; seeded."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(pooled, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    first, last = torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, y.shape[1])
    with torch.no_grad():
        for layer in (first, last):
            bound = 1 / layer.in_features ** 0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
        last.bias.copy_(y.mean(0))
    net = torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Dropout(dropout), last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)      # dropout masks
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(batch_size):
                loss = torch.nn.functional.mse_loss(net(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    params = {"mean": mean, "std": std, "w1": first.weight.detach().T.contiguous(), "b1": first.bias.detach(),
              "w2": last.weight.detach().T.contiguous(), "b2": last.bias.detach()}
    return MLPProbe("mlp", {k: v.clone() for k, v in params.items()})


def fit_baseline(kind: str, pooled: np.ndarray, targets: np.ndarray, seed: int = 0) -> LinearBaseline | MLPProbe:
    if kind == "mean":
        return fit_mean(pooled, targets)
    if kind == "ridge":
        return fit_ridge(pooled, targets, seed=seed)
    if kind == "mlp":
        return fit_mlp(pooled, targets, seed=seed)
    raise ValueError(f"unknown baseline {kind!r}; one of {', '.join(BASELINES)}")


def baseline_from_state(kind: str, state: dict) -> LinearBaseline | MLPProbe:
    """A fitted baseline back from its checkpoint state."""
    return (MLPProbe if kind == "mlp" else LinearBaseline).from_state(kind, state)
