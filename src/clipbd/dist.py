"""Distribution: the only module that imports `torch.distributed`.

`init(device)` turns whatever launched us (plain python, torchrun, srun/submitit) into one `DistInfo`
record and, when there is more than one process, starts the process group (NCCL on GPU, gloo on CPU).
Everything else asks this module (`rank()`, `world()`, `is_main()`, `barrier()`, `all_gather_cat()`)
and works unchanged with one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"


_INFO = DistInfo()


def _from_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun, or submitit's TorchDistributedEnvironment
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if env.get("SUBMITIT_EXECUTOR") == "local":  # submitit's local executor (tasks_per_node > 1)
        import submitit

        je = submitit.JobEnvironment()
        return je.global_rank, je.num_tasks, je.local_rank
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:  # srun with several tasks
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _rendezvous() -> tuple[str, str]:
    """MASTER_ADDR/PORT: as given (torchrun, user), else under SLURM the job's first node and a port
    derived from the job id (so two jobs sharing a node do not collide), else this host."""
    env = os.environ
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if "SLURM_JOB_ID" in env:
        if addr is None and env.get("SLURM_JOB_NODELIST"):
            from submitit.slurm.slurm import _parse_node_list  # expands e.g. "gpu[01-04]"

            addr = _parse_node_list(env["SLURM_JOB_NODELIST"])[0]
        port = port or str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return addr or "127.0.0.1", port or "29500"


def resolve_device(spec: str, local_rank: int = 0) -> str:
    if spec == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={spec}: CUDA is not available on this machine; use device=cpu or auto")
    return spec


def init(device: str = "auto") -> DistInfo:
    """Read the launcher's environment, start the process group if needed, remember the result."""
    global _INFO
    rank, world, local_rank = _from_env()
    dev = resolve_device(device, local_rank)
    if world > 1 and not td.is_initialized():
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = _rendezvous()
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        td.init_process_group(backend=backend, rank=rank, world_size=world)
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
    _INFO = DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)
    return _INFO


def info() -> DistInfo:
    return _INFO


def rank() -> int:
    return _INFO.rank


def world() -> int:
    return _INFO.world


def is_main() -> bool:
    return _INFO.rank == 0


def barrier() -> None:
    if _INFO.world > 1:
        td.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0 (rank order); equal n on every rank.
    The local slice keeps its autograd graph, so a loss over the result trains this rank's rows."""
    if _INFO.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_INFO.world)]
    td.all_gather(parts, x.detach().contiguous())
    parts[_INFO.rank] = x
    return torch.cat(parts, dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) `obj` on every rank, e.g. the run directory rank 0 decided on."""
    if _INFO.world == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _INFO.world > 1:
        td.all_reduce(x, op=td.ReduceOp.SUM)
    return x


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()
