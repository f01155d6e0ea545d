"""torch.distributed glue: the same code runs as 1 process, under torchrun or under accelerate launch.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1
the process group is initialised from them ("env://"), NCCL on GPUs and gloo on CPUs. Gradients are
summed explicitly with all-reduce after accumulation (no DDP wrapper), which keeps the update equal
to one large batch by construction and works the same with PEFT, frozen parts and checkpointing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DistContext", "init_distributed"]


@dataclass
class DistContext:
    """This process's place in the run. `device`: torch.device; `owns_group`: we created the group."""

    rank: int
    world_size: int
    local_rank: int
    device: object
    owns_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values):
        """Sum a list of numbers (or one number) over all processes; returns float64 numpy values."""
        import numpy as np
        import torch

        array = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if self.world_size == 1:
            return array if np.ndim(values) else float(array[0])
        tensor = torch.from_numpy(array.copy()).to(self._reduce_device())
        torch.distributed.all_reduce(tensor)
        out = tensor.cpu().numpy()
        return out if np.ndim(values) else float(out[0])

    def all_ok(self, ok: bool) -> bool:
        """True only when every process says ok."""
        return self.all_sum(0.0 if ok else 1.0) == 0.0

    def sum_gradients(self, parameters) -> None:
        """All-reduce (sum) the gradients of `parameters` in place; missing grads count as zeros."""
        import torch

        if self.world_size == 1:
            return
        grads = []
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            grads.append(parameter.grad)
        # One flat buffer per dtype: far fewer collective calls than one per tensor.
        by_dtype: dict = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in group:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch

            torch.distributed.barrier()

    def _reduce_device(self):
        import torch

        backend = torch.distributed.get_backend()
        return self.device if "nccl" in str(backend) else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group:
            import torch

            torch.distributed.destroy_process_group()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group the launcher describes (if any) and pick this process's device."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    owns = False
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    return DistContext(rank, world_size, local_rank, chosen, owns)
