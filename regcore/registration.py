"""The registration loop: objective + transform + torch optimiser + pyramid + stopping rules.

:func:`register` is the one-call entry point (``from regcore import register``). It never prints;
progress goes to an optional ``callback(event: dict)`` and to :mod:`logging`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .config import MethodConfig, StageConfig, config_hash
from .errors import InputError
from .greedy import optimize_symmetric_level
from .grid import Grid
from .image import Image
from .intensity import apply_window, intensity_window
from .io import read_image
from .levels import POINTWISE_MEASURES, DeformableLevel, LinearLevel
from .methods import method_config
from .objective import Objective
from .optimize import OUT_OF_VIEW_LOSS, Callback, LevelRecord, optimize_level
from .pyramid import downsample, gaussian_smooth
from .regularizers import jacobian_determinant
from .sampling import inside_mask, linear_coords, warp_linear
from .transforms.deformable import DeformableTransform, DenseDisplacement, deformable_transform_class
from .transforms.init import initialize_linear
from .transforms.linear import LINEAR_TRANSFORMS, LinearTransform, Translation
from .transforms.svf import StationaryVelocityField
from .transforms.syn import SymmetricDiffeomorphism

__all__ = ["register", "RegistrationResult", "LevelRecord", "check_pair", "linear_displacement"]

log = logging.getLogger(__name__)


@dataclass
class RegistrationResult:
    """The outcome of :func:`register`.

    Attributes:
        transform: the fitted linear map (fixed world -> moving world, mm); a zero translation
            when the method has no linear stage.
        deformable: the fitted deformable transform (``None`` for linear methods). The full map is
            ``T(x) = transform(x + u(x))`` with ``u = deformable.displacement(grid)``.
        warped: moving resampled on the fixed grid (original intensities), ``(1, *fixed.shape)``.
        displacement: ``T(x) - x`` on the fixed grid, ``(D, *fixed.shape)``, world mm, channels
            ``(x, y[, z])``: what an ITK ``DisplacementFieldTransform`` expects.
        jacobian: determinant of the Jacobian of ``T`` on the fixed grid (deformable methods).
        levels: per stage and pyramid level: losses per iteration, iterations, stop reason.
    """

    method: str
    config: MethodConfig
    config_hash: str
    transform: LinearTransform
    deformable: DeformableTransform | None
    warped: Image
    displacement: Image
    jacobian: Image | None
    levels: list[LevelRecord]
    seconds: float
    device: str

    @property
    def iterations(self) -> int:
        return sum(level.iterations for level in self.levels)

    @property
    def final_loss(self) -> float:
        for level in reversed(self.levels):
            if level.losses:
                return level.losses[-1]
        return math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: method, full config, hash, losses per level, iterations, time, device."""
        out = {
            "method": self.method,
            "config": self.config.model_dump(mode="json"),
            "config_hash": self.config_hash,
            "levels": [asdict(level) for level in self.levels],
            "loss_per_level": [level.losses[-1] if level.losses else None for level in self.levels],
            "iterations": self.iterations,
            "seconds": self.seconds,
            "device": self.device,
            "transform": self.transform.describe(),
        }
        if self.deformable is not None:
            out["deformable"] = {"type": self.deformable.kind}
        if self.jacobian is not None:
            det = self.jacobian.data
            out["jacobian"] = {
                "min": float(det.min()),
                "max": float(det.max()),
                "fraction_nonpositive": float((det <= 0).double().mean()),
            }
        return out


def _as_image(value: Image | str | Path, name: str) -> Image:
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, Path)):
        return read_image(value, scalar=True)
    raise InputError(f"{name}: expected an Image or a path, got {type(value).__name__}")


def check_pair(fixed: Image, moving: Image, fixed_name: str = "fixed", moving_name: str = "moving") -> None:
    """Validate a pair for registration; raise :class:`InputError` naming the culprit."""
    if fixed.ndim != moving.ndim:
        raise InputError(
            f"dimension mismatch: {fixed_name} is {fixed.ndim}D {fixed.grid.size}, "
            f"{moving_name} is {moving.ndim}D {moving.grid.size}"
        )
    for img, name in ((fixed, fixed_name), (moving, moving_name)):
        if img.channels != 1:
            raise InputError(f"{name}: has {img.channels} components per voxel; registration needs a scalar image")
        img.check_finite(name)
        if not bool((img.data != img.data.flatten()[0]).any()):
            raise InputError(f"{name}: image is constant (value {float(img.data.flatten()[0])}); nothing to register")


