"""Batches for the NH²2ST forward, planned on the host a whole pass at a time.

The forward takes the maps of every spot a batch touches, each once (U rows), and the batch's
neighbourhoods as positions in them (B, k). Finding those rows is a sort per batch; `plan_batches`
does it for every batch of a pass at once, in numpy, so the device never waits on a
data-dependent result (`torch.unique` on CUDA waits for the device and copies the size back).
The plan goes to the device in one copy per pass; each step indexes it.

Rows are gathered in ascending order, the order `torch.unique` gives, so a plan feeds the forward
exactly the tensors the per-batch `batch_rows` does. With a fixed `width` the gather list is
padded (by repeating its last row) to that many rows: every batch of a group then has the same
shapes, which is what a captured CUDA graph needs. Padded rows are never referenced by `local`,
so they change no output and receive zero gradient.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batches:
    """n batches of b targets each.

    rows   (n, b) int64: target rows of the spot table, in the order the pass visits them;
    gather (n, w) int64: rows each batch gathers, ascending; the first counts[i] are distinct,
                         the rest repeat the last (padding up to the group's width w);
    local  (n, b, k) int64: each target's neighbourhood (self first) as positions in its gather row;
    counts (n,) numpy int64: distinct rows per batch (host-side, so slicing never syncs).
    """

    rows: torch.Tensor
    gather: torch.Tensor
    local: torch.Tensor
    counts: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def size(self) -> int:
        return self.rows.shape[1]

    @property
    def width(self) -> int:
        return self.gather.shape[1]

    def to(self, device, non_blocking: bool = False) -> "Batches":
        """The index tensors on `device` (pinned first for an asynchronous host-to-CUDA copy)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if non_blocking else (lambda t: t.to(device))
        return Batches(move(self.rows), move(self.gather), move(self.local), self.counts)

    def padded(self, width: int) -> "Batches":
        """The same batches with gather lists padded (last row repeated) to `width` >= self.width."""
        if width == self.width:
            return self
        extra = self.gather[:, -1:].expand(-1, width - self.width)
        return Batches(self.rows, torch.cat([self.gather, extra], 1), self.local, self.counts)


def _dedup(neighborhoods: np.ndarray, width: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, b, k) rows -> gather (n, w), local (n, b, k), counts (n,): sorted distinct rows per batch."""
    n, b, k = neighborhoods.shape
    flat = neighborhoods.reshape(n, b * k)
    order = np.argsort(flat, axis=1, kind="stable")
    ordered = np.take_along_axis(flat, order, axis=1)
    first = np.ones_like(ordered, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    position = np.cumsum(first, axis=1) - 1                       # where each sorted entry lands in `gather`
    counts = first.sum(axis=1).astype(np.int64)
    width = int(counts.max(initial=1)) if width is None else width
    if n and width < counts.max():
        raise ValueError(f"width {width} is below the {counts.max()} distinct rows of a batch")
    gather = np.zeros((n, width), dtype=np.int64)
    batch = np.broadcast_to(np.arange(n)[:, None], ordered.shape)
    gather[batch[first], position[first]] = ordered[first]
    pad = np.arange(width)[None, :] >= counts[:, None]
    gather[pad] = np.broadcast_to(gather[np.arange(n), counts - 1][:, None], (n, width))[pad]
    local = np.empty_like(position)
    np.put_along_axis(local, order, position, axis=1)
    return gather, local.reshape(n, b, k), counts


def plan_batches(neighbors, rows, batch_size: int, with_neighbors: bool = True,
                 widths: dict[int, int] | None = None) -> list[Batches]:
    """`rows` cut in order into batches of `batch_size`, as host index tensors.

    neighbors (N, k): the spot table's neighbourhoods, self first (tensor or array, any device;
    read on the host); rows (R,): the targets in visiting order. Returns the full batches as one
    group and the remainder (R mod batch_size) as a second, in that order; empty groups are left
    out. Without neighbours only the targets are gathered (local is (b, 1)). widths: gather width
    per batch size (padding for fixed shapes; None: each group's own maximum).
    """
    neighbors = torch.as_tensor(neighbors).cpu().numpy()
    rows = torch.as_tensor(rows).cpu().numpy().astype(np.int64, copy=False)
    groups, n_full = [], len(rows) // batch_size
    for start, count, size in ((0, n_full, batch_size), (n_full * batch_size, 1, len(rows) - n_full * batch_size)):
        if count == 0 or size == 0:
            continue
        targets = rows[start:start + count * size].reshape(count, size)
        neighborhoods = neighbors[targets].astype(np.int64) if with_neighbors else targets[:, :, None]
        gather, local, counts = _dedup(neighborhoods, (widths or {}).get(size))
        groups.append(Batches(torch.from_numpy(targets.copy()), torch.from_numpy(gather),
                              torch.from_numpy(local), counts))
    return groups


def batch_rows(neighbors: torch.Tensor, with_neighbors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: neighbors (B, k) spot rows, self first -> (unique (U,), local (B, k)), unique[local] == neighbors.

    Without neighbours only the targets are gathered (local is (B, 1)). On the input's device.
    """
    neighbors = torch.as_tensor(neighbors)
    table = neighbors.cpu()
    plan = plan_batches(table, torch.arange(len(table)), max(1, len(table)), with_neighbors)
    if not plan:
        return neighbors.new_zeros(0), neighbors.new_zeros((0, neighbors.shape[1] if with_neighbors else 1))
    return plan[0].gather[0].to(neighbors.device), plan[0].local[0].to(neighbors.device)
