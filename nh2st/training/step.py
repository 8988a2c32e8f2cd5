"""The training step: forward, the three losses, backward and the optimizer, batch after batch.

A pass over the training rows is planned on the host (nh2st.model.batching) and sent to the
device in one copy; no step waits on the device. The batch losses add up in a device tensor that
`fit` reads once per epoch.

Modes. "eager" runs the step op by op (CPU, DDP, or NH2ST_STEP=eager). "graph" (the default on
CUDA in one process) runs a few eager steps per batch shape, then captures the whole step,
optimizer included, as a CUDA graph and replays it: the step's index tensors are read from the
epoch's plan inside the graph, so a step costs one replay call. A graph is the eager kernels
recorded, so both modes compute the same numbers; the learning rate lives in a device tensor
refreshed from the optimizer's param groups before each replay (schedules keep working), and the
optimizer's own state (floats, capturable=False) is left as it was. The full batches and the
last, smaller one have a graph each; batches gather up to `width` rows, padded (see batching)
and grown, with a new capture, if a later epoch needs more. If a capture fails the fit goes on
eagerly, with a warning.
"""

import ctypes
import math
import os
import sys
import warnings
from collections import Counter
from contextlib import contextmanager

import torch

from nh2st.config import Config
from nh2st.errors import NH2STError
from nh2st.model import Batches, nh2st_loss, plan_batches
from nh2st.predictor import autocast

STEP_MODES = ("auto", "eager", "graph")
STEP_MODE_ENV = "NH2ST_STEP"
WARMUP_STEPS = 3          # eager steps of a batch shape before it is captured (lazy inits, optimizer state)
WIDTH_HEADROOM = 1.03     # a captured gather width leaves room for later epochs' busier batches
_retained = False


def retain_freed_memory() -> None:
    """glibc only: serve big allocations from the heap and keep freed memory for reuse (once per process).

    Every CPU step creates fresh weight gradients (100 MB for the 25088 x 1024 projection).
    glibc maps each block over 32 MB on its own and unmaps it when freed, so each step
    page-faults them in again; measured here at ~140 ms per 100 MB, more than the Adam step.
    Like running under jemalloc or tcmalloc, the heap then keeps the pages.
    """
    global _retained
    if _retained or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)            # M_MMAP_MAX: no separate mappings for big blocks
        libc.mallopt(-1, 1 << 30)      # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
    _retained = True


def resolve_step_mode(mode: str, device: torch.device, world: int) -> str:
    """eager | graph. "auto" (or NH2ST_STEP, when set) picks graph on CUDA in a single process."""
    if mode == "auto":
        mode = os.environ.get(STEP_MODE_ENV, "auto") or "auto"
    if mode not in STEP_MODES:
        raise NH2STError(f"{STEP_MODE_ENV}={mode!r}: use one of {', '.join(STEP_MODES)}, or unset it")
    if mode == "auto":
        return "graph" if device.type == "cuda" and world == 1 else "eager"
    if mode == "graph" and (device.type != "cuda" or world > 1):
        raise NH2STError(f"{STEP_MODE_ENV}=graph needs CUDA and a single process (DDP steps run eagerly); "
                         "use auto or eager")
    return mode


class _Graph:
    """A captured step for batches of one size: the epoch's plan in static buffers, a step counter."""

    def __init__(self, group: Batches, width: int, device: torch.device):
        n, size = group.rows.shape
        self.width, self.capacity = width, n
        self.rows = torch.zeros((n, size), dtype=torch.int64, device=device)
        self.gather = torch.zeros((n, width), dtype=torch.int64, device=device)
        self.local = torch.zeros((n, *group.local.shape[1:]), dtype=torch.int64, device=device)
        self.index = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph = torch.cuda.CUDAGraph()

    def fits(self, group: Batches) -> bool:
        return group.width <= self.width and len(group) <= self.capacity

    def load(self, group: Batches, start: int = 0) -> None:
        """The epoch's plan into the buffers (asynchronously) and the counter at batch `start`."""
        group = group.padded(self.width).to(self.rows.device, non_blocking=True)
        n = len(group)
        self.rows[:n].copy_(group.rows)
        self.gather[:n].copy_(group.gather)
        self.local[:n].copy_(group.local)
        self.index.fill_(start)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current batch's (rows, gather, local), read on the device; then the counter moves on."""
        rows, gather, local = (t.index_select(0, self.index)[0] for t in (self.rows, self.gather, self.local))
        self.index.add_(1)
        return rows, gather, local


