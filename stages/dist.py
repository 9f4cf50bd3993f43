"""The few distributed helpers the stages need (launch with ``torchrun``; nothing home-made)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ArtifactError, RaeError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group if there is one; otherwise a world of one.

    ``device``: "auto" (CUDA if available), "cpu" or "cuda". Under torchrun with CUDA each rank
    takes GPU ``LOCAL_RANK`` and the backend is NCCL; on CPU it is gloo.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision auto``: bf16 autocast on CUDA, fp32 elsewhere; any other value as it is."""
    return precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it). float64 stays float64, so statistics stay exact."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_decides(decide):
    """Run ``decide()`` on rank 0 only and return its result on every rank. A user error (RaeError)
    raised there is raised on every rank, so no rank is left waiting at the next collective."""
    result, error = None, None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            result = decide()
        except RaeError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error:
        raise ArtifactError(error)
    return result


def all_gather_object(obj) -> list:
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(indices, rank: int, world: int):
    """Round-robin share of ``indices`` for ``rank`` (every item exactly once over all ranks)."""
    return indices[rank::world]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
