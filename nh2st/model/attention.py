"""The cross-attention fusion block: pre-norm cross-attention + feed-forward, final LayerNorm.

The paper fuses one embedding with another (image with expression, then expression with the
fused image). Each side is a single 512-d token there, so the softmax runs over one key and is
identically 1: the block then computes x + out(v(context)) followed by the feed-forward, and the
query/key projections receive exactly zero gradient. That is the released model's behaviour and
is kept; with several context tokens the same block attends normally.
"""

import torch
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of query tokens over context tokens.

    x (B, Lq, D), context (B, Lk, D) -> (B, Lq, D).
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"emb_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)   # (B, h, L, d/h)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape)
        return self.proj_drop(self.proj(out))


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout. (..., D) -> (..., D)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttentionBlock(nn.Module):
    """x + attn(norm(x), norm(context)), then x + ff(norm_ff(x)). (B, Lq, D), (B, Lk, D) -> (B, Lq, D).

    One LayerNorm serves both x and context before attention, as in TRIPLEX's PreNorm that the
    paper's code builds on.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, max(1, int(dim * mlp_ratio)), dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x), self.norm(context))
        return x + self.ff(self.norm_ff(x))


class FusionEncoder(nn.Module):
    """`depth` cross-attention blocks and a final LayerNorm: x attends to context.

    x, context: (B, D) single embeddings or (B, L, D) token sequences -> same shape as x.
    """

    def __init__(self, dim: int = 512, depth: int = 1, num_heads: int = 8, mlp_ratio: float = 1.0,
                 dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 2
        if single:
            x = x.unsqueeze(1)
        if context.dim() == 2:
            context = context.unsqueeze(1)
        for block in self.blocks:
            x = block(x, context)
        x = self.norm(x)
        return x.squeeze(1) if single else x
