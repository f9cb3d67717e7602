"""The processes of a `torchrun` launch, as one small object the stages and the trainer pass around.

`torchrun --nproc-per-node N -m saepipe <stage>` starts N copies of the stage with RANK, WORLD_SIZE and
LOCAL_RANK in their environment; `World.from_env()` joins them into one torch.distributed process group
(gloo on the CPU, NCCL on CUDA). Run without torchrun, it is the one-process world: every collective
below returns its input untouched and costs nothing, so single-process code paths stay as they were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> World:
        """The launch's world (initialising the process group once), or the single process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = device is not None and device.type == "cuda"
            if cuda:
                torch.cuda.set_device(local_rank)
            # NCCL for CUDA tensors, gloo for the few CPU ones (counts, flags) the stages also exchange
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        return cls(rank, size, local_rank)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared outputs and prints summaries."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process's own GPU (`cuda:LOCAL_RANK`) when the stage runs on CUDA."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    # ---- collectives (no-ops in a one-process world) ---------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_(self, tensor: Tensor) -> Tensor:
        """In-place sum over the ranks (contiguous tensors)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def min_(self, tensor: Tensor) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def sum_float(self, value: float, device: torch.device | None = None) -> float:
        return float(self.sum_(torch.tensor([value], dtype=torch.float64, device=device))[0])

    def sum_int(self, value: int, device: torch.device | None = None) -> int:
        return int(self.sum_(torch.tensor([value], dtype=torch.long, device=device))[0])

    def min_float(self, value: float, device: torch.device | None = None) -> float:
        return float(self.min_(torch.tensor([value], dtype=torch.float64, device=device))[0])

    def broadcast_(self, tensor: Tensor, src: int = 0) -> Tensor:
        if self.distributed:
            dist.broadcast(tensor, src)
        return tensor

    def gather(self, values: Tensor) -> list[Tensor]:
        """Every rank's 1-D `values` (lengths may differ), in rank order, on every rank."""
        if not self.distributed:
            return [values]
        sizes = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.size)]
        dist.all_gather(all_sizes, sizes)
        longest = int(max(int(s) for s in all_sizes))
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[: values.numel()] = values
        out = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(out, padded)
        return [chunk[: int(size)] for chunk, size in zip(out, all_sizes, strict=True)]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
