"""The training loop: `fit` reads top to bottom, one epoch at a time, like nanoGPT's train.py.

Each epoch: shuffle the training rows (seeded by epoch) and, from a --views store, draw each
target's view (TRAINING.augment, nh2st.views), step through fixed batches, score the
selection split, keep the best state, write the log; stop early when the monitored value has not
improved for `patience` epochs. The best model goes to checkpoint.pt whenever it improves; the
whole training state (model, optimizer, scheduler, RNG, history) goes to last.pt at most once per
`save_every_s` seconds and at the last epoch, so `resume=True` continues an interrupted fold
exactly where that state was taken.

The recipe keys (nh2st.config, all off in paper mode): TRAINING.weight_decay (never on biases or
norm weights, so a decoder bias started at the training mean is not pulled to 0);
TRAINING.lr_scheduler name/warmup_epochs (paper: StepLR once per epoch; with a warm-up or the
cosine schedule the learning rate is set before every optimizer step); the selection rule
(`Selection`: monitor, min_delta, MSE tie-break); MODEL.decoder_init=mean.
"""

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import TextColumn

from nh2st import metrics
from nh2st.config import MONITORS, Config
from nh2st.errors import NH2STError
from nh2st.model import NH2ST
from nh2st.predictor import Predictor
from nh2st.progress import make_progress
from nh2st.runs import CHECKPOINT, LAST, LOG_CSV, LOG_JSON, load_checkpoint, save_checkpoint, write_json
from nh2st.training.data import FoldSpots
from nh2st.training.monitor import validation_scores
from nh2st.training.step import TrainStep

LOG_FIELDS = ("epoch", "train_loss", "val_loss", "val_R", "val_pcc", "lr", "seconds", "spots_per_s")
SAVE_EVERY_S = 60.0


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def checkpoint_state(model_kind: str, state: dict, cfg: Config, genes: list[str], feature_shape, epoch: int) -> dict:
    """checkpoint.pt: what Predictor.load needs."""
    return {"model": state, "model_kind": model_kind, "config": cfg.to_dict(), "genes": list(genes),
            "feature_shape": list(feature_shape), "epoch": int(epoch)}


def write_log(run_dir: Path, history: list[dict]) -> None:
    import csv
    import io

    from nh2st.atomic import atomic_write

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in LOG_FIELDS})
    atomic_write(run_dir / LOG_CSV, lambda tmp: tmp.write_text(buffer.getvalue()))
    write_json(run_dir / LOG_JSON, history)


