"""One process or many: the same training code under ``torchrun`` (DistributedDataParallel).

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), picks the device
(cuda:LOCAL_RANK on GPUs) and joins the process group (NCCL on GPUs, gloo on CPUs). ``Dist`` is this
process's place in the job; rank 0 builds caches, logs, validates and saves.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ldm.errors import InputError

DIST_TIMEOUT = timedelta(hours=2)  # how long ranks wait for rank 0 (it builds the cache of a large dataset alone)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """Run ``fn`` on rank 0 while the others wait; an InputError there is raised on every rank."""
        error = None
        if self.main:
            try:
                fn()
            except InputError as e:
                error = str(e)
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise InputError(error)


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_flag == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    return d, device


def weights_digest(*modules: torch.nn.Module) -> str:
    """sha256 over the exact bytes of every tensor of every state dict (to compare ranks)."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
