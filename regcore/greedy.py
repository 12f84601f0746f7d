"""The greedy symmetric optimiser of a :class:`~regcore.transforms.syn.SymmetricDiffeomorphism`
on one pyramid level (``optimizer: greedy``): ANTs SyN's update, with the similarity's voxel
gradients from autograd (analytic for ``lcc``). A batch of pairs that share the fixed image runs
as one set of ``(B, D, *shape)`` tensors, each pair with its own step and stopping rule.

Each iteration, on the level grid (the midpoint space):

1. warp both images halfway: ``I = F(phi_f(m))``, ``J = M(A phi_m(m))`` (``A`` the linear map of
   the earlier stages);
2. the objective's gradients ``dL/dI``, ``dL/dJ`` per voxel, turned into a force by the images'
   world gradients: ``f = (dL/dI grad I - dL/dJ grad J) / 2``, the descent direction of the moving
   half (the fixed half gets ``-f``: the two move towards each other and the midpoint stays
   between them);
3. smooth ``f`` (Gaussian, ``update_sigma_vox`` voxels of the level but at least
   ``update_sigma_mm``: the fluid-like regularisation) and scale it so its largest vector is
   ``lr`` voxels (the step: a normalised gradient step, as ANTs' gradient step and greedy's
   epsilon);
4. compose each half with its step, ``phi <- phi o (id +- f)`` (to first order, see
   :func:`regcore.fields.compose_first_order`), then smooth both half fields
   (``field_sigma_vox``, at least ``field_sigma_mm``: the diffusion-like regularisation).

Small steps of a smoothed field compose into a diffeomorphism in practice; :mod:`regcore.registration`
reports the Jacobian determinant of the result.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from typing import Callable, Sequence

import torch

from .config import SmoothingConfig, StageConfig
from .errors import RegistrationError
from .fields import compose_first_order, world_gradient
from .image import Image
from .objective import Objective
from .optimize import Callback, LevelRecord
from .pyramid import gaussian_smooth
from .moving_stack import MovingStack
from .stopping import Plateau
from .transforms.syn import SymmetricDiffeomorphism

__all__ = ["optimize_symmetric_level", "level_sigmas"]

log = logging.getLogger(__name__)


def level_sigmas(sigma_vox: float, sigma_mm: float, spacing: Sequence[float]) -> list[float]:
    """The Gaussian sigma per tensor dim ``(z, y, x)``, in voxels of a level of voxel size
    ``spacing`` (mm, ``(x, y, z)``): ``sigma_vox``, but never less than ``sigma_mm`` in mm."""
    return [max(sigma_vox, sigma_mm / s) for s in reversed(spacing)]


def _smoother(sigmas: Sequence[float], ndim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gaussian smoothing of fields ``(..., D, *shape)`` (sigmas in voxels, tensor dim order)."""
    if all(s <= 0 for s in sigmas):
        return lambda field: field

    def smooth(field: torch.Tensor) -> torch.Tensor:
        shape = field.shape
        flat = field.reshape(-1, *shape[-ndim:])
        return gaussian_smooth(flat, list(sigmas)).reshape(shape)

    return smooth


def _largest_norms(field: torch.Tensor) -> torch.Tensor:
    """The largest vector length of each field of a batch ``(B, D, *shape)``: ``(B,)``."""
    return (field * field).sum(1).flatten(1).amax(1).sqrt()


