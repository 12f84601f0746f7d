"""Many pairs that share a fixed image, registered together: :func:`register_batch`.

B pairs ``(fixed, moving_b)`` are optimised as one batched problem on one device: the tensors of
a pyramid level are ``(B, C, *shape)`` and every resampling, similarity and update runs once for
the batch. Each pair keeps its own transform, loss, objective scale, stopping rule and best
iterate: a pair that has converged leaves the batch's active set (it stops changing) while the
others go on, and a pair whose input is bad, or whose loss turns non-finite, fails alone: its
entry in the returned list is a :class:`RegistrationFailure` that says why.

Moving images may differ in size, spacing and direction. Each one is sampled through its own
world -> normalised map; for one ``grid_sample`` call they are replicate-padded to a common
array shape (the largest per axis), and each pair's normalised coordinates are rescaled into its
own corner of that array. Replication makes border-clamped sampling outside each image's own
box give exactly what sampling that image alone gives, so a batch reproduces single runs.

:func:`regcore.register` is the one-pair API; both run the same level optimisers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from .config import MethodConfig
from .grid import Grid
from .image import Image
from .methods import method_config
from .registration import RegistrationFailure, RegistrationResult, register_pairs

__all__ = ["register_batch", "RegistrationFailure", "is_out_of_memory", "estimate_pair_bytes", "max_batch_size"]


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device (CUDA) or host out-of-memory error: the batch is too large, not a pair bad."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def estimate_pair_bytes(fixed: Grid, moving: Grid | None, method: str | dict | MethodConfig,
                        config: dict | str | Path | None = None) -> int:
    """Rough peak device memory of one pair of a batch (bytes), from the grids and the method.

    The optimisation of a level holds, per fixed-grid voxel of the level, the resampling
    coordinates, the images, the similarity's window moments and gradients and (deformable) the
    fields and their updates: about 48 float32 values per voxel for a deformable stage, 16 for a
    linear one. The finest level of each stage dominates. The result (displacement, warped
    image, Jacobian on the full fixed grid) adds 6 values per fixed voxel, and the moving image
    itself its voxel count.
    """
    cfg = method_config(method, config)
    moving = moving or fixed
    peak = 0
    for stage in cfg.stages:
        per_voxel = 48 if stage.deformable else 16
        levels = stage.pyramid.level_factors(fixed.spacing, moving.spacing)
        finest = min(factor for factor, _, _ in levels) if levels else 1.0
        voxels = fixed.downsample(finest, stage.pyramid.min_size).numel if finest != 1 else fixed.numel
        peak = max(peak, per_voxel * voxels)
    return int(4 * (peak + 6 * fixed.numel + 2 * moving.numel))


def max_batch_size(fixed: Grid, moving: Grid | None, method: str | dict | MethodConfig,
                   device: torch.device | str, config: dict | str | Path | None = None,
                   limit: int = 32, headroom: float = 0.8) -> int:
    """The largest batch (at most ``limit``) whose estimated memory fits ``headroom`` of the free
    memory of a CUDA ``device`` (``torch.cuda.mem_get_info``); 1 on other devices."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(dev)
    per_pair = max(1, estimate_pair_bytes(fixed, moving, method, config))
    return max(1, min(limit, int(free * headroom) // per_pair))


def register_batch(
    fixed: Image | str | Path,
    movings: Sequence[Image | str | Path],
    method: str | dict | MethodConfig = "affine+syn",
    *,
    config: dict | str | Path | None = None,
    fixed_mask: Image | None = None,
    moving_masks: Sequence[Image | None] | None = None,
    device: torch.device | str | None = None,
    fixed_levels: Mapping[float, Image] | None = None,
    moving_levels: Sequence[Mapping[float, Image] | None] | None = None,
    deterministic: bool = False,
) -> list[RegistrationResult | RegistrationFailure]:
    """Register every image of ``movings`` to ``fixed``; one entry per moving image, in order.

    Args:
        fixed: the shared fixed image (or path).
        movings: B moving images (or paths); grids may differ (see the module doc).
        method, config: as for :func:`regcore.register`.
        fixed_mask: optional mask on the fixed grid.
        moving_masks: optional masks, one per moving image (``None`` entries allowed).
        device: where to compute; default the fixed image's device.
        fixed_levels, moving_levels: precomputed pyramid levels (see :func:`regcore.register`).
        deterministic: reproducible CUDA results (no atomics in differentiated warps; see
            :func:`regcore.registration.register_pairs` for what it covers and costs).

    Returns:
        A :class:`RegistrationResult` per registered pair, a :class:`RegistrationFailure` for a
        pair that failed (bad input, non-finite loss, moved out of view).

    Raises:
        InputError: an invalid method or config (that concerns every pair).
        torch.cuda.OutOfMemoryError, MemoryError: the batch does not fit the device; nothing
            is returned, so the caller can split the batch and retry.
    """
    return register_pairs(fixed, movings, method, config=config, fixed_mask=fixed_mask, moving_masks=moving_masks,
                          device=device, fixed_levels=fixed_levels, moving_levels=moving_levels,
                          deterministic=deterministic)
