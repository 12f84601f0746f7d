"""Validation of weight masks shared by the similarity measures and the regularisers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["prepare_mask"]


def prepare_mask(mask: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Broadcast ``mask`` to ``(N, 1, *spatial)`` on ``like``'s device/dtype and validate it."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    shape = (like.shape[0], 1, *like.shape[2:])
    try:
        weight = torch.broadcast_to(mask.to(device=like.device, dtype=like.dtype), shape)
    except RuntimeError as exc:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} is not broadcastable to {shape}"
        ) from exc
    totals = weight.detach().flatten(1).sum(1)
    if bool((totals <= 0).any()):
        bad = torch.nonzero(totals <= 0).flatten().tolist()
        raise InputError(
            f"mask sums to zero for batch element(s) {bad}: at least one voxel per batch "
            "element must have a positive weight"
        )
    return weight
