"""What the evaluation's torchrun processes share: every rank's value, and their summed speed."""
from typing import Any, List, Optional

import torch.distributed as torch_dist


def gather(value: Any, world: int) -> List[Any]:
    """This process's ``value``, from every process (rank order)."""
    if world == 1:
        return [value]
    out: List[Any] = [None] * world
    torch_dist.all_gather_object(out, value)
    return out


def sum_or_none(values: List[Optional[float]]) -> Optional[float]:
    """All processes together handle this many images per second (None where none measured)."""
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None
