"""Dense, batched hypergraph convolution in plain torch (no torch_geometric).

Every target spot's neighbourhood (its k stored neighbours, self first) is one small hypergraph
with one hyperedge per node: the node plus its `n_similar` most cosine-similar other nodes, as
the paper's code builds it on the flattened 512x7x7 maps. With incidence H (k nodes x k edges),
unit hyperedge weights W = I, node degrees D = diag(H W 1) and edge degrees B = diag(Hᵀ 1), one
convolution (Bai et al. 2021, torch_geometric's ``HypergraphConv``) is

    X' = D⁻¹ H W B⁻¹ Hᵀ X Θ + b

The operator P = D⁻¹ H W B⁻¹ Hᵀ (k x k per spot) depends only on the feature maps. They are
frozen in nh2st, so training computes P once per spot and gathers it, and because P acts after
the row-wise map X Θ, callers may apply Θ once per *unique* spot of a batch and gather after.
"""

import torch
import torch.nn.functional as F
from torch import nn


def hyperedge_members(nodes: torch.Tensor, n_similar: int = 3) -> torch.Tensor:
    """Node indices of each hyperedge: (S, k, D) node features -> (S, k, 1 + n_similar) int64.

    Row e of a spot lists node e itself, then its `n_similar` most cosine-similar *other* nodes
    (fewer when k - 1 < n_similar).
    """
    s, k, _ = nodes.shape
    n_similar = min(n_similar, k - 1)
    unit = F.normalize(nodes.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)                                   # (S, k, k)
    self_mask = torch.eye(k, dtype=torch.bool, device=nodes.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    others = similarity.topk(n_similar, dim=-1).indices                         # (S, k, n_similar)
    own = torch.arange(k, device=nodes.device).view(1, k, 1).expand(s, k, 1)
    return torch.cat([own, others], dim=-1)


def incidence_matrix(members: torch.Tensor, k: int) -> torch.Tensor:
    """(S, E, m) members of each hyperedge -> dense incidence H (S, k nodes, E edges), float32 0/1."""
    s, e, _ = members.shape
    incidence = torch.zeros(s, e, k, device=members.device)
    incidence.scatter_(2, members, 1.0)                                         # (S, edge, node)
    return incidence.transpose(1, 2)


def propagation_operator(incidence: torch.Tensor) -> torch.Tensor:
    """P = D⁻¹ H W B⁻¹ Hᵀ with W = I: (S, k, E) incidence -> (S, k, k)."""
    node_degree = incidence.sum(2, keepdim=True).clamp_min(1.0)                 # (S, k, 1)
    edge_degree = incidence.sum(1, keepdim=True).clamp_min(1.0)                 # (S, 1, E)
    return (incidence / node_degree / edge_degree) @ incidence.transpose(1, 2)


def hypergraph_operator(nodes: torch.Tensor, n_similar: int = 3) -> torch.Tensor:
    """The paper's hypergraph operator of each neighbourhood: (S, k, D) node features -> (S, k, k) float32."""
    return propagation_operator(incidence_matrix(hyperedge_members(nodes, n_similar), nodes.shape[1]))


def neighborhood_operators(features: torch.Tensor, neighbors: torch.Tensor, n_similar: int = 3,
                           chunk: int = 128) -> torch.Tensor:
    """Operators of many neighbourhoods: features (N, ...) of all spots, neighbors (S, k) -> (S, k, k).

    Gathers and works in chunks of spots so memory stays O(chunk * k * D).
    """
    flat = features.flatten(1)
    parts = [hypergraph_operator(flat[neighbors[start:start + chunk]], n_similar)
             for start in range(0, len(neighbors), chunk)]
    k = neighbors.shape[1]
    return torch.cat(parts) if parts else torch.zeros(0, k, k, device=features.device)


class HypergraphConv(nn.Module):
    """X' = P (X Θ) + b. x (S, k, in_features), operator (S, k, k) -> (S, k, out_features)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)     # torch_geometric's HypergraphConv: Glorot weights, zero bias
        self.bias = nn.Parameter(torch.zeros(out_features))

    def propagate(self, projected: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
        """P (X Θ) + b for node features already mapped by `self.lin`: (S, k, out) -> (S, k, out)."""
        return operator.to(projected.dtype) @ projected + self.bias

    def forward(self, x: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
        return self.propagate(self.lin(x), operator)


class HypergraphEncoder(nn.Module):
    """Two hypergraph convolutions, a ReLU after each (as the released code), then the mean over nodes.

    Call ``project`` on the features of each unique spot, gather its rows into neighbourhoods
    (S, k, hidden), then ``forward(projected, operator) -> (S, out_features)``.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.conv1 = HypergraphConv(in_features, hidden_features)
        self.conv2 = HypergraphConv(hidden_features, out_features)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """X Θ₁, row by row: (..., in_features) -> (..., hidden_features)."""
        return self.conv1.lin(x)

    def forward(self, projected: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv1.propagate(projected, operator))
        return torch.relu(self.conv2(hidden, operator)).mean(dim=1)
