"""Multi-process training (``accelerate launch`` / torchrun): rank, barrier, DDP wrapping."""
from __future__ import annotations

import os

from gift_quant.errors import GiftError


def dist_rank() -> tuple[int, int]:
    """(rank, world size) of this process under ``accelerate launch`` / torchrun; (0, 1) otherwise.
    Read from the launcher's environment, so it works before any process group exists."""
    return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return dist_rank()[0] == 0


def barrier(world: int):
    """Wait for every rank. accelerate's wait_for_everyone() is a no-op for CPU ranks (distributed type NO),
    so this uses the process group it initializes."""
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            from accelerate import PartialState
            PartialState()
        if dist.is_initialized():
            dist.barrier()


def accelerator(cpu: bool = False):
    if dist_rank()[1] <= 1:
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        raise GiftError("multi-process training needs `pip install accelerate`") from None
    return Accelerator(cpu=cpu)


def ddp(acc, model):
    """DDP via accelerate. Its construction broadcasts parameters and buffers from rank 0 once, so every
    rank trains on identical frozen weights; after that the frozen buffers (dense base, codes, noise
    scales: the whole model) are not re-sent on every forward, as DDP's default would do."""
    run_model = acc.prepare_model(model)
    if hasattr(run_model, "broadcast_buffers"):  # older torch: an attribute; newer: forward_sync_buffers
        run_model.broadcast_buffers = False
    return run_model
