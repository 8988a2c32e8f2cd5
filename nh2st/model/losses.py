"""NH²2ST's training loss: two contrastive terms (spot, neighbourhood) plus MSE on the prediction."""

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, negative_weight: float = 0.1) -> torch.Tensor:
    """The paper's InfoNCE over a batch of pairs (a_i, b_i): (B, D), (B, D) -> scalar.

    logits_ij = cos(a_i, b_j) / temperature, off-diagonal logits multiplied by `negative_weight`
    (the released code's down-weighting of negatives), cross-entropy against the diagonal.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    weight = torch.full_like(logits, negative_weight)
    weight.fill_diagonal_(1.0)
    return F.cross_entropy(logits * weight, torch.arange(len(a), device=a.device))


def nh2st_loss(outputs: dict, target: torch.Tensor, model_cfg) -> tuple[torch.Tensor, dict]:
    """loss_ratio1·InfoNCE(spot) + loss_ratio2·InfoNCE(neighbourhood) + MSE(prediction, target).

    `outputs` is what NH2ST.forward returns when given expression; the neighbourhood term is left
    out when the model has no neighbour branch. Returns (total, {"spot", "neighbor", "mse"} detached scalars).
    """
    mse = F.mse_loss(outputs["prediction"].float(), target.float())
    spot = info_nce(outputs["image"], outputs["expression"], model_cfg.temperature1, model_cfg.negative_weight)
    total = model_cfg.loss_ratio1 * spot + mse
    parts = {"mse": mse.detach(), "spot": spot.detach()}
    if "neighbor_image" in outputs:
        neighbor = info_nce(outputs["neighbor_image"], outputs["neighbor_expression"], model_cfg.temperature2,
                            model_cfg.negative_weight)
        total = total + model_cfg.loss_ratio2 * neighbor
        parts["neighbor"] = neighbor.detach()
    return total, parts
