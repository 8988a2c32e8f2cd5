"""The NH²2ST heads: hypergraph convolution by hand, InfoNCE by hand, no expression leak, gradients."""

import math

import pytest
import torch

from nh2st.config import Model
from nh2st.model import NH2ST, CrossAttention, FusionEncoder, HypergraphConv, batch_rows, info_nce, nh2st_loss
from nh2st.model.hypergraph import hyperedge_members, hypergraph_operator, neighborhood_operators

torch.set_num_threads(2)

SMALL = dict(feature_shape=(4, 3, 3), emb_dim=16, num_heads=4, hypergraph_dim=24, decoder_dim=8)


def _nodes_at_angles(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], -1).float()[None]          # (1, k, 2)


def test_hyperedges_take_self_and_most_cosine_similar_others():
    # angles 0, 30, 100, 180 degrees: node 0's two nearest others are 1 (30°) and 2 (100°), etc.
    members = hyperedge_members(_nodes_at_angles([0, 30, 100, 180]) * torch.tensor([1.0, 3.0, 0.5, 2.0])[:, None],
                                n_similar=2)
    as_sets = [(int(row[0]), set(row[1:].tolist())) for row in members[0]]
    assert as_sets == [(0, {1, 2}), (1, {0, 2}), (2, {1, 3}), (3, {1, 2})]


def test_hypergraph_conv_matches_hand_computed_example():
    # Hyperedges from the angles above: e0={0,1,2}, e1={0,1,2}, e2={1,2,3}, e3={1,2,3}.
    # Node degrees D = (2, 4, 4, 2), edge degrees B = 3, (H Hᵀ)_ij = shared edges, so
    # P = D⁻¹ H B⁻¹ Hᵀ is, row by row:
    expected_operator = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0],
                                      [1 / 6, 1 / 3, 1 / 3, 1 / 6],
                                      [1 / 6, 1 / 3, 1 / 3, 1 / 6],
                                      [0, 1 / 3, 1 / 3, 1 / 3]])
    nodes = _nodes_at_angles([0, 30, 100, 180])
    operator = hypergraph_operator(nodes, n_similar=2)
    torch.testing.assert_close(operator[0], expected_operator)

    conv = HypergraphConv(2, 3)
    with torch.no_grad():
        conv.lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))   # Θᵀ
        conv.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [0.0, 3.0], [6.0, 6.0]]])
    # X Θ = [[1,4,-1],[3,0,3],[0,6,-3],[6,12,0]]; node 0 averages rows 0..2 -> [4/3, 10/3, -1/3]
    x_theta = torch.tensor([[1.0, 4.0, -1.0], [3.0, 0.0, 3.0], [0.0, 6.0, -3.0], [6.0, 12.0, 0.0]])
    expected = expected_operator @ x_theta + torch.tensor([0.5, 0.0, -1.0])
    out = conv(x, operator)
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[0, 0], torch.tensor([4 / 3 + 0.5, 10 / 3, -1 / 3 - 1.0]))


def test_info_nce_matches_formula_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    t, w = 0.5, 0.1
    cos = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    logits = cos / t * torch.tensor([[1.0, w], [w, 1.0]])
    expected = -0.5 * (torch.log_softmax(logits[0], 0)[0] + torch.log_softmax(logits[1], 0)[1])
    torch.testing.assert_close(info_nce(a, b, t, w), expected)


