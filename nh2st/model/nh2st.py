"""NH²2ST heads on cached 512x7x7 feature maps (MICCAI 2025, arXiv 2506.23827).

Query branch: flattened map -> Linear(25088 -> 512) image embedding; expression encoder
Linear(G -> 512) -> Linear(512 -> 512), shared by the target and its neighbours.
Neighbour branch (k stored neighbours, self first): a per-spot hypergraph (see hypergraph.py),
two hypergraph convolutions 25088 -> 1024 -> 512 over the maps and 512 -> 1024 -> 512 over the
encoded neighbour expression, mean over nodes. One shared fusion block: image attends to
expression, then expression to the fused image; the same for the neighbour pair. The two fused
pairs feed the contrastive losses (losses.py).
Prediction: decoder Linear(512 -> 256) -> Linear(256 -> G), no non-linearity, from the query
image embedding alone ("paper mode"); with ``predict_from="query+neighbors"`` the decoder also
sees the neighbour *image* embedding. Expression never reaches the prediction: the decoder's
inputs are computed from maps only.
Input normalisation (beyond the paper, ``input_norm="channel"``): the paper fine-tunes its ResNet,
whose BatchNorm keeps the maps' scale in check; frozen maps arrive with whatever scale the trunk
gives, which sets the effective step of the 25088-wide first layers under Adam. "channel"
standardises each channel with the training spots' mean and std (buffers set by
``set_feature_stats`` and saved with the weights). Hyperedges always use the raw maps.
"""

import torch
from torch import nn

from nh2st.config import INPUT_NORMS, PREDICT_FROM
from nh2st.model.attention import FusionEncoder
from nh2st.model.hypergraph import HypergraphEncoder, hypergraph_operator

# decoder_init=mean: output weights x0.1 gave +0.02 validation PCC over the bias alone on the demo
# (fold 0, benchmarks/RESULTS.md); 1 keeps the random start, 0 would hold the first layer still for a step
OUTPUT_WEIGHT_SCALE = 0.1


