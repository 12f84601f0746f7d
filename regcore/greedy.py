"""The greedy symmetric optimiser of a :class:`~regcore.transforms.syn.SymmetricDiffeomorphism`
on one pyramid level (``optimizer: greedy``): ANTs SyN's update, with the similarity's voxel
gradients from autograd (analytic for ``lcc``).

Each iteration, on the level grid (the midpoint space):

1. warp both images halfway: ``I = F(phi_f(m))``, ``J = M(A phi_m(m))`` (``A`` the linear map of
   the earlier stages);
2. the objective's gradients ``dL/dI``, ``dL/dJ`` per voxel, turned into a force by the images'
   world gradients: ``f = (dL/dI grad I - dL/dJ grad J) / 2``, the descent direction of the moving
   half (the fixed half gets ``-f``: the two move towards each other and the midpoint stays
   between them);
3. smooth ``f`` (Gaussian, ``update_sigma_vox``: the fluid-like regularisation) and scale it so its
   largest vector is ``lr`` voxels (the step: a normalised gradient step, as ANTs' gradient step
   and greedy's epsilon);
4. compose each half with its step, ``phi <- phi o (id +- f)`` (to first order, see
   :func:`regcore.fields.compose_first_order`), then smooth both half fields
   (``field_sigma_vox``: the diffusion-like regularisation).

Small steps of a smoothed field compose into a diffeomorphism in practice; :mod:`regcore.registration`
reports the Jacobian determinant of the result.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Callable

import torch

from .config import StageConfig
from .errors import RegistrationError
from .fields import FieldSampler, compose_first_order, world_gradient
from .image import Image
from .objective import Objective
from .optimize import Callback, LevelRecord
from .pyramid import gaussian_smooth
from .sampling import inside_weight, sample_normalized
from .stopping import Plateau
from .transforms.syn import SymmetricDiffeomorphism

__all__ = ["optimize_symmetric_level"]

log = logging.getLogger(__name__)


def _smoother(sigma_vox: float, ndim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if sigma_vox <= 0:
        return lambda field: field
    return lambda field: gaussian_smooth(field, [sigma_vox] * ndim)


def _largest_norm(field: torch.Tensor) -> float:
    return float((field * field).sum(0).max().sqrt())


def optimize_symmetric_level(
    record: LevelRecord,
    stage: StageConfig,
    transform: SymmetricDiffeomorphism,
    objective: Objective,
    fixed: Image,
    moving: Image,
    fixed_mask: Image | None,
    moving_mask: Image | None,
    matrix: torch.Tensor,
    max_iter: int,
    level: int,
    callback: Callback | None = None,
) -> None:
    """Fit ``transform``'s half fields on the level grid of ``fixed`` (see the module doc).

    Args:
        record: filled with the losses (before each iteration, then at the end), iterations,
            evaluations, stop reason and time.
        fixed, moving: the level's (normalised) images; ``moving`` on its own grid.
        fixed_mask, moving_mask: optional masks on the same grids.
        matrix: ``(D+1, D+1)`` fixed -> moving linear map of the previous stages (world mm).
    """
    t0 = time.perf_counter()
    grid = fixed.grid
    d = grid.ndim
    transform.set_level(grid)
    record.size = grid.size
    record.voxels = grid.numel
    device, dtype = fixed.device, fixed.dtype
    to_fixed, to_moving = (f.clone() for f in transform.midpoint_fields())
    fixed_sampler = FieldSampler(grid, grid, device=device, dtype=dtype)
    moving_sampler = FieldSampler(moving.grid, grid, matrix.detach(), device=device, dtype=dtype)
    settings = stage.smoothing
    smooth_update = _smoother(settings.update_sigma_vox if settings else 0.0, d)
    smooth_field = _smoother(settings.field_sigma_vox if settings else 0.0, d)
    step_mm = stage.optimizer.lr * min(grid.spacing)

    def evaluate(with_gradient: bool):
        image_f, coords_f = fixed_sampler.sample(fixed.data, to_fixed, padding="border")
        image_m, coords_m = moving_sampler.sample(moving.data, to_moving, padding="border")
        if objective.overlap_only:
            mask = inside_weight(coords_f, grid.size) * inside_weight(coords_m, moving.grid.size)
        else:
            mask = torch.ones_like(image_f[0])
        if fixed_mask is not None:
            mask = mask * sample_normalized(fixed_mask.data, coords_f)[0]
        if moving_mask is not None:
            mask = mask * sample_normalized(moving_mask.data, coords_m)[0]
        if not bool((mask > 0).any()):
            raise RegistrationError(
                f"stage {record.stage} level {level}: the images no longer overlap at the midpoint"
            )
        if not with_gradient:
            with torch.no_grad():
                loss, parts = objective.similarity(image_f[None], image_m[None], mask[None, None], grid.spacing)
            return loss, parts, None
        image_f.requires_grad_(True)
        image_m.requires_grad_(True)
        with torch.enable_grad():
            loss, parts = objective.similarity(image_f[None], image_m[None], mask[None, None], grid.spacing)
            grad_f, grad_m = torch.autograd.grad(loss, [image_f, image_m])
        with torch.no_grad():
            force = world_gradient(image_f.detach()[0], grid) * grad_f[0]
            force.sub_(world_gradient(image_m.detach()[0], grid) * grad_m[0]).mul_(0.5)
        return loss, parts, force

    plateau = Plateau(stage.stopping)
    record.stop_reason = "max_iterations"
    evaluations = 0
    with torch.no_grad():
        for it in range(max_iter):
            loss_t, parts, force = evaluate(True)
            evaluations += 1
            loss = float(loss_t)
            if not math.isfinite(loss):
                raise RegistrationError(f"non-finite loss ({loss}) at stage {record.stage}, level {level}")
            record.losses.append(loss)
            record.iterations = it + 1
            if callback is not None:
                callback({"event": "iteration", "stage": record.stage, "level": level, "factor": record.factor,
                          "iteration": it, "loss": loss, "terms": parts})
            if plateau.update(loss):
                record.stop_reason = "converged"
                break
            force = smooth_update(force)
            largest = _largest_norm(force)
            if not largest > 0:
                record.stop_reason = "converged"
                break
            force.mul_(step_mm / largest)
            to_moving = smooth_field(compose_first_order(to_moving, force, grid))
            to_fixed = smooth_field(compose_first_order(to_fixed, force.neg_(), grid))
        transform.set_halves(to_fixed, to_moving)
        final, _, _ = evaluate(False)
    record.losses.append(float(final))
    record.evaluations = evaluations + 1
    record.seconds = time.perf_counter() - t0
    log.debug("syn stage %d level %d (x%g): %d iterations, loss %.6g, %s", record.stage, level, record.factor,
              record.iterations, float(final), record.stop_reason)
    if callback is not None:
        callback({"event": "level", **asdict(record)})