def _check_mask(mask: Image | None, ref: Image, name: str) -> Image | None:
    if mask is None:
        return None
    if not mask.grid.same_as(ref.grid, atol=1e-4):
        raise InputError(f"{name}: mask grid {mask.grid.size} does not match its image's grid {ref.grid.size}")
    if not bool((mask.data > 0).any()):
        raise InputError(f"{name}: mask is empty")
    return Image((mask.data > 0).to(ref.dtype), mask.grid)


def _make_transform(stage: StageConfig, fixed: Image) -> LinearTransform:
    length = float(np.linalg.norm(fixed.grid.extent())) / 2 or 1.0
    return LINEAR_TRANSFORMS[stage.transform](fixed.ndim, length_scale=length)


def register(
    fixed: Image | str | Path,
    moving: Image | str | Path,
    method: str | dict | MethodConfig = "affine",
    *,
    config: dict | str | Path | None = None,
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    fixed_levels: Mapping[float, Image] | None = None,
    moving_levels: Mapping[float, Image] | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (backward warping: the result samples moving on fixed's grid).

    Args:
        fixed, moving: images (or paths read through SimpleITK). They may differ in size, spacing
            and direction; they must overlap in world space after initialisation.
        method: a preset name (``rigid``, ``affine``, ...), a full config dict or a config.
        config: overrides (dict or YAML path) deep-merged over the preset.
        fixed_mask, moving_mask: binary masks on the images' grids restricting the similarity.
        device: where to compute; default the fixed image's device.
        callback: called with a dict for every iteration (``event="iteration"``: stage, level,
            factor, iteration, loss, terms) and at the end of each level (``event="level"``).
        fixed_levels, moving_levels: precomputed downsampled copies of the raw images by factor
            (e.g. read from an ingested Zarr pyramid, made with :func:`regcore.pyramid.downsample`).
            A pyramid level whose factor is present *and* whose grid is the one the level needs
            reads it (normalised with the full image's intensity window) instead of smoothing and
            resampling again; other levels are computed as usual.

    Raises:
        InputError: invalid images, masks or configuration, or no overlap in world space.
        RegistrationError: the optimisation produced a non-finite loss.
    """
    t0 = time.perf_counter()
    fixed_name = str(fixed) if isinstance(fixed, (str, Path)) else "fixed"
    moving_name = str(moving) if isinstance(moving, (str, Path)) else "moving"
    fixed, moving = _as_image(fixed, "fixed"), _as_image(moving, "moving")
    check_pair(fixed, moving, fixed_name, moving_name)
    cfg = method_config(method, config)
    dev = torch.device(device) if device is not None else fixed.device
    fixed = fixed.to(dev, torch.float32)
    moving_orig = moving.to(dev, torch.float32)
    fmask = _check_mask(fixed_mask.to(dev) if fixed_mask is not None else None, fixed, "fixed mask")
    mmask = _check_mask(moving_mask.to(dev) if moving_mask is not None else None, moving_orig, "moving mask")

    levels: list[LevelRecord] = []
    cache: dict = {}  # normalised images and pyramid levels, shared by the stages
    linear: LinearTransform | None = None
    deformable: DeformableTransform | None = None
    for s, stage in enumerate(cfg.stages):
        fwin, fixed_n = _normalized(cache, "fixed", fixed, stage.normalize)
        mwin, moving_n = _normalized(cache, "moving", moving_orig, stage.normalize)
        objective = Objective.from_config(stage, cfg.seed).to(dev)
        if stage.deformable:
            if linear is None:  # a deformable first stage: centre the images with a translation
                linear = Translation(fixed.ndim).to(dev)
                initialize_linear(linear, fixed, moving_orig, "none" if stage.init == "previous" else stage.init, fmask, mmask)
                _check_overlap(fixed, moving_orig, linear, fixed_name, moving_name)
            deformable = _make_deformable(stage, fixed).to(dev)
        else:
            previous = linear
            linear = _make_transform(stage, fixed).to(dev)
            if stage.init == "previous" and previous is not None:
                linear.set_center(previous.center.cpu())
                linear.set_matrix(previous.matrix().detach().cpu())
            else:
                initialize_linear(linear, fixed, moving_orig, "geometry" if stage.init == "previous" else stage.init, fmask, mmask)
            _check_overlap(fixed, moving_orig, linear, fixed_name, moving_name)
        level_factors = stage.pyramid.level_factors(fixed.grid.spacing, moving_orig.grid.spacing)
        for lvl, (factor, moving_factor, max_iter) in enumerate(level_factors):
            record = LevelRecord(s, stage.transform, factor, ())
            args = (
                _cached(cache, ("fixed", stage.normalize, factor, stage.pyramid.min_size),
                        lambda: _level_image(fixed_n, fixed_levels, fwin, factor, stage, dev)),
                _cached(cache, ("moving", stage.normalize, moving_factor, stage.pyramid.min_size),
                        lambda: _level_image(moving_n, moving_levels, mwin, moving_factor, stage, dev)),
                downsample(fmask, factor, stage.pyramid.min_size) if fmask is not None else None,
                downsample(mmask, moving_factor, stage.pyramid.min_size) if mmask is not None else None,
            )
            if stage.deformable:
                _deformable_level(record, stage, deformable, linear.matrix().detach(), objective, *args,
                                  max_iter, lvl, callback)
            else:
                _linear_level(record, stage, linear, objective, *args, max_iter, lvl, cfg.seed, callback)
            levels.append(record)
    assert linear is not None
    with torch.no_grad():
        matrix = linear.matrix()
        mode = cfg.stages[-1].interpolation
        if deformable is None:
            warped, _ = warp_linear(moving_orig, fixed.grid, matrix, mode=mode)
            displacement, jacobian = linear_displacement(matrix, fixed), None
        else:
            warped, displacement = _compose(deformable, matrix, fixed, moving_orig, mode)
            direction = torch.as_tensor(fixed.grid.direction_matrix, dtype=displacement.dtype, device=dev)
            det = jacobian_determinant(displacement.data[None], spacing=fixed.grid.spacing, direction=direction)
            jacobian = Image(det, fixed.grid)
    return RegistrationResult(
        method=cfg.name,
        config=cfg,
        config_hash=config_hash(cfg),
        transform=linear,
        deformable=deformable,
        warped=Image(warped, fixed.grid),
        displacement=displacement,
        jacobian=jacobian,
        levels=levels,
        seconds=time.perf_counter() - t0,
        device=str(dev),
    )


def _cached(cache: dict, key: tuple, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` the first time."""
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _normalized(cache: dict, which: str, image: Image, mode: str):
    """``(intensity window, normalised image)`` of ``image`` for a stage's ``normalize`` mode,
    computed once per registration."""
    def make():
        window = intensity_window(image.data, mode)
        return window, image.with_data(apply_window(image.data, window, mode))

    return _cached(cache, (which, mode, "window"), make)


def _level_image(normalized: Image, levels: Mapping[float, Image] | None, window, factor: float,
                 stage: StageConfig, device: torch.device) -> Image:
    """The pyramid level ``factor`` of an image: precomputed when available and on the right grid."""
    if factor != 1 and levels:
        pre = levels.get(float(factor))
        if pre is not None and pre.grid == normalized.grid.downsample(factor, stage.pyramid.min_size):
            data = pre.data.to(device, torch.float32)
            return Image(apply_window(data, window, stage.normalize), pre.grid)
    return downsample(normalized, factor, stage.pyramid.min_size)


def _compose(deformable: DeformableTransform, matrix: torch.Tensor, fixed: Image, moving: Image, mode: str) -> tuple[torch.Tensor, Image]:
    """Warped moving and the total displacement ``M (x + u(x)) - x`` on the fixed grid."""
    data = DeformableLevel(fixed, moving, None, None, mode, matrix)
    u = deformable.displacement(fixed.grid)
    _, warped, _ = data.warp(u)
    d = fixed.ndim
    m = matrix.to(data.points.dtype)
    mapped = (data.points + torch.movedim(u, 0, -1)) @ m[:d, :d].T + m[:d, d]
    return warped[0], Image(torch.movedim(mapped - data.points, -1, 0), fixed.grid)


def _make_deformable(stage: StageConfig, fixed: Image) -> DeformableTransform:
    cls = deformable_transform_class(stage.transform)
    params = dict(stage.transform_params)
    if stage.transform == "svf" and "control_factor" in params:  # velocity on a coarser grid, by factor
        params["control_grid"] = fixed.grid.downsample(float(params.pop("control_factor")), min_size=4)
    if stage.transform == "svf" and "control_spacing_mm" in params:  # velocity grid by spacing (mm)
        params["control_grid"] = velocity_grid(fixed.grid, float(params.pop("control_spacing_mm")))
    try:
        return cls(fixed.grid, **params)
    except TypeError as exc:
        raise InputError(f"transform {stage.transform!r}: bad transform_params {stage.transform_params} ({exc})") from exc


def velocity_grid(grid: Grid, spacing_mm: float, min_size: int = 4) -> Grid:
    """A grid over ``grid``'s box (same first and last voxel centres, same direction) with about
    ``spacing_mm`` between nodes (never finer than ``grid``, at least ``min_size`` nodes per axis
    unless ``grid`` has fewer): the velocity grid of an SVF, independent of the image resolution."""
    if not spacing_mm > 0:
        raise InputError(f"svf control_spacing_mm must be positive, got {spacing_mm}")
    size, spacing = [], []
    for n, sp in zip(grid.size, grid.spacing):
        extent = (n - 1) * sp
        m = min(n, max(min(n, min_size), int(round(extent / spacing_mm)) + 1))
        size.append(m)
        spacing.append(extent / (m - 1) if m > 1 else sp)
    return Grid(tuple(size), tuple(spacing), grid.origin, grid.direction)


def linear_displacement(matrix: torch.Tensor, fixed: Image) -> Image:
    """``u(x) = M x - x`` (mm) at every fixed voxel, as a ``D``-channel image on the fixed grid.

    ``u`` is affine in the voxel index: ``u = (M - I)(origin + R S i) + t``; it is assembled from
    per-axis terms in float64 (no per-voxel world coordinates), then stored as float32.
    """
    d = fixed.ndim
    m = matrix.detach().to(torch.float64).cpu().numpy()
    lin = m[:d, :d] - np.eye(d)
    index_to_world = fixed.grid.index_to_world()
    per_index = lin @ index_to_world[:d, :d]  # mm of u per voxel step along each index axis
    offset = lin @ index_to_world[:d, d] + m[:d, d]
    dev = matrix.device
    out = torch.empty((d, *fixed.grid.shape), dtype=torch.float32, device=dev)
    for c in range(d):
        total = torch.full((), float(offset[c]), dtype=torch.float64, device=dev)
        for axis in range(d):  # ITK axis k is tensor dim d - 1 - k
            view = [1] * d
            view[d - 1 - axis] = fixed.grid.size[axis]
            ramp = torch.arange(fixed.grid.size[axis], dtype=torch.float64, device=dev) * float(per_index[c, axis])
            total = total + ramp.reshape(view)
        out[c] = total
    return Image(out, fixed.grid)


def _check_overlap(fixed: Image, moving: Image, transform: LinearTransform, fixed_name: str, moving_name: str) -> None:
    coarse = fixed.grid.downsample(max(1.0, max(fixed.grid.size) / 32))
    with torch.no_grad():
        inside = inside_mask(linear_coords(coarse, moving.grid, transform.matrix(), torch.float32))
    if not bool(inside.any()):
        raise InputError(
            f"no overlap in world space between {fixed_name} and {moving_name} under the initial transform "
            f"(fixed corners {fixed.grid.corners().min(0).round(1).tolist()}..{fixed.grid.corners().max(0).round(1).tolist()} mm, "
            f"moving {moving.grid.corners().min(0).round(1).tolist()}..{moving.grid.corners().max(0).round(1).tolist()} mm); "
            "check the headers or initialise with 'geometry' or 'moments'"
        )


def _linear_level(
    record: LevelRecord, stage: StageConfig, transform: LinearTransform, objective: Objective,
    fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
    max_iter: int, level: int, seed: int, callback: Callback | None,
) -> None:
    record.size = fixed.grid.size
    pointwise = all(term.measure in POINTWISE_MEASURES for term in stage.objective)
    data = LinearLevel(fixed, moving, fixed_mask, moving_mask, stage.interpolation,
                       stage.max_voxels if pointwise else None, seed + level, objective.overlap_only)
    record.voxels = data.voxels

    def evaluate() -> tuple[torch.Tensor, dict[str, float]]:
        matrix = transform.matrix()
        fixed_t, warped, mask = data.warp(matrix)
        if not bool((mask > 0).any()):  # a line search probing far away: a high, flat loss sends it back
            return matrix.sum() * 0 + OUT_OF_VIEW_LOSS, {}
        return objective.similarity(fixed_t, warped, mask, fixed.grid.spacing)

    params = [p for p in transform.parameters() if p.requires_grad]
    optimize_level(record, stage, params, evaluate, max_iter, level, callback)


def _smoother(sigma_mm: float, grid: Grid) -> Callable[[torch.Tensor], torch.Tensor]:
    """Gaussian smoothing (sigma in mm) of a field ``(D, *grid.shape)``."""
    sigma = [sigma_mm / sp for sp in reversed(grid.spacing)]  # tensor dim order
    return lambda field: gaussian_smooth(field, sigma)


def _field_parameter(transform: DeformableTransform) -> tuple[torch.nn.Parameter, Grid]:
    """The grid-shaped parameter demons smoothing acts on, and its grid."""
    if isinstance(transform, StationaryVelocityField):
        return transform.velocity, transform.velocity_grid
    if isinstance(transform, DenseDisplacement):
        return transform.field, transform.field_grid
    raise InputError(f"demons smoothing needs a 'dense' or 'svf' transform, not {transform.kind!r}")


def _deformable_level(
    record: LevelRecord, stage: StageConfig, transform: DeformableTransform, matrix: torch.Tensor,
    objective: Objective, fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
    max_iter: int, level: int, callback: Callback | None,
) -> None:
    if isinstance(transform, SymmetricDiffeomorphism):
        optimize_symmetric_level(record, stage, transform, objective, fixed, moving, fixed_mask, moving_mask,
                                 matrix, max_iter, level, callback)
        return
    record.size = fixed.grid.size
    grid = fixed.grid
    transform.set_level(grid)
    data = DeformableLevel(fixed, moving, fixed_mask, moving_mask, stage.interpolation, matrix)
    record.voxels = data.voxels
    reg_grid = transform.regularization_grid(grid)

    def evaluate() -> tuple[torch.Tensor, dict[str, float]]:
        u = transform.displacement(grid)
        fixed_t, warped, mask = data.warp(u)
        if not bool((mask > 0).any()):
            return u.sum() * 0 + OUT_OF_VIEW_LOSS, {}
        loss, parts = objective.similarity(fixed_t, warped, mask, grid.spacing)
        if objective.has_regularizers:
            reg, reg_parts = objective.regularization(transform.regularization_field(reg_grid), reg_grid)
            loss = loss + reg
            parts.update(reg_parts)
        return loss, parts

    params = [p for p in transform.parameters() if p.requires_grad]
    hooks, after_step = [], None
    smoothing = stage.smoothing
    if smoothing is not None and (smoothing.update_sigma_mm > 0 or smoothing.field_sigma_mm > 0):
        field, field_grid = _field_parameter(transform)
        if smoothing.update_sigma_mm > 0:
            hooks.append(field.register_hook(_smoother(smoothing.update_sigma_mm, field_grid)))
        if smoothing.field_sigma_mm > 0:
            smooth_field = _smoother(smoothing.field_sigma_mm, field_grid)

            def after_step() -> None:
                with torch.no_grad():
                    field.copy_(smooth_field(field))

    try:
        optimize_level(record, stage, params, evaluate, max_iter, level, callback, after_step)
    finally:
        for hook in hooks:
            hook.remove()