class TrainStep:
    """The training step of one fit. ``epoch(rows, on_step)`` -> (sum of batch losses on device, steps).

    net: the model or its DDP wrapper; spots: the fold (nh2st.training.data.FoldSpots);
    mode: auto | eager | graph (see the module docstring).
    """

    def __init__(self, net: torch.nn.Module, spots, optimizer: torch.optim.Optimizer, cfg: Config,
                 mode: str = "auto"):
        self.net, self.spots, self.optimizer, self.cfg = net, spots, optimizer, cfg
        self.device = spots.features.device
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.mode = resolve_step_mode(mode, self.device, world)
        self.operator = spots.operator if cfg.MODEL.neighbor_branch else None
        self.with_neighbors = cfg.MODEL.neighbor_branch
        self.loss_sum = torch.zeros((), device=self.device)
        self.graphs: dict[int, _Graph] = {}
        self.eager_steps: Counter = Counter()        # eager steps per batch size
        self.captures = 0
        self.lr_device: list[torch.Tensor] = []
        self.lr_host: list[float] = []
        if self.device.type == "cpu":
            retain_freed_memory()

    def step(self, rows: torch.Tensor, gather: torch.Tensor, local: torch.Tensor, graphed: bool = False) -> None:
        """One optimizer step on a batch: rows (b,), gather (u,), local (b, k) index tensors on the device."""
        spots = self.spots
        with autocast(self.device, cache=not graphed):
            out = self.net(spots.features[gather], local, None if self.operator is None else self.operator[rows],
                           spots.targets[gather], query_maps=None if spots.views is None else spots.query_maps(rows))
            loss, _ = nh2st_loss(out, spots.targets[rows], self.cfg.MODEL)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach()

    def epoch(self, rows: torch.Tensor, on_step=None) -> tuple[torch.Tensor, int]:
        """One pass over `rows` (already shuffled) in batches; on_step() after every optimizer step."""
        plan = plan_batches(self.spots.host("neighbors"), rows, self.cfg.TRAINING.batch_size, self.with_neighbors)
        self.loss_sum.zero_()
        for group in plan:
            if self.mode == "graph":
                self._graphed(group, on_step)
            else:
                self._eager(group.to(self.device, non_blocking=True), range(len(group)), on_step)
        return self.loss_sum.clone(), sum(len(group) for group in plan)

    def _eager(self, group: Batches, indices, on_step) -> None:
        for i in indices:
            self.step(group.rows[i], group.gather[i, :int(group.counts[i])], group.local[i])
            self.eager_steps[group.size] += 1
            if on_step is not None:
                on_step()

    @contextmanager
    def _side_stream(self):
        """Eager steps before a capture run on a side stream, as torch.cuda.graphs asks for warm-up."""
        if self.device.type != "cuda":
            yield
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _graphed(self, group: Batches, on_step) -> None:
        graph, start = self.graphs.get(group.size), 0
        if graph is not None and graph.fits(group):
            graph.load(group)
        else:
            start = min(len(group), max(0, WARMUP_STEPS - self.eager_steps[group.size]))
            if start:
                with self._side_stream():
                    self._eager(group.to(self.device, non_blocking=True), range(start), on_step)
            if start == len(group):
                return
            try:
                graph = self._capture(group, start)
            except Exception as exc:      # an op that cannot be captured: same numbers, eagerly
                warnings.warn(f"CUDA graph capture of the training step failed ({type(exc).__name__}: {exc}); "
                              "training continues eagerly", RuntimeWarning, stacklevel=2)
                self.mode = "eager"
                self._eager(group.to(self.device), range(start, len(group)), on_step)
                return
        for _ in range(start, len(group)):
            self._refresh_lr()
            graph.graph.replay()
            if on_step is not None:
                on_step()

    def _capture(self, group: Batches, start: int) -> _Graph:
        self.graphs.pop(group.size, None)          # frees the old graph's memory before the new capture
        full = group.size * (group.local.shape[2])
        width = min(full, max(group.width, 8 * math.ceil(group.width * WIDTH_HEADROOM / 8)))
        graph = _Graph(group, width, self.device)
        graph.load(group, start)
        groups = self.optimizer.param_groups
        if not self.lr_device:
            self.lr_host = [float(g["lr"]) for g in groups]
            self.lr_device = [torch.tensor(lr, dtype=torch.float32, device=self.device) for lr in self.lr_host]
        saved = [(g["lr"], g.get("capturable", False)) for g in groups]
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        try:
            for g, lr in zip(groups, self.lr_device):
                g["lr"], g["capturable"] = lr, True          # the fused kernel reads lr from the device
            with torch.cuda.graph(graph.graph):
                self.step(*graph.batch(), graphed=True)
        finally:
            for g, (lr, capturable) in zip(groups, saved):
                g["lr"], g["capturable"] = lr, capturable
        self.graphs[group.size] = graph
        self.captures += 1
        return graph

    def _refresh_lr(self) -> None:
        for j, g in enumerate(self.optimizer.param_groups):
            lr = float(g["lr"])
            if lr != self.lr_host[j]:
                self.lr_device[j].fill_(lr)
                self.lr_host[j] = lr