class _MidpointSampler:
    """Both halves of a batch of pairs sampled at the midpoint grid: the fixed image (shared) at
    ``x + to_fixed(x)`` and each moving image at ``A_b (x + to_moving_b(x))``."""

    def __init__(self, fixed: Image, movings: Sequence[Image], fixed_mask: Image | None,
                 moving_masks: Sequence[Image | None], matrices: Sequence[torch.Tensor], overlap_only: bool) -> None:
        grid = fixed.grid
        dev, dtype = fixed.device, fixed.dtype
        self.ndim, self.overlap_only = grid.ndim, overlap_only
        self.fixed = MovingStack([fixed])
        self.fixed_mask = MovingStack([fixed_mask]) if fixed_mask is not None else None
        self.moving = MovingStack(movings)
        self.moving_mask = (MovingStack(moving_masks, [m.grid for m in movings])
                            if any(m is not None for m in moving_masks) else None)
        # the normalised coordinates of the voxel centres (fixed) and of A x (each moving image):
        # affine in the index, kept as per-axis ramps rather than dense (*shape, D) arrays
        index_to_world = torch.as_tensor(grid.index_to_world(), dtype=torch.float64, device=dev)
        w2n_f = torch.as_tensor(grid.world_to_normalized(), dtype=torch.float64, device=dev)
        self.ramps_f = self._plane_and_line(grid.index_ramps(w2n_f @ index_to_world, dev, dtype))
        self.lin_f = w2n_f[:-1, :-1].to(dtype)
        w2n_m = [torch.as_tensor(m.grid.world_to_normalized(), dtype=torch.float64, device=dev) @ a.detach().to(torch.float64)
                 for m, a in zip(movings, matrices)]
        ramps_m = [self._plane_and_line(grid.index_ramps(w @ index_to_world, dev, dtype)) for w in w2n_m]
        self.ramps_m = [torch.stack([r[t] for r in ramps_m]) for t in range(len(ramps_m[0]))]  # (B, ..., D) each
        self.lin_m = torch.stack([w[:-1, :-1] for w in w2n_m]).to(dtype)  # (B, D, D)

    @staticmethod
    def _plane_and_line(ramps: list[torch.Tensor]) -> list[torch.Tensor]:
        """All but the last axis's ramps summed into one small array: two broadcast adds per
        coordinate array instead of one per axis."""
        plane = ramps[0]
        for ramp in ramps[1:-1]:
            plane = plane + ramp
        return [plane, ramps[-1]]

    def _coords(self, ramps: Sequence[torch.Tensor], lin: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``base + lin u`` per voxel (``base`` the broadcast sum of ``ramps``): ``u``
        ``(B', D, *shape)`` -> ``(B', *shape, D)``."""
        n, d = u.shape[0], self.ndim
        step = torch.movedim(u, 1, -1).reshape(n, -1, d)
        step = (step @ lin.transpose(-1, -2)).reshape(n, *u.shape[2:], d)  # lin (D, D) or (B', D, D)
        for ramp in ramps:
            step.add_(ramp)
        return step

    def sample(self, index: list[int], to_fixed: torch.Tensor, to_moving: torch.Tensor):
        """``(fixed half (B', 1, *s), moving half (B', 1, *s), mask (B', 1, *s))`` of pairs ``index``."""
        every = len(index) == len(self.moving)
        coords_f = self._coords(self.ramps_f, self.lin_f, to_fixed)
        coords_m = self._coords(self.ramps_m if every else [r[index] for r in self.ramps_m],
                                self.lin_m if every else self.lin_m[index], to_moving)
        image_f = self.fixed.sample(coords_f, None, padding="border")
        image_m = self.moving.sample(coords_m, index, padding="border")
        if self.overlap_only:
            mask = self.fixed.inside_weight(coords_f) * self.moving.inside_weight(coords_m, index)
        else:
            mask = torch.ones_like(coords_f[..., 0])
        mask = mask[:, None]
        if self.fixed_mask is not None:
            mask = mask * self.fixed_mask.sample(coords_f)
        if self.moving_mask is not None:
            mask = mask * self.moving_mask.sample(coords_m, index)
        return image_f, image_m, mask


def optimize_symmetric_level(
    records: Sequence[LevelRecord],
    stage: StageConfig,
    transforms: Sequence[SymmetricDiffeomorphism],
    objective: Objective,
    fixed: Image,
    movings: Sequence[Image],
    fixed_mask: Image | None,
    moving_masks: Sequence[Image | None],
    matrices: Sequence[torch.Tensor],
    max_iter: int,
    level: int,
    callback: Callback | None = None,
) -> dict[int, Exception]:
    """Fit each pair's half fields on the level grid of ``fixed`` (see the module doc), a batch of
    B pairs that share the fixed image in one set of ``(B, D, *shape)`` tensors.

    Args:
        records: one per pair, filled with the losses (before each iteration, then at the end),
            iterations, evaluations, stop reason and time.
        transforms: one per pair.
        fixed, movings: the level's (normalised) images; each moving on its own grid.
        fixed_mask, moving_masks: optional masks on the same grids.
        matrices: ``(D+1, D+1)`` fixed -> moving linear map of the previous stages (world mm), per pair.

    Each pair has its own loss, stopping rule and step normalisation; a converged pair leaves
    the active set and stops changing. Returns ``{b: exception}`` for the pairs that failed
    (non-finite loss, no overlap left); the others' transforms hold their fitted halves.
    """
    t0 = time.perf_counter()
    grid = fixed.grid
    d = grid.ndim
    n = len(transforms)
    for transform in transforms:
        transform.set_level(grid)
    for record in records:
        record.size, record.voxels, record.stop_reason = grid.size, grid.numel, "max_iterations"
    to_fixed = torch.stack([t.midpoint_fields()[0] for t in transforms])  # stack copies
    to_moving = torch.stack([t.midpoint_fields()[1] for t in transforms])
    for transform in transforms:  # the level holds the only copy until it hands the fitted ones back
        transform.release_halves()
    sampler = _MidpointSampler(fixed, movings, fixed_mask, moving_masks, matrices, objective.overlap_only)
    settings = stage.smoothing or SmoothingConfig()
    smooth_update = _smoother(level_sigmas(settings.update_sigma_vox, settings.update_sigma_mm, grid.spacing), d)
    smooth_field = _smoother(level_sigmas(settings.field_sigma_vox, settings.field_sigma_mm, grid.spacing), d)
    step_mm = stage.optimizer.lr * min(grid.spacing)
    failures: dict[int, Exception] = {}
    evaluations = [0] * n

    def evaluate(index: list[int], with_gradient: bool):
        """Losses ``(B',)``, parts and forces of the pairs ``index``; a pair with no overlap left
        is recorded in ``failures`` (its values, computed with a full mask, are discarded)."""
        every = len(index) == n
        image_f, image_m, mask = sampler.sample(index, to_fixed if every else to_fixed[index],
                                                to_moving if every else to_moving[index])
        empty = (mask.flatten(1).amax(1) <= 0).tolist()
        for j in [j for j, e in enumerate(empty) if e]:
            failures[index[j]] = RegistrationError(
                f"stage {records[index[j]].stage} level {level}: the images no longer overlap at the midpoint")
        if any(empty):
            mask = mask.clone()
            mask[torch.as_tensor(empty, device=mask.device)] = 1.0  # evaluated but discarded: keeps the others' weights valid
        if not with_gradient:
            losses, parts = objective.similarity_per_pair(image_f, image_m, mask, grid.spacing)
            return losses, parts, None
        image_f.requires_grad_(True)
        image_m.requires_grad_(True)
        with torch.enable_grad():
            losses, parts = objective.similarity_per_pair(image_f, image_m, mask, grid.spacing)
            grad_f, grad_m = torch.autograd.grad(losses.sum(), [image_f, image_m])
        force = world_gradient(image_f.detach()[:, 0], grid).mul_(grad_f)
        force.sub_(world_gradient(image_m.detach()[:, 0], grid).mul_(grad_m)).mul_(0.5)
        return losses, parts, force

    plateaus = [Plateau(stage.stopping) for _ in range(n)]
    active = list(range(n))
    with torch.no_grad():
        for it in range(max_iter):
            if not active:
                break
            losses, parts, force = evaluate(active, True)
            keep: list[int] = []  # positions in active of the pairs that step
            for j, (b, loss) in enumerate(zip(active, losses.tolist())):
                if b in failures:
                    continue
                if not math.isfinite(loss):
                    failures[b] = RegistrationError(f"non-finite loss ({loss}) at stage {records[b].stage}, level {level}")
                    continue
                evaluations[b] += 1
                record = records[b]
                record.losses.append(loss)
                record.iterations = it + 1
                if callback is not None:
                    callback({"event": "iteration", "pair": b, "stage": record.stage, "level": level,
                              "factor": record.factor, "iteration": it, "loss": loss, "terms": parts[j]})
                if plateaus[b].update(loss):
                    record.stop_reason = "converged"
                else:
                    keep.append(j)
            if len(keep) != len(active):
                force = force[keep]
            index = [active[j] for j in keep]
            if not index:
                break
            force = smooth_update(force)
            largest = _largest_norms(force)
            moving = largest > 0
            for j in (~moving).nonzero().flatten().tolist():
                records[index[j]].stop_reason = "converged"
            if not bool(moving.all()):
                force, largest = force[moving], largest[moving]
                index = [b for b, m in zip(index, moving.tolist()) if m]
                if not index:
                    break
            force.mul_((step_mm / largest).reshape(-1, *([1] * (d + 1))))
            if len(index) == n:
                to_moving = smooth_field(compose_first_order(to_moving, force, grid))
                to_fixed = smooth_field(compose_first_order(to_fixed, force.neg_(), grid))
            else:
                to_moving[index] = smooth_field(compose_first_order(to_moving[index], force, grid))
                to_fixed[index] = smooth_field(compose_first_order(to_fixed[index], force.neg_(), grid))
            active = index
        live = [b for b in range(n) if b not in failures]
        for b in live:
            transforms[b].set_halves(to_fixed[b], to_moving[b])
        final = evaluate(live, False)[0].tolist() if live else []
    seconds = time.perf_counter() - t0
    for b, value in zip(live, final):
        if b in failures:
            continue
        record = records[b]
        record.losses.append(float(value))
        record.evaluations = evaluations[b] + 1
        record.seconds = seconds
        log.debug("syn stage %d level %d (x%g) pair %d: %d iterations, loss %.6g, %s", record.stage, level,
                  record.factor, b, record.iterations, float(value), record.stop_reason)
        if callback is not None:
            callback({"event": "level", "pair": b, **asdict(record)})
    return failures