def _batch(n_spots=12, k=5, n_genes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(n_spots, *SMALL["feature_shape"], generator=g)
    expression = torch.rand(n_spots, n_genes, generator=g)
    neighbors = torch.stack([torch.cat([torch.tensor([i]), torch.randperm(n_spots, generator=g)[:k - 1]])
                             for i in range(n_spots)])
    return maps, expression, neighbors


@pytest.mark.parametrize("predict_from,neighbor_branch", [("query", True), ("query+neighbors", True),
                                                          ("query", False)])
def test_expression_never_reaches_the_prediction(predict_from, neighbor_branch):
    maps, expression, neighbors = _batch()
    torch.manual_seed(0)
    model = NH2ST(7, predict_from=predict_from, neighbor_branch=neighbor_branch, **SMALL).eval()
    targets = neighbors[:6]
    unique, local = batch_rows(targets)
    first = model(maps[unique], local, expression=expression[unique])
    changed = expression.clone()
    changed[unique] = torch.rand_like(changed[unique]) * 10          # targets and all their neighbours
    second = model(maps[unique], local, expression=changed[unique])
    assert not torch.allclose(first["image"], second["image"])         # expression is used for the losses...
    torch.testing.assert_close(first["prediction"], second["prediction"], rtol=0, atol=0)   # ...never here
    torch.testing.assert_close(model.predict(maps[unique], local), first["prediction"], rtol=0, atol=0)


def test_unique_spot_projection_equals_per_slot_computation():
    maps, expression, neighbors = _batch()
    torch.manual_seed(0)
    model = NH2ST(7, predict_from="query+neighbors", **SMALL).eval()
    unique, local = batch_rows(neighbors)
    assert len(unique) < neighbors.numel()                              # neighbours repeat across the batch
    shared = model(maps[unique], local, expression=expression[unique])
    rows = neighbors.flatten()
    per_slot = model(maps[rows], torch.arange(len(rows)).view_as(neighbors), expression=expression[rows])
    for key in shared:
        torch.testing.assert_close(shared[key], per_slot[key], rtol=1e-5, atol=1e-5)


def test_every_trainable_module_gets_a_gradient():
    maps, expression, neighbors = _batch()
    torch.manual_seed(0)
    cfg = Model(emb_dim=16, num_heads1=4, hypergraph_dim=24, decoder_dim=8, predict_from="query+neighbors")
    model = NH2ST.from_config(cfg, 7, SMALL["feature_shape"])
    unique, local = batch_rows(neighbors)
    loss, parts = nh2st_loss(model(maps[unique], local, expression=expression[unique]), expression[neighbors[:, 0]], cfg)
    loss.backward()
    assert set(parts) == {"mse", "spot", "neighbor"}
    zero = sorted(name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    # Each fused side is one token: the softmax over one key is identically 1, so the query/key
    # projections get exactly zero gradient (as in the released model); everything else must learn.
    assert zero == ["fusion.blocks.0.attn.to_k.weight", "fusion.blocks.0.attn.to_q.weight"], zero


def test_cross_attention_attends_over_several_context_tokens():
    torch.manual_seed(0)
    attn = CrossAttention(8, num_heads=2)
    x, context = torch.randn(3, 2, 8), torch.randn(3, 5, 8)
    attn(x, context).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in attn.parameters())
    fusion = FusionEncoder(8, depth=2, num_heads=2)
    assert fusion(torch.randn(4, 8), torch.randn(4, 8)).shape == (4, 8)


def test_paper_sized_model_shapes():
    model = NH2ST(250)
    assert model.image_proj.in_features == 25088 and model.image_proj.out_features == 512
    assert model.neighbor_image.conv1.lin.weight.shape == (1024, 25088)
    assert model.neighbor_expression.conv1.lin.weight.shape == (1024, 512)
    assert [m.out_features for m in model.decoder] == [256, 250]
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.GELU)) for m in model.decoder)
    assert not hasattr(NH2ST(250, neighbor_branch=False), "neighbor_image")


def test_channel_input_norm_uses_training_statistics_and_raw_maps_for_hyperedges():
    maps, expression, neighbors = _batch()
    maps = maps * torch.linspace(1, 50, 4).view(1, 4, 1, 1) + 3          # channels on very different scales
    torch.manual_seed(0)
    model = NH2ST(7, predict_from="query+neighbors", input_norm="channel", **SMALL).eval()
    model.set_feature_stats(maps, chunk=5)
    torch.testing.assert_close(model.feature_mean.flatten(), maps.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.feature_std.flatten(), maps.permute(1, 0, 2, 3).flatten(1).std(1, unbiased=False))
    unique, local = batch_rows(neighbors)
    raw_operator = neighborhood_operators(maps[unique], local, 3)
    torch.testing.assert_close(model.predict(maps[unique], local), model.predict(maps[unique], local, raw_operator))
    plain = NH2ST(7, predict_from="query+neighbors", **SMALL).eval()
    plain.load_state_dict(model.state_dict())
    normalised = (maps - model.feature_mean) / model.feature_std
    torch.testing.assert_close(model.predict(maps[unique], local, raw_operator),
                               plain.predict(normalised[unique], local, raw_operator))


def test_hypergraph_encoder_is_the_released_one_relu_after_both_convolutions_and_glorot_weights():
    """Released NH²2ST: HypergraphConv (Glorot weights, zero bias) -> ReLU -> HypergraphConv -> ReLU -> mean over nodes."""
    import math

    from nh2st.model.hypergraph import HypergraphEncoder, hypergraph_operator

    torch.manual_seed(0)
    encoder = HypergraphEncoder(96, 64, 32)
    for conv in (encoder.conv1, encoder.conv2):
        fan_out, fan_in = conv.lin.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.lin.weight.abs().max() <= bound
        assert conv.lin.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0
    nodes = torch.randn(5, 9, 96)
    operator = hypergraph_operator(nodes, 3)
    with torch.no_grad():
        encoder.conv2.bias.fill_(-0.5)            # pushes pre-activations negative: a missing ReLU would show
        out = encoder(encoder.project(nodes), operator)
        hidden = torch.relu(operator @ encoder.conv1.lin(nodes) + encoder.conv1.bias)
        expected = torch.relu(operator @ encoder.conv2.lin(hidden) + encoder.conv2.bias).mean(dim=1)
    torch.testing.assert_close(out, expected)
    assert (out >= 0).all() and (out == 0).any()