def make_optimizer(model: torch.nn.Module, training) -> torch.optim.Optimizer:
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[training.optimizer]
    params = model.parameters()
    if training.weight_decay > 0:
        # matrices decay; biases and LayerNorm weights (1-D) do not
        matrices = [p for p in model.parameters() if p.ndim >= 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        params = [{"params": matrices, "weight_decay": training.weight_decay},
                  {"params": vectors, "weight_decay": 0.0}]
    # fused: one kernel over all parameters; on CPU ~7x faster than the per-tensor loop for these 38 M weights
    return optimizer(params, lr=training.learning_rate, fused=True)


def lr_factor(step: int, schedule, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of TRAINING.learning_rate.

    Linear warm-up over warmup_epochs (the first step already moves, at 1/warm-up steps), then
    StepLR's gamma ** (epoch // step_size) or a cosine from 1 down to min_lr_ratio at the last step.
    """
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if schedule.name == "step":
        return schedule.gamma ** ((step // steps_per_epoch) // schedule.step_size)
    span = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, training, steps_per_epoch: int) -> tuple[object, bool]:
    """(scheduler, per_step). Paper mode: StepLR stepped once per epoch, as released; anything else per step."""
    schedule = training.lr_scheduler
    if schedule.name == "step" and schedule.warmup_epochs == 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, schedule.step_size, schedule.gamma), False
    total = training.num_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, steps_per_epoch, total)), True


class Selection:
    """Which epoch's weights to keep, from its validation scores; the rule of TRAINING.early_stopping.

    An epoch replaces the selected one when its monitored value is better by more than min_delta,
    or (tie_break "mse") when it is within min_delta of the best value seen so far and its
    validation MSE is lower. So with monitor pcc, min_delta 0.005, tie_break mse: the lowest-MSE
    epoch among those whose PCC is within 0.005 of the best PCC, as far as training has seen.
    With min_delta 0 and no tie-break this is plain "best monitored value" (the paper's rule).
    """

    def __init__(self, mode: str, min_delta: float = 0.0, tie_break: str = "none", state: dict | None = None):
        self.mode, self.min_delta, self.tie_break = mode, min_delta, tie_break
        state = state or {}
        self.value, self.mse, self.peak = state.get("value"), state.get("mse"), state.get("peak")

    def _gain(self, value: float, reference: float) -> float:
        return value - reference if self.mode == "max" else reference - value

    def offer(self, value: float | None, mse: float | None = None) -> bool:
        """Whether an epoch with these scores becomes the selected one (and it is recorded if so)."""
        if value is None or not math.isfinite(value):
            return self.value is None and self._take(value, mse)
        if self.peak is None or self._gain(value, self.peak) > 0:
            self.peak = value
        if self.value is None or not math.isfinite(self.value) or self._gain(value, self.value) > self.min_delta:
            return self._take(value, mse)
        if (self.tie_break == "mse" and mse is not None and self._gain(value, self.peak) >= -self.min_delta
                and (self.mse is None or mse < self.mse)):
            return self._take(value, mse)
        return False

    def _take(self, value, mse) -> bool:
        self.value, self.mse = value, mse
        return True

    def state(self) -> dict:
        return {"value": self.value, "mse": self.mse, "peak": self.peak}


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Every rank gets the same number of rows (the permutation wraps around), like DistributedSampler."""
    if world == 1:
        return order
    pad = (-len(order)) % world
    return torch.cat([order, order[:pad]])[rank::world]


def train_epoch(net, spots: FoldSpots, rows: torch.Tensor, optimizer, cfg: Config, on_step=None,
                step: TrainStep | None = None) -> tuple[torch.Tensor, int]:
    """One pass over `rows` (already shuffled) in batches; returns (sum of batch losses on device, steps).

    on_step() runs after every optimizer step. `step` carries the captured CUDA graphs from one
    epoch to the next (nh2st.training.step); without it the epoch runs eagerly.
    """
    step = step or TrainStep(net, spots, optimizer, cfg, mode="eager")
    return step.epoch(rows, on_step)


def fit(model: NH2ST, spots: FoldSpots, cfg: Config, run_dir: Path, genes: list[str], select: str | None,
        show_progress: bool = True, label: str = "train", resume: bool = False,
        save_every_s: float | None = None) -> dict:
    """Train `model` on spots.split["train"], selecting on spots.split[select]; returns the best state.

    select None keeps the last epoch. Writes (rank 0) log.csv / log.json every epoch, checkpoint.pt
    when the monitored value improves and last.pt as described above.
    Returns {"state", "best_epoch", "best_value", "history"}.
    """
    t, device = cfg.TRAINING, spots.features.device
    run_dir = Path(run_dir)
    save_every_s = SAVE_EVERY_S if save_every_s is None else save_every_s
    rank, world = rank_world()
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_rows = spots.split["train"]
    if len(train_rows) == 0:
        raise NH2STError(f"{run_dir}: the fold has no training spots")
    if cfg.MODEL.decoder_init == "mean":
        model.init_decoder_at_mean(spots.targets[train_rows].mean(0))
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / world) / t.batch_size)
    optimizer = make_optimizer(model, t)
    scheduler, per_step = make_scheduler(optimizer, t, steps_per_epoch)
    monitor, natural = MONITORS[t.early_stopping.monitor]
    mode = natural if t.early_stopping.mode == "auto" else t.early_stopping.mode     # validated to agree
    selection = Selection(mode, t.early_stopping.min_delta, t.early_stopping.tie_break)
    hvg = metrics.hvg_indices(spots.targets[train_rows].cpu().numpy())
    predictor = Predictor("nh2st", genes, cfg, model.feature_shape, model=model, device=device)
    history, best, best_epoch, best_state, stale, start, stopped = [], None, -1, None, 0, 0, False

    if resume and (run_dir / LAST).is_file():
        last = load_checkpoint(run_dir / LAST)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        torch.set_rng_state(last["rng"])
        history, best, best_epoch, stale = last["history"], last["best"], last["best_epoch"], last["stale"]
        selection = Selection(mode, t.early_stopping.min_delta, t.early_stopping.tie_break,
                              last.get("selection", {"value": best}))
        stopped = last["stopped"]
        if device.type == "cuda" and last.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(last["cuda_rng"], device)
        start = last["epoch"] + 1
        if best_epoch >= 0:
            best_state = {k: v.to(device) for k, v in load_checkpoint(run_dir / CHECKPOINT)["model"].items()}
    last_saved = time.monotonic()
    stepper = TrainStep(net, spots, optimizer, cfg)

    progress = make_progress(TextColumn("{task.fields[info]}")) if show_progress and rank == 0 else None
    with progress or nullcontext():
        task = progress.add_task(label, total=t.num_epochs * steps_per_epoch, completed=start * steps_per_epoch,
                                 info="") if progress else None
        for epoch in range(start, t.num_epochs):
            if stopped:
                break      # a resumed run that had already stopped early
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            epoch_rng = torch.Generator().manual_seed(cfg.GENERAL.seed + epoch)
            order = torch.randperm(len(train_rows), generator=epoch_rng)
            if spots.views is not None:
                spots.draw_views(epoch_rng)
            rows = train_rows[shard(order, rank, world).to(device)]
            def on_step():
                if per_step:
                    scheduler.step()
                if progress:
                    progress.advance(task)

            loss_sum, n_steps = train_epoch(net, spots, rows, optimizer, cfg,
                                            on_step if per_step or progress else None, stepper)
            if not per_step:
                scheduler.step()
            if world > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            train_loss = loss_sum.item() / max(n_steps, 1)         # waits for the epoch's queued steps
            train_seconds = time.perf_counter() - started
            row = {"epoch": epoch, "train_loss": train_loss,
                   "lr": lr, "spots_per_s": len(train_rows) / train_seconds}
            if select is not None:
                scores = validation_scores(predictor, spots, select, hvg)
                row.update(val_loss=scores["mse"], val_R=scores["R"], val_pcc=scores["pcc_mean"])
            row["seconds"] = time.perf_counter() - started
            history.append(row)

            value = row.get(monitor) if select is not None else epoch
            if select is None or selection.offer(value, row.get("val_loss")):
                best, best_epoch, stale = value, epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if rank == 0:
                    save_checkpoint(run_dir / CHECKPOINT,
                                    checkpoint_state("nh2st", {k: v.cpu() for k, v in best_state.items()}, cfg,
                                                     genes, model.feature_shape, epoch))
            else:
                stale += 1
            stopping = select is not None and stale >= t.early_stopping.patience
            if rank == 0:
                write_log(run_dir, history)
                if stopping or epoch == t.num_epochs - 1 or time.monotonic() - last_saved >= save_every_s:
                    save_checkpoint(run_dir / LAST, {
                        "model": {k: v.cpu() for k, v in model.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "epoch": epoch, "history": history, "best": best, "best_epoch": best_epoch,
                        "stale": stale, "stopped": stopping, "selection": selection.state()})
                    last_saved = time.monotonic()
            if progress:
                shown = f"val R {row['val_R']:.3f}" if row.get("val_R") is not None else ""
                progress.update(task, info=f"epoch {epoch + 1}/{t.num_epochs} · loss {row['train_loss']:.4f} · "
                                           f"{shown} · {row['spots_per_s']:.0f} spots/s")
            if stopping:
                break
        if progress:
            progress.update(task, completed=t.num_epochs * steps_per_epoch)
    return {"state": best_state, "best_epoch": best_epoch, "best_value": best, "history": history}
