"""The NH²2ST heads: hypergraph convolution, cross-attention fusion, losses, the model."""

from nh2st.model.attention import CrossAttention, FusionEncoder
from nh2st.model.hypergraph import HypergraphConv, HypergraphEncoder, hypergraph_operator
from nh2st.model.losses import info_nce, nh2st_loss
from nh2st.model.batching import Batches, batch_rows, plan_batches
from nh2st.model.nh2st import NH2ST

__all__ = ["NH2ST", "Batches", "CrossAttention", "FusionEncoder", "HypergraphConv", "HypergraphEncoder", "batch_rows",
           "hypergraph_operator", "info_nce", "nh2st_loss", "plan_batches"]
