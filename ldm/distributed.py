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


def resolve_device(flag: str, local_rank: int = 0) -> torch.device:
    """``--device``: "auto" (cuda:LOCAL_RANK when a GPU is there, else the CPU) or a torch device name.
    One that does not exist here is an InputError naming it."""
    if flag == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {flag!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {flag}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise InputError(f"--device {flag}: only cpu and cuda devices are supported")
    return device


def init_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_flag, d.local_rank)
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
