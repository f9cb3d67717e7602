"""Data-parallel training on torch.distributed: which rows each process holds, and the gradient exchange.

Every process walks the same global batches as a single-process run (the epoch's shuffle depends only
on (seed, epoch)); rank r takes the r-th contiguous block of each batch, so the global batch stays
`train.batch_size` and a rank's block is batch_size / world_size rows. It reads from the cache only the
rows its blocks use (1 / world_size of the training split for one epoch).

The gradients are all-reduced here, explicitly, rather than by wrapping the SAE in
DistributedDataParallel: DDP all-reduces inside `backward()` as autograd fills each gradient bucket,
but the trainer adds AuxK's gradients after `backward()`, outside autograd (`SparseAutoencoder.auxk_term`
writes the few dead latents' rows in place), and those must be summed across ranks too. DDP would also
average every loss term alike, whereas AuxK's term is a sum over the global batch normalised by its
global variance, not a mean. So after the backward each rank weights its mean-loss gradients by its
share of the global batch, adds its AuxK part, and one all-reduce over a flat buffer sums the dense
gradient tensors (the sparse kernels produce dense `.grad` buffers) together with the step's fired-latent
mask and loss figures; every rank then takes the same ConstrainedAdam step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from saepipe.distributed import World
from saepipe.training.data import epoch_order


def batch_bounds(n_rows: int, batch_size: int, world: World) -> list[tuple[int, int]]:
    """[start, stop) of each global batch in the epoch's order. A last batch with fewer rows than
    processes (some would get none) is left out under data parallelism; a single process keeps it."""
    bounds = [(start, min(start + batch_size, n_rows)) for start in range(0, n_rows, batch_size)]
    if bounds and bounds[-1][1] - bounds[-1][0] < world.size:
        bounds.pop()
    return bounds


def rank_block(batch: Tensor, world: World) -> Tensor:
    """This rank's contiguous block of a global batch (sizes differ by at most one row)."""
    n = batch.shape[0]
    return batch[n * world.rank // world.size : n * (world.rank + 1) // world.size]


def rows_needed(n_rows: int, batch_size: int, seed: int, epochs: range, world: World) -> np.ndarray:
    """The sorted global row ids this rank's blocks use over `epochs`."""
    needed = np.zeros(n_rows, bool)
    for epoch in epochs:
        order = epoch_order(n_rows, seed, epoch)
        for start, stop in batch_bounds(n_rows, batch_size, world):
            needed[rank_block(order[start:stop], world).numpy()] = True
    return np.flatnonzero(needed)


def gather_sample(train: Tensor, train_ids: np.ndarray, sample: Tensor, world: World, device: torch.device
                  ) -> Tensor:
    """float32 rows `sample` (global ids) on every rank, each row sent by the lowest rank holding it."""
    ids = sample.numpy()
    position = np.searchsorted(train_ids, ids).clip(max=max(len(train_ids) - 1, 0))
    held = torch.from_numpy(train_ids[position] == ids if len(train_ids) else np.zeros(len(ids), bool))
    owner = world.min_(torch.where(held, world.rank, world.size).to(device)).cpu()
    mine = (owner == world.rank).numpy()
    rows = torch.zeros(len(ids), train.shape[1], dtype=torch.float32, device=device)
    rows[torch.from_numpy(mine).to(device)] = train[torch.from_numpy(position[mine])].to(device).float()
    return world.sum_(rows)


def scale_gradients_(params: list[Tensor], factor: float) -> None:
    for param in params:
        if param.grad is not None:
            param.grad.mul_(factor)


def share_gradients_(params: list[Tensor], world: World, extra: Tensor) -> Tensor:
    """Sum every parameter's gradient and `extra` (1-D, float) over the ranks in one all-reduce; returns
    the summed `extra`. Missing gradients count as zero."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([*(param.grad.detach().reshape(-1) for param in params), extra.to(params[0].grad.dtype)])
    world.sum_(flat)
    offset = 0
    for param in params:
        size = param.numel()
        param.grad.copy_(flat[offset : offset + size].view(param.shape))
        offset += size
    return flat[offset:]
