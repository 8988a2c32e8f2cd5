"""The validation monitor on the device: nh2st.metrics' MSE, mean PCC, R and HVG-50 PCC in torch.

`fit` scores the selection split every epoch. Predicting and scoring on the device, then copying
four numbers back, keeps the epoch free of host copies of predictions; the definitions are those of
nh2st.metrics (float64, NaN for a gene constant on either side, NaN genes left out of means, R the
mean of the 50 best finite PCCs), and a test holds the two to float tolerance.
"""

import math

import torch

from nh2st.metrics import TOP_K


def monitor_scores(pred: torch.Tensor, true: torch.Tensor, hvg=None, k: int = TOP_K) -> dict:
    """(N, G) predictions and targets on one device -> {"mse", "pcc_mean", "R", "hvg50_pcc"} floats (NaN -> None)."""
    x, y = pred.double(), true.double()
    mse = (x - y).square().mean() if x.numel() else x.new_tensor(math.nan)
    if len(x) < 2:
        pcc = x.new_full((x.shape[1],), math.nan)
    else:
        xc, yc = x - x.mean(0), y - y.mean(0)
        num = (xc * yc).sum(0)
        den = ((xc * xc).sum(0) * (yc * yc).sum(0)).sqrt()
        varying = (x.amax(0) > x.amin(0)) & (y.amax(0) > y.amin(0)) & (den > 0)
        pcc = torch.where(varying, (num / torch.where(varying, den, 1.0)).clamp(-1.0, 1.0), math.nan)
    finite = pcc.isfinite()

    def finite_mean(values, keep):
        return torch.where(keep, values, 0.0).sum() / keep.sum()          # 0/0 = NaN when none is finite

    top = torch.where(finite, pcc, -math.inf).topk(min(k, len(pcc))).values
    in_top = torch.arange(len(top), device=pcc.device) < finite.sum()
    values = [mse, finite_mean(pcc, finite), finite_mean(top, in_top)]
    if hvg is not None:
        chosen = torch.as_tensor(hvg, dtype=torch.int64)
        chosen = chosen.pin_memory().to(pcc.device, non_blocking=True) if pcc.is_cuda else chosen.to(pcc.device)
        values.append(finite_mean(pcc[chosen], finite[chosen]))
    out = [None if not math.isfinite(v) else v for v in torch.stack(values).tolist()]    # the one copy back
    return {"mse": out[0], "pcc_mean": out[1], "R": out[2], "hvg50_pcc": out[3] if hvg is not None else None}


def validation_scores(predictor, spots, split: str, hvg=None) -> dict:
    """Predict spots.split[split] with `predictor` on the fold's device and score it there (monitor_scores)."""
    pred = predictor.predict_tensor(spots.features, spots.host("neighbors"), spots.host(split), spots.operator)
    return monitor_scores(pred, spots.targets[spots.split[split]], hvg)