class NH2ST(nn.Module):
    """NH²2ST heads. See ``forward`` for shapes; build from a config with ``from_config``."""

    def __init__(self, n_genes: int, feature_shape=(512, 7, 7), emb_dim: int = 512, depth: int = 1,
                 num_heads: int = 8, mlp_ratio: float = 1.0, dropout: float = 0.5, hyperedge_k: int = 3,
                 hypergraph_dim: int = 1024, decoder_dim: int = 256, predict_from: str = "query",
                 neighbor_branch: bool = True, input_norm: str = "none"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"MODEL.input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
        if predict_from not in PREDICT_FROM:
            raise ValueError(f"MODEL.predict_from must be one of {', '.join(PREDICT_FROM)}, got {predict_from!r}")
        if predict_from == "query+neighbors" and not neighbor_branch:
            raise ValueError("MODEL.predict_from=query+neighbors needs MODEL.neighbor_branch=true")
        self.n_genes = n_genes
        self.feature_shape = tuple(feature_shape)
        self.hyperedge_k = hyperedge_k
        self.predict_from = predict_from
        self.neighbor_branch = neighbor_branch
        self.input_norm = input_norm
        flat = self.feature_shape[0] * self.feature_shape[1] * self.feature_shape[2]
        self.register_buffer("feature_mean", torch.zeros(self.feature_shape[0], 1, 1))
        self.register_buffer("feature_std", torch.ones(self.feature_shape[0], 1, 1))

        self.image_proj = nn.Linear(flat, emb_dim)
        self.expression_encoder = nn.Sequential(nn.Linear(n_genes, emb_dim), nn.Linear(emb_dim, emb_dim))
        self.fusion = FusionEncoder(emb_dim, depth, num_heads, mlp_ratio, dropout)
        if neighbor_branch:
            self.neighbor_image = HypergraphEncoder(flat, hypergraph_dim, emb_dim)
            self.neighbor_expression = HypergraphEncoder(emb_dim, hypergraph_dim, emb_dim)
        decoder_in = emb_dim * (2 if predict_from == "query+neighbors" else 1)
        self.decoder = nn.Sequential(nn.Linear(decoder_in, decoder_dim), nn.Linear(decoder_dim, n_genes))

    @classmethod
    def from_config(cls, model_cfg, n_genes: int, feature_shape=(512, 7, 7)) -> "NH2ST":
        """From the MODEL section of a config (nh2st.config.Model)."""
        return cls(n_genes, feature_shape, emb_dim=model_cfg.emb_dim, depth=model_cfg.depth1,
                   num_heads=model_cfg.num_heads1, mlp_ratio=model_cfg.mlp_ratio1, dropout=model_cfg.dropout1,
                   hyperedge_k=model_cfg.hyperedge_k, hypergraph_dim=model_cfg.hypergraph_dim,
                   decoder_dim=model_cfg.decoder_dim, predict_from=model_cfg.predict_from,
                   neighbor_branch=model_cfg.neighbor_branch, input_norm=model_cfg.input_norm)

    @torch.no_grad()
    def set_feature_stats(self, maps: torch.Tensor, chunk: int = 1024) -> None:
        """Per-channel mean and std of training maps (N, C, H, W), for input_norm="channel"."""
        total = torch.zeros(self.feature_shape[0], dtype=torch.float64, device=maps.device)
        square = torch.zeros_like(total)
        for start in range(0, len(maps), chunk):
            part = maps[start:start + chunk].double()
            total += part.sum(dim=(0, 2, 3))
            square += part.square().sum(dim=(0, 2, 3))
        count = max(1, len(maps) * self.feature_shape[1] * self.feature_shape[2])
        mean = total / count
        std = (square / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        self.feature_mean.copy_(mean.view(-1, 1, 1))
        self.feature_std.copy_(std.view(-1, 1, 1))

    def normalise(self, maps: torch.Tensor) -> torch.Tensor:
        """input_norm="channel": (maps - channel mean) / channel std, in the maps' dtype."""
        return ((maps - self.feature_mean) / self.feature_std).to(maps.dtype)

    @torch.no_grad()
    def init_decoder_at_mean(self, mean: torch.Tensor) -> None:
        """Start the prediction at the training targets' per-gene mean (G,) (MODEL.decoder_init=mean).

        The output bias becomes the mean and the output weights shrink by OUTPUT_WEIGHT_SCALE, so
        the first prediction is the mean plus a small random term, instead of ~0 plus a large one
        (frozen 25088-wide maps make the image embedding large): the regression starts at the
        data's level and the first epochs are not spent on it.
        """
        self.decoder[-1].bias.copy_(mean.to(self.decoder[-1].bias))
        self.decoder[-1].weight.mul_(OUTPUT_WEIGHT_SCALE)

    @property
    def neighbors_at_inference(self) -> bool:
        """Whether a prediction needs the neighbours' maps (else the target's map alone suffices)."""
        return self.predict_from == "query+neighbors"

    def operator(self, maps: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        """Hypergraph operator of each neighbourhood: maps (U, C, H, W), neighbors (B, k) -> (B, k, k)."""
        return hypergraph_operator(maps.flatten(1)[neighbors], self.hyperedge_k)

    def forward(self, maps: torch.Tensor, neighbors: torch.Tensor, operator: torch.Tensor | None = None,
                expression: torch.Tensor | None = None, query_maps: torch.Tensor | None = None) -> dict:
        """Embeddings and prediction for a batch of B target spots.

        maps (U, C, H, W): the maps of every spot the batch touches, each once;
        neighbors (B, k) int64: rows of `maps` forming each target's neighbourhood, the target first;
        operator (B, k, k): the neighbourhoods' hypergraph operators (computed from `maps` if None);
        expression (U, G): targets of the same rows as `maps`, for training only;
        query_maps (B, C, H, W): the targets' own maps for the query branch, in place of
        maps[neighbors[:, 0]] (training on an augmented view; the neighbourhood keeps `maps`).
        Returns {"prediction": (B, G)} and, with expression, the fused (B, emb_dim) embeddings
        "image", "expression" and, with the neighbour branch, "neighbor_image", "neighbor_expression".
        """
        use_neighbors = self.neighbor_branch and (expression is not None or self.neighbors_at_inference)
        if use_neighbors and operator is None:
            operator = hypergraph_operator(maps.flatten(1)[neighbors], self.hyperedge_k)
        if query_maps is None:
            query_maps = maps[neighbors[:, 0]]
        if self.input_norm == "channel":
            maps, query_maps = self.normalise(maps), self.normalise(query_maps)
        flat = maps.flatten(1)
        image = self.image_proj(query_maps.flatten(1))
        if use_neighbors:
            # Θ₁ once per unique spot, then gathered into neighbourhoods: same result, k x fewer FLOPs
            neighbor_image = self.neighbor_image(self.neighbor_image.project(flat)[neighbors], operator)
        decoder_in = torch.cat([image, neighbor_image], -1) if self.neighbors_at_inference else image
        out = {"prediction": self.decoder(decoder_in)}
        if expression is None:
            return out

        encoded = self.expression_encoder(expression)
        target_expression = encoded[neighbors[:, 0]]
        out["image"] = self.fusion(image, target_expression)
        out["expression"] = self.fusion(target_expression, out["image"])
        if self.neighbor_branch:
            projected = self.neighbor_expression.project(encoded)[neighbors]
            neighbor_expression = self.neighbor_expression(projected, operator)
            out["neighbor_image"] = self.fusion(neighbor_image, neighbor_expression)
            out["neighbor_expression"] = self.fusion(neighbor_expression, out["neighbor_image"])
        return out

    @torch.no_grad()
    def predict(self, maps: torch.Tensor, neighbors: torch.Tensor, operator: torch.Tensor | None = None) -> torch.Tensor:
        """Expression prediction from maps only: (U, C, H, W), (B, k) -> (B, G)."""
        return self(maps, neighbors, operator)["prediction"]
